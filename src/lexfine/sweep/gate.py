"""The free-memory gate of the packed runner: no job starts on a GPU that has less memory free than it needs.

The --runs-per-gpu check (memory.check_fit) compares N runs with a GPU's total memory; it cannot see processes the
sweep did not start (an evaluation a user runs by hand on the same GPU). So before a job starts on a GPU, nvidia-smi
is asked for that GPU's free memory (gpus.free_memory: no CUDA context). Jobs of this sweep that started less than
`settle_s` ago may not have allocated yet: their need is kept for them (subtracted from what nvidia-smi says is free).

A job that does not fit anywhere waits in the queue (one line says why, once); it is started on another GPU with room,
or later, when a job ends or the other processes free memory. It never waits forever: when nothing of the sweep runs
and no GPU has had room for `timeout_s`, the jobs that still do not fit fail with one line (nothing of theirs is
touched: running the sweep again starts them).

Where nvidia-smi cannot tell (no nvidia-smi, MIG slices, fake GPUs without a free figure) or a job's need is unknown
(--runs-per-gpu 1 without --gpu-memory-per-run), the gate lets it start, as before the gate existed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from lexfine.sweep.gpus import free_memory

TIMEOUT_S = 600.0


@dataclass
class MemoryGate:
    need: dict[str, float]
    """GiB one process of each run needs (run id -> GiB): --gpu-memory-per-run, or the estimate of check_fit."""
    query: Callable[[], dict[str, float]] = free_memory
    timeout_s: float = TIMEOUT_S
    settle_s: float = 90.0
    refresh_s: float = 5.0
    source: str = "given by --gpu-memory-per-run"
    clock: Callable[[], float] = time.monotonic
    _free: dict[str, float] = field(default_factory=dict)
    _asked: float | None = None
    _starts: dict[str, tuple[float, float, list[str]]] = field(default_factory=dict)
    """job key -> (start time, GiB kept, GPUs) of this sweep's jobs that may not have allocated yet."""

    def refresh(self, force: bool = False) -> None:
        now = self.clock()
        if force or self._asked is None or now - self._asked >= self.refresh_s:
            self._free, self._asked = dict(self.query()), now

    def expire(self) -> None:
        """Forget nvidia-smi's answer (a job ended: its memory is free now)."""
        self._asked = None

    def room(self, gpu: str) -> float | None:
        """GiB a new job may use on `gpu` (free, less what starting jobs of this sweep keep); None: unknown."""
        if gpu not in self._free:
            return None
        now = self.clock()
        kept = sum(gib for t, gib, gpus in self._starts.values() if gpu in gpus and now - t < self.settle_s)
        return self._free[gpu] - kept

    def fits(self, run_id: str, gpu: str) -> bool:
        need, room = self.need.get(run_id), self.room(gpu)
        return need is None or room is None or room >= need

    def started(self, key: str, run_id: str, gpus: list[str]) -> None:
        if run_id in self.need:
            self._starts[key] = (self.clock(), self.need[run_id], list(gpus))

    def ended(self, key: str) -> None:
        self._starts.pop(key, None)
        self.expire()

    def why(self, name: str, run_id: str, gpus: list[str]) -> str:
        """`GPU 0 has 5.5 GiB free (other processes hold memory), NAME needs 22 GiB`, for the GPUs with a free slot."""
        shown = sorted((g for g in gpus if g in self._free), key=lambda g: -(self.room(g) or 0.0))
        parts = []
        for g in shown[:4]:
            kept = self._free[g] - (self.room(g) or 0.0)
            starting = f" ({kept:.1f} of it kept for jobs of this sweep that are starting)" if kept > 0.05 else ""
            parts.append(f"GPU {g} has {self._free[g]:.1f} GiB free{starting}")
        if len(shown) > 4:
            parts.append(f"{len(shown) - 4} more GPUs less")
        return (", ".join(parts) + f" (other processes hold memory), {name} needs {self.need[run_id]:.1f} GiB "
                f"({self.source})")
