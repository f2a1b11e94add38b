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
failed with the log path).

SIGINT/SIGTERM to the runner: no new job starts, SIGTERM goes to every running job's process group (training saves
a checkpoint and stops: exit 75), the runner waits for them and returns; runs it stopped are `interrupted`, never
failed. A second signal kills the jobs at once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lexfine.errors import ConfigError
from lexfine.rundir import RunDir, now_iso
from lexfine.sweep.grid import PlannedRun, Sweep
from lexfine.sweep.local import (RUNNING_ELSEWHERE, Outcome, _error_line, _tail, classify_exit, eval_command, has_eval,
                                 log_dir, missing_evals, prepare, read_state, train_command, update_state)


@dataclass
class Job:
    run: PlannedRun
    kind: str
    """train | eval"""
    entry: str | None = None
    """The eval entry (`task` or `task:mode`) of an eval job."""
    gpus_needed: int = 1
    order: int = 0

    @property
    def log(self) -> str:
        return "train" if self.kind == "train" else "eval-" + str(self.entry).replace(":", "_")


@dataclass
class Active:
    job: Job
    proc: subprocess.Popen
    gpus: list[str]
    log: Path
    t0: float
    signalled: int = 0


class Slots:
    """Free capacity per GPU. take(k) picks the k GPUs with the most free slots (one run per GPU before two)."""

    def __init__(self, gpu_ids: list[str], per_gpu: int):
        self.ids = list(gpu_ids)
        self.free = {g: per_gpu for g in gpu_ids}

    def take(self, k: int) -> list[str] | None:
        ready = sorted((g for g in self.ids if self.free[g] > 0), key=lambda g: -self.free[g])
        if len(ready) < k:
            return None
        chosen = sorted(ready[:k], key=self.ids.index)
        for g in chosen:
            self.free[g] -= 1
        return chosen

    def give(self, gpus: list[str]) -> None:
        for g in gpus:
            self.free[g] += 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_command(sweep: Sweep, job: Job, launcher: str) -> list[str]:
    if job.kind == "eval":
        return eval_command(job.run, job.entry)
    cmd = train_command(sweep, job.run, launcher)
    if "accelerate.commands.launch" in cmd:  # several launches on one host: each its own rendezvous port
        i = cmd.index("accelerate.commands.launch") + 1
        cmd[i:i] = ["--main_process_port", str(_free_port())]
    return cmd


def _fmt(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


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
    queue: list[Job] = field(default_factory=list)
    active: list[Active] = field(default_factory=list)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    stopping: int = 0

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
        where = f"GPU {','.join(gpus)}" if len(gpus) == 1 else f"GPUs {','.join(gpus)}"
        if job.kind == "train":
            update_state(self.sweep.sweep_dir, job.run.run_id, status="running", runner="local", gpu=",".join(gpus),
                         job="train")
            ckpt = RunDir(job.run.run_dir).latest_checkpoint()
            self._say(job.run, f"started on {where} ({'resuming from ' + ckpt.name if ckpt else job.run.describe()})")
        else:
            update_state(self.sweep.sweep_dir, job.run.run_id, gpu=",".join(gpus), job=f"eval {job.entry}")
            self._say(job.run, f"eval {job.entry} started on {where}")

    def _schedule(self, slots: Slots) -> None:
        busy = {a.job.run.run_id for a in self.active}
        self.queue.sort(key=lambda j: j.order)  # stable: a run's evaluations keep their order
        for job in list(self.queue):
            if job.run.run_id in busy:
                continue
            gpus = slots.take(job.gpus_needed)
            if gpus is None:
                break  # nothing behind it may jump a waiting multi-GPU run (it would wait forever)
            self.queue.remove(job)
            busy.add(job.run.run_id)
            try:
                self._start(job, gpus)
            except OSError as e:  # the command itself could not start: that job fails, the others go on
                slots.give(gpus)
                self.outcomes[job.run.run_id] = Outcome(job.run, "failed", f"cannot start {job.kind}: {e}")
                self._say(job.run, f"FAILED to start {job.kind}: {e}")

    def _finished_train(self, a: Active, code: int) -> None:
        run, rd = a.job.run, RunDir(a.job.run.run_dir)
        status, dt = rd.status, time.perf_counter() - a.t0
        kind = classify_exit(code, status, bool(self.stopping))
        if kind == "completed":
            m = rd.manifest()
            loss = m.get("final_loss")
            loss = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
            self.outcomes[run.run_id] = Outcome(run, "trained", "", dt)
            self._say(run, f"completed in {dt:.0f}s (steps {m.get('steps')}, final loss {loss})")
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
            self.outcomes[run.run_id] = Outcome(run, "failed", f"{detail} (log: {a.log})", dt)
            tail = _tail(a.log, 4)
            self._say(run, f"FAILED after {dt:.0f}s: {detail} (log: {a.log})" + (f"\n{tail}" if tail else ""))
        update_state(self.sweep.sweep_dir, run.run_id, status=rd.status, gpu=None, job=None,
                     error=(self.outcomes[run.run_id].detail.splitlines()[0]
                            if self.outcomes[run.run_id].state == "failed" else None))

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
               echo: Callable[[str], None] = print, command=job_command) -> list[Outcome]:
    """Train and evaluate the sweep's runs on `gpus` (gpus.Gpu), `runs_per_gpu` at a time on each. Refuses before
    anything starts what does not fit (memory.check_fit when runs_per_gpu > 1). Returns one Outcome per run."""
    from lexfine.sweep.memory import check_fit

    if runs_per_gpu < 1:
        raise ConfigError(f"--runs-per-gpu {runs_per_gpu}: give 1 or more")
    prepare(sweep)
    for rid, row in read_state(sweep.sweep_dir).items():  # a runner killed earlier may have left them
        if row.get("gpu") or row.get("job"):
            update_state(sweep.sweep_dir, rid, gpu=None, job=None)
    runner = PackedRunner(sweep, [g.id for g in gpus], runs_per_gpu, launcher, evaluate, poll_s, progress_s, echo,
                          command)
    runs = only if only is not None else sweep.runs
    to_train = runner.plan(runs, retry_failed)
    check_fit(to_train, gpus, runs_per_gpu, gpu_memory_per_run)
    echo(f"{len(gpus)} GPU(s) ({','.join(g.id for g in gpus)}) x {runs_per_gpu} run(s) each: "
         f"{len(to_train)} to train, {sum(j.kind == 'eval' for j in runner.queue)} evaluations queued")
    return runner.loop()
