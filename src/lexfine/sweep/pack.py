"""The packed local runner: a sweep's runs (and their evaluations) as processes on free GPU slots.

Each GPU offers `runs_per_gpu` slots. A queue of jobs (train a run; evaluate one of its tasks) is started in
priority order (the sweep's order, or the order of the --only patterns) on free slots: a 1-process run takes one
slot, a run with launch.num_processes = k takes one slot on each of k GPUs (`accelerate launch` with those k in
CUDA_VISIBLE_DEVICES). A run has at most one job at a time (its evaluations follow its training one by one, since
they all update its manifest); jobs of different runs run side by side. A job is a process of its own, in a
session of its own, writing to logs/<run id>.train.log or logs/<run id>.eval-<task>.log: a crash or an OOM kill ends
that job only.

What a training process's exit code means (lexfine.errors): 0 completed (its evaluations are queued); 65 diverged
(terminal, not retried, not an error); 73 locked by another live process (skipped, nothing marked); 75
interrupted (resumable, left as is); anything else failed (a manifest still saying planned/running is marked
failed with the log path). A failure that is a transient GPU failure (sweep/retry.py: CUDA OOM, cuDNN/cuBLAS
allocation failures) is queued again, up to `retries` times per run: the training resumes from its last checkpoint.

When a job's GPU memory need is known, the free-memory gate (sweep/gate.py) starts it only on a GPU with that much
memory free; otherwise it waits in the queue (or fails after the gate's timeout when nothing of the sweep runs).

SIGINT/SIGTERM to the runner: no new job starts, SIGTERM goes to every running job's process group (training saves
a checkpoint and stops: exit 75), the runner waits for them and returns; runs it stopped are `interrupted`, never
failed. A second signal kills the jobs at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from lexfine.errors import ConfigError
from lexfine.rundir import RunDir, now_iso
from lexfine.sweep.gate import TIMEOUT_S, MemoryGate
from lexfine.sweep.gpus import free_memory as gpus_free_memory
from lexfine.sweep.grid import PlannedRun, Sweep
from lexfine.sweep.jobs import Active, Job, Slots, _fmt, job_command
from lexfine.sweep.local import (RUNNING_ELSEWHERE, Outcome, _error_line, _tail, classify_exit, has_eval, log_dir,
                                 missing_evals, prepare, read_state, update_state)
from lexfine.sweep.retry import plural, transient_reason



@dataclass
class PackedRunner:
    sweep: Sweep
    gpu_ids: list[str]
    runs_per_gpu: int = 1
    launcher: str = "accelerate"
    evaluate: bool = True
    poll_s: float = 0.5
    progress_s: float = 60.0
    echo: Callable[[str], None] = print
    command: Callable[[Sweep, Job, str], list[str]] = job_command
    gate: MemoryGate | None = None
    retries: int = 1
    """Automatic retries of a transient GPU failure per run (0: none)."""
    retry_delay_s: float = 30.0
    queue: list[Job] = field(default_factory=list)
    active: list[Active] = field(default_factory=list)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    stopping: int = 0
    retried: dict[str, int] = field(default_factory=dict)
    waited: set[str] = field(default_factory=set)
    blocked_since: float | None = None

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _head(self, run: PlannedRun) -> str:
        return f"[{self.position[run.run_id] + 1}/{len(self.runs)}] {run.name}"

    def _say(self, run: PlannedRun, text: str) -> None:
        self.echo(f"{time.strftime('%H:%M:%S')} {self._head(run)}: {text}")

    def _enqueue_evals(self, run: PlannedRun) -> None:
        if self.evaluate:
            for entry in missing_evals(run):
                self.queue.append(Job(run, "eval", entry, 1, self.position[run.run_id]))

    def plan(self, runs: list[PlannedRun], retry_failed: bool) -> list[PlannedRun]:
        """Queue what each run still needs; returns the runs that will train."""
        self.runs = runs
        self.position = {r.run_id: i for i, r in enumerate(runs)}
        to_train = []
        for run in runs:
            rd = RunDir(run.run_dir)
            status = rd.status
            k = run.config.launch.num_processes
            if status == "completed":
                self.outcomes[run.run_id] = Outcome(run, "skipped", "completed before")
                self._say(run, "completed before, skipping training")
                self._enqueue_evals(run)
            elif status == "diverged":
                self.outcomes[run.run_id] = Outcome(run, "diverged", "diverged before (terminal)")
                self._say(run, "diverged before, not retried")
            elif status == "failed" and not retry_failed:
                self.outcomes[run.run_id] = Outcome(run, "failed", "failed before (use --retry-failed)")
                self._say(run, "failed before, not retried")
            else:
                if k > len(self.gpu_ids):
                    raise ConfigError(f"run {run.run_id} has launch.num_processes={k} but only {len(self.gpu_ids)} "
                                      f"GPU(s) are given ({','.join(self.gpu_ids)}); give more with --gpus")
                self.command(self.sweep, Job(run, "train", None, k), self.launcher)  # refuses bad launches now
                self.queue.append(Job(run, "train", None, k, self.position[run.run_id]))
                to_train.append(run)
        return to_train

    # -- processes ------------------------------------------------------------------------------------
    def _env(self, gpus: list[str]) -> dict[str, str]:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
        if "OMP_NUM_THREADS" not in os.environ:  # N processes per GPU must not each take every core
            slots = max(1, len(self.gpu_ids) * self.runs_per_gpu)
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // slots))
        return env

    def _start(self, job: Job, gpus: list[str]) -> None:
        import shlex

        cmd = self.command(self.sweep, job, self.launcher)
        log = log_dir(self.sweep) / f"{job.run.run_id}.{job.log}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n=== {now_iso()} CUDA_VISIBLE_DEVICES={','.join(gpus)} {' '.join(shlex.quote(c) for c in cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self._env(gpus), start_new_session=True)
        self.active.append(Active(job, proc, gpus, log, time.perf_counter()))
        self.waited.discard(job.key)
        if self.gate:
            self.gate.started(job.key, job.run.run_id, gpus)
        where = f"GPU {','.join(gpus)}" if len(gpus) == 1 else f"GPUs {','.join(gpus)}"
        if job.kind == "train":
            update_state(self.sweep.sweep_dir, job.run.run_id, status="running", runner="local", gpu=",".join(gpus),
                         job="train", waiting=None)
            ckpt = RunDir(job.run.run_dir).latest_checkpoint()
            self._say(job.run, f"started on {where} ({'resuming from ' + ckpt.name if ckpt else job.run.describe()})")
        else:
            update_state(self.sweep.sweep_dir, job.run.run_id, gpu=",".join(gpus), job=f"eval {job.entry}",
                         waiting=None)
            self._say(job.run, f"eval {job.entry} started on {where}")

    def _schedule(self, slots: Slots) -> None:
        busy = {a.job.run.run_id for a in self.active}
        self.queue.sort(key=lambda j: j.order)  # stable: a run's evaluations keep their order
        now, blocked = time.perf_counter(), False
        for job in list(self.queue):
            if job.run.run_id in busy or job.not_before > now:
                continue
            ok = None
            if self.gate and job.run.run_id in self.gate.need:
                self.gate.refresh()
                ok = lambda g, rid=job.run.run_id: self.gate.fits(rid, g)  # noqa: E731
            gpus = slots.take(job.gpus_needed, ok)
            if gpus is None:
                if ok is not None and self._short_of_memory(job, slots):
                    blocked = True
                    if self._give_up(job):
                        continue  # failed: the next one may fit
                break  # nothing behind it may jump a waiting run (a multi-GPU run would wait forever)
            self.queue.remove(job)
            busy.add(job.run.run_id)
            try:
                self._start(job, gpus)
            except OSError as e:  # the command itself could not start: that job fails, the others go on
                slots.give(gpus)
                self.outcomes[job.run.run_id] = Outcome(job.run, "failed", f"cannot start {job.kind}: {e}")
                self._say(job.run, f"FAILED to start {job.kind}: {e}")
        if not blocked or self.active:
            self.blocked_since = None

    def _short_of_memory(self, job: Job, slots: Slots) -> bool:
        """Whether slots are free for `job` and only memory is missing; says so once per job."""
        with_slot = [g for g in slots.ids if slots.free[g] > 0]
        if len(with_slot) < job.gpus_needed:
            return False
        if job.key not in self.waited:
            self.waited.add(job.key)
            why = self.gate.why(job.run.name, job.run.run_id, with_slot)
            what = "" if job.kind == "train" else f"eval {job.entry} "
            self._say(job.run, f"{what}waiting: {why}")
            update_state(self.sweep.sweep_dir, job.run.run_id, waiting=f"waiting for GPU memory: {why}")
        return True

    def _give_up(self, job: Job) -> bool:
        """Fail `job` when nothing of the sweep has run and no GPU has had room for it for the gate's timeout."""
        if self.active:
            return False
        now = time.perf_counter()
        if self.blocked_since is None:
            self.blocked_since = now
        if now - self.blocked_since < self.gate.timeout_s:
            return False
        self.gate.refresh(force=True)
        free = ", ".join(f"GPU {g} {self.gate.room(g):.1f} GiB" for g in self.gpu_ids if self.gate.room(g) is not None)
        why = (f"not started: no GPU had {self.gate.need[job.run.run_id]:.1f} GiB free for "
               f"{self.gate.timeout_s / 60:.0f} min while nothing of the sweep ran (free: {free}); other processes "
               "hold the memory: free it (or give --gpu-memory-per-run, --gpu-wait), then run the sweep again")
        self.queue.remove(job)
        self.waited.discard(job.key)
        if job.kind == "train":
            self.outcomes[job.run.run_id] = Outcome(job.run, "failed", why)
            update_state(self.sweep.sweep_dir, job.run.run_id, waiting=None, error=why)
            self._say(job.run, f"FAILED: {why}")
        else:
            o = self.outcomes.setdefault(job.run.run_id, Outcome(job.run, "trained"))
            o.state, o.detail = "eval-failed", "; ".join(x for x in (o.detail, f"eval {job.entry}: {why}") if x)
            update_state(self.sweep.sweep_dir, job.run.run_id, waiting=None, error=o.detail)
            self._say(job.run, f"eval {job.entry} FAILED: {why}")
        return True

    def _finished_train(self, a: Active, code: int) -> None:
        run, rd = a.job.run, RunDir(a.job.run.run_dir)
        status, dt = rd.status, time.perf_counter() - a.t0
        kind = classify_exit(code, status, bool(self.stopping))
        n = self.retried.get(run.run_id, 0)
        after = f" after {plural(n)}" if n else ""
        if kind == "failed" and self._retry(a, code, rd):
            return
        if kind == "completed":
            m = rd.manifest()
            loss = m.get("final_loss")
            loss = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
            self.outcomes[run.run_id] = Outcome(run, "trained", f"completed{after}" if n else "", dt, n)
            self._say(run, f"completed in {dt:.0f}s{after} (steps {m.get('steps')}, final loss {loss})")
            self._enqueue_evals(run)
        elif kind == "diverged":
            self.outcomes[run.run_id] = Outcome(run, "diverged", _error_line(rd, "non-finite loss"), dt)
            self._say(run, f"diverged after {dt:.0f}s (terminal, not retried): {_error_line(rd, 'non-finite loss')}")
        elif kind == "locked":
            self.outcomes[run.run_id] = Outcome(run, "locked", RUNNING_ELSEWHERE, dt)
            self._say(run, "skipped: locked by another live process (another sweep runner or lexfine train)")
        elif kind == "interrupted":
            if status in (None, "planned", "running"):
                rd.set_status("interrupted", error="stopped by the sweep runner; run the sweep again to resume")
            self.outcomes[run.run_id] = Outcome(run, "interrupted", "resumable", dt)
            self._say(run, f"interrupted after {dt:.0f}s (resumable: run the sweep again)")
        else:
            if code == 0:
                detail = f"status {status!r} after training: " + _error_line(rd, f"see {a.log}")
            if status in (None, "planned", "running"):
                # Killed before it could say so (OOM killer, segfault): never leave it looking alive.
                rd.set_status("failed", error=f"training process exited with code {code}; log: {a.log}")
            if code != 0:
                detail = _error_line(rd, f"exit code {code}")
            self.outcomes[run.run_id] = Outcome(run, "failed", f"{detail} (log: {a.log}){after}", dt, n)
            tail = _tail(a.log, 4)
            self._say(run, f"FAILED after {dt:.0f}s{after}: {detail} (log: {a.log})" + (f"\n{tail}" if tail else ""))
        update_state(self.sweep.sweep_dir, run.run_id, status=rd.status, gpu=None, job=None,
                     error=(self.outcomes[run.run_id].detail.splitlines()[0]
                            if self.outcomes[run.run_id].state == "failed" else None))

    def _retry(self, a: Active, code: int, rd: RunDir) -> bool:
        """Queue a training that failed transiently (sweep/retry.py) again, while retries are left: it resumes."""
        run, n = a.job.run, self.retried.get(a.job.run.run_id, 0)
        if self.stopping or n >= self.retries:
            return False
        if rd.status in (None, "planned", "running"):  # killed before it could say so
            rd.set_status("failed", error=f"training process exited with code {code}; log: {a.log}")
        reason = transient_reason(code, rd.manifest().get("error"), a.log)
        if reason is None:
            return False
        self.retried[run.run_id] = n + 1
        self.queue.append(Job(run, "train", None, a.job.gpus_needed, a.job.order,
                              time.perf_counter() + self.retry_delay_s))
        total = int(read_state(self.sweep.sweep_dir).get(run.run_id, {}).get("retries") or 0) + 1
        update_state(self.sweep.sweep_dir, run.run_id, status=rd.status, gpu=None, job=None, error=None,
                     retries=total, retry_reason=reason)
        self._say(run, f"retrying ({n + 1}/{self.retries}) after transient failure: {reason}")
        return True

    def _finished_eval(self, a: Active, code: int) -> None:
        run, entry, dt = a.job.run, a.job.entry, time.perf_counter() - a.t0
        update_state(self.sweep.sweep_dir, run.run_id, gpu=None, job=None)
        if code == 0 and has_eval(RunDir(run.run_dir), run.config, entry):
            self._say(run, f"eval {entry} done in {dt:.0f}s")
            return
        if self.stopping:
            self._say(run, f"eval {entry} stopped (it runs again next time)")
            return
        o = self.outcomes.setdefault(run.run_id, Outcome(run, "trained"))
        failure = f"eval {entry}: exit code {code} (log: {a.log})"
        o.state, o.detail = "eval-failed", "; ".join(x for x in (o.detail, failure) if x)
        update_state(self.sweep.sweep_dir, run.run_id, error=o.detail)
        self._say(run, f"eval {entry} FAILED: exit code {code} (log: {a.log})")

    def _reap(self, slots: Slots) -> None:
        for a in list(self.active):
            code = a.proc.poll()
            if code is None:
                continue
            self.active.remove(a)
            slots.give(a.gpus)
            if self.gate:
                self.gate.ended(a.job.key)
            (self._finished_train if a.job.kind == "train" else self._finished_eval)(a, code)

    def _signal(self, signum, frame) -> None:
        self.stopping += 1
        self._forward()

    def _forward(self) -> None:
        """SIGTERM (first signal) or SIGKILL (second) to every job not yet told (one may have started just now)."""
        for a in list(self.active):
            if a.signalled < self.stopping:
                a.signalled = self.stopping
                try:
                    os.killpg(a.proc.pid, signal.SIGTERM if self.stopping == 1 else signal.SIGKILL)
                except OSError:
                    pass  # it ended meanwhile; the job's whole session gets it: accelerate's workers too

    # -- the loop -------------------------------------------------------------------------------------
    def loop(self) -> list[Outcome]:
        slots = Slots(self.gpu_ids, self.runs_per_gpu)
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        t0 = last = time.perf_counter()
        try:
            while self.queue or self.active:
                if self.stopping:
                    if not self.active:
                        break
                    self._forward()
                else:
                    self._schedule(slots)
                time.sleep(self.poll_s)
                self._reap(slots)
                if time.perf_counter() - last >= self.progress_s and (self.queue or self.active):
                    last = time.perf_counter()
                    self.echo(self.progress(time.perf_counter() - t0))
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if self.stopping and self.echo:
                self.echo(f"stopped by a signal after {_fmt(time.perf_counter() - t0)}: run the same command to resume")
        for job in self.queue:
            if job.kind == "train":
                self.outcomes.setdefault(job.run.run_id, Outcome(job.run, "not-started", "stopped before it started"))
        return [self.outcomes.get(r.run_id, Outcome(r, "skipped", "nothing to do")) for r in self.runs]

    def progress(self, elapsed: float) -> str:
        done = sum(1 for o in self.outcomes.values() if o.state in ("trained", "skipped", "diverged", "eval-failed"))
        failed = sum(1 for o in self.outcomes.values() if o.state == "failed")
        trains = sum(1 for j in self.queue if j.kind == "train")
        evals = len(self.queue) - trains
        return (f"{time.strftime('%H:%M:%S')} progress: {done} done, {failed} failed, {len(self.active)} running, "
                f"{trains} queued (+{evals} evals); elapsed {_fmt(elapsed)}")


def run_packed(sweep: Sweep, gpus: list, runs_per_gpu: int = 1, *, only: list[PlannedRun] | None = None,
               retry_failed: bool = True, evaluate: bool = True, launcher: str = "accelerate",
               gpu_memory_per_run: float | None = None, progress_s: float = 60.0, poll_s: float = 0.5,
               echo: Callable[[str], None] = print, command=job_command, retries: int = 1,
               retry_delay_s: float = 30.0, gpu_wait_s: float = TIMEOUT_S,
               free_memory: Callable[[], dict[str, float]] | None = None, settle_s: float = 90.0) -> list[Outcome]:
    """Train and evaluate the sweep's runs on `gpus` (gpus.Gpu), `runs_per_gpu` at a time on each. Refuses before
    anything starts what does not fit (memory.check_fit when runs_per_gpu > 1). A job whose memory need is known
    (`gpu_memory_per_run`, or check_fit's estimate) starts only where that much is free (`free_memory`: GPU id ->
    GiB free, default nvidia-smi's), waiting up to `gpu_wait_s` while nothing of the sweep runs; a transient GPU
    failure is retried `retries` times, `retry_delay_s` later. Returns one Outcome per run."""
    from lexfine.sweep.memory import check_fit

    if runs_per_gpu < 1:
        raise ConfigError(f"--runs-per-gpu {runs_per_gpu}: give 1 or more")
    if retries < 0:
        raise ConfigError(f"--retries {retries}: give 0 (no automatic retries) or more")
    prepare(sweep)
    for rid, row in read_state(sweep.sweep_dir).items():  # a runner killed earlier may have left them
        if row.get("gpu") or row.get("job") or row.get("waiting"):
            update_state(sweep.sweep_dir, rid, gpu=None, job=None, waiting=None)
    runner = PackedRunner(sweep, [g.id for g in gpus], runs_per_gpu, launcher, evaluate, poll_s, progress_s, echo,
                          command, retries=retries, retry_delay_s=retry_delay_s)
    runs = only if only is not None else sweep.runs
    to_train = runner.plan(runs, retry_failed)
    need = check_fit(to_train, gpus, runs_per_gpu, gpu_memory_per_run)
    if gpu_memory_per_run is not None:
        need = {r.run_id: gpu_memory_per_run for r in runs}
    if need:
        source = "given by --gpu-memory-per-run" if gpu_memory_per_run is not None else "estimated"
        runner.gate = MemoryGate(need, free_memory or gpus_free_memory, gpu_wait_s, settle_s,
                                 refresh_s=min(5.0, 10 * poll_s), source=source)
    echo(f"{len(gpus)} GPU(s) ({','.join(g.id for g in gpus)}) x {runs_per_gpu} run(s) each: "
         f"{len(to_train)} to train, {sum(j.kind == 'eval' for j in runner.queue)} evaluations queued")
    return runner.loop()
