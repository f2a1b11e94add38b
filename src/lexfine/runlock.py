"""One run, one writer: a lock file per run directory, told apart from a stale one on a shared filesystem.

    <run_dir>/run.lock   {"host", "pid", "started", "heartbeat" (unix time), "heartbeat_iso", "heartbeat_s",
                          "pidns", "token", "argv", "slurm_job_id", "slurm_restart"}

Acquiring is atomic on local disks and NFS/Lustre/GPFS alike: the holder's record is written to a private temp
file and hard-linked to `run.lock` (link fails if the name exists). While held, a daemon thread rewrites the
record every HEARTBEAT_S seconds (temp file + rename). A lock is stale, and may be taken over, when
  - its heartbeat is older than STALE_AFTER x HEARTBEAT_S seconds (the holder's node died or lost the filesystem;
    works across nodes, tolerates clock skew well under that margin), or
  - it was taken on this host, in this pid namespace, and its pid is no longer alive (a kill -9 here: no need to
    wait; a container sharing the host name but not the pids falls back to the heartbeat), or
  - it was taken by an earlier run of this SLURM job (same SLURM_JOB_ID, other SLURM_RESTART_COUNT): a requeued
    job starts only after SLURM ended the old one, possibly on another node with its lock still fresh.
A takeover is serialized by a `.run.lock.break` file (created the same way): under it the taker checks that the
lock is still the record it judged stale, removes it and competes for the name again, so a fresh lock made by a
faster taker is never removed.

Processes started by a lock holder for the same run (`lexfine train` with num_processes > 1 launches
`accelerate launch` children) inherit LEXFINE_RUN_LOCK=<run dir>: their RunLock is a no-op.
The manifest's read-modify-write updates take a short `flock` on `.manifest.lock` (see `manifest_lock`) so that
`lexfine eval` recording a result cannot overwrite what the trainer writes at the same moment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from lexfine.errors import LexfineError

LOCK_NAME = "run.lock"
ENV_HELD = "LEXFINE_RUN_LOCK"
HEARTBEAT_S = float(os.environ.get("LEXFINE_LOCK_HEARTBEAT_S", "30"))
STALE_AFTER = 4
log = logging.getLogger("lexfine.lock")


class RunLockedError(LexfineError):
    """Another live process holds the run's lock. `lexfine train` exits with errors.EXIT_LOCKED (73)."""

    def __init__(self, run_dir: Path, holder: dict):
        self.holder = holder
        super().__init__(f"run {Path(run_dir).name} is locked by {describe(holder)}: it is training elsewhere; "
                         f"wait for it, or stop that process (a dead holder's lock expires after "
                         f"{int(STALE_AFTER * HEARTBEAT_S)} s without heartbeat)")


def describe(holder: dict) -> str:
    age = time.time() - float(holder.get("heartbeat") or 0)
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"(heartbeat {max(age, 0):.0f} s ago)")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # exists but belongs to someone else (or unreadable): assume alive
    return True


def is_stale(info: dict | None, lock_path: Path | None = None, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if info is None:  # unreadable: judge by the file's age (a half-written record cannot exist, but be safe)
        try:
            return lock_path is not None and now - lock_path.stat().st_mtime > STALE_AFTER * HEARTBEAT_S
        except OSError:
            return True
    beat = info.get("heartbeat")
    if not isinstance(beat, (int, float)) or now - beat > STALE_AFTER * float(info.get("heartbeat_s") or HEARTBEAT_S):
        return True
    job = os.environ.get("SLURM_JOB_ID")
    if job and info.get("slurm_job_id") == job and info.get("slurm_restart") != os.environ.get("SLURM_RESTART_COUNT"):
        return True  # held by an earlier run of this (requeued) job: SLURM ended all of its processes
    # The pid means something only in the same pid namespace (containers can share a host name, not their pids).
    same_pids = info.get("host") == socket.gethostname() and info.get("pidns") == _pid_namespace()
    return same_pids and not _pid_alive(info.get("pid"))


def lock_holder(run_dir: str | Path) -> dict | None:
    """The live holder's record (host, pid, started, heartbeat, ...); None when the run is free or its lock stale."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return None
    info = _read(path)
    return None if is_stale(info, path) else (info or {"host": "?", "pid": "?", "started": "?"})


def _write_tmp(directory: Path, info: dict) -> Path:
    tmp = directory / f".{LOCK_NAME}.{info['token']}.{uuid.uuid4().hex[:6]}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(info) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return tmp


class RunLock:
    """`with RunLock(run_dir): ...` holds the run's lock (raising RunLockedError when a live process has it)."""

    def __init__(self, run_dir: str | Path, heartbeat_s: float | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.token = uuid.uuid4().hex
        self.held = False
        self.inherited = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, started: str | None = None) -> dict:
        now = time.time()
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": started or _iso(now),
                "heartbeat": now, "heartbeat_iso": _iso(now), "heartbeat_s": self.heartbeat_s,
                "pidns": _pid_namespace(), "token": self.token, "argv": " ".join(sys.argv)[:300],
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT")}

    def acquire(self) -> "RunLock":
        held = os.environ.get(ENV_HELD)
        if held and Path(held).resolve() == self.run_dir.resolve():
            self.inherited = True  # our launching process holds it
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._started = _iso(time.time())
        for _ in range(100):
            tmp = _write_tmp(self.run_dir, self._record(self._started))
            try:
                os.link(tmp, self.path)
                self.held = True
                break
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            info = _read(self.path)
            if info is None and not self.path.exists():
                continue  # released meanwhile
            if not is_stale(info, self.path):
                raise RunLockedError(self.run_dir, info or {"host": "?", "pid": "?", "started": "?"})
            self._take_over(info)
        if not self.held:
            raise RunLockedError(self.run_dir, _read(self.path) or {"host": "?", "pid": "?", "started": "?"})
        self._thread = threading.Thread(target=self._beat, name="lexfine-run-lock", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, stale: dict | None) -> None:
        """Remove the stale lock, one taker at a time: the `.break` file (created like the lock itself) makes sure
        that no one removes a lock that a faster taker has just created. The caller then links its own."""
        breaker = self.run_dir / f".{LOCK_NAME}.break"
        tmp = _write_tmp(self.run_dir, self._record(self._started))
        try:
            os.link(tmp, breaker)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - breaker.stat().st_mtime > 60:  # a taker died between the two steps
                    breaker.unlink()
            time.sleep(0.02)
            return
        finally:
            tmp.unlink(missing_ok=True)
        try:
            current = _read(self.path)
            if (current or {}).get("token") == (stale or {}).get("token") and self.path.exists():
                self.path.unlink(missing_ok=True)
                log.warning("took over the stale lock of %s: %s", self.run_dir.name, describe(stale or {}))
        finally:
            breaker.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = _read(self.path)
                if current is not None and current.get("token") != self.token:
                    log.error("the lock of %s was taken over by %s (this process missed its heartbeats)",
                              self.run_dir.name, describe(current))
                    return
                tmp = _write_tmp(self.run_dir, self._record(self._started))
                os.replace(tmp, self.path)
            except OSError as e:  # a full disk or a lost mount: keep trying, the holder is still alive
                log.warning("could not refresh the lock of %s: %s", self.run_dir.name, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held:
            current = _read(self.path)
            if current is not None and current.get("token") == self.token:
                self.path.unlink(missing_ok=True)
            self.held = False

    def child_env(self) -> dict:
        """Environment for processes that work for this holder on the same run (they must not lock it again)."""
        return {**os.environ, ENV_HELD: str(self.run_dir.resolve())}

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def manifest_lock(run_dir: str | Path):
    """A short exclusive flock around a manifest read-modify-write. Where the filesystem has no flock (some Lustre
    mounts), it degrades to no lock: the run lock still keeps the trainer the only training writer."""
    path = Path(run_dir) / ".manifest.lock"
    try:
        import fcntl

        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def effective_status(run_dir: str | Path, manifest: dict | None = None) -> str | None:
    """The manifest's status, except that `running` without a live lock holder is `dead` (killed, or its node
    lost): rerunning the same command resumes it."""
    if manifest is None:
        try:
            manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
    status = manifest.get("status") if isinstance(manifest, dict) else None
    if status == "running" and lock_holder(run_dir) is None:
        return "dead"
    return status
