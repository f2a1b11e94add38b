"""A packed sweep's jobs (train a run; evaluate one of its tasks), their commands, and the GPU slots they take."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lexfine.sweep.grid import PlannedRun, Sweep
from lexfine.sweep.local import eval_command, train_command


@dataclass
class Job:
    run: PlannedRun
    kind: str
    """train | eval"""
    entry: str | None = None
    """The eval entry (`task` or `task:mode`) of an eval job."""
    gpus_needed: int = 1
    order: int = 0
    not_before: float = 0.0
    """perf_counter() time before which it may not start (a retry waits a little for memory to be freed)."""

    @property
    def log(self) -> str:
        return "train" if self.kind == "train" else "eval-" + str(self.entry).replace(":", "_")

    @property
    def key(self) -> str:
        return f"{self.run.run_id}.{self.log}"


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

    def take(self, k: int, ok: Callable[[str], bool] | None = None) -> list[str] | None:
        """k GPUs with a free slot (and for which `ok` says yes), or None."""
        ready = sorted((g for g in self.ids if self.free[g] > 0 and (ok is None or ok(g))), key=lambda g: -self.free[g])
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
