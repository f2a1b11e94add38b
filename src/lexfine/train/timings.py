"""Where a run's time goes, from process start to the last step: `manifest.json` -> `timings` (rank 0 writes).

    data_prep_s          reading the rows + tokenizing and masking them (or loading them from the tokenized cache)
    model_load_s         loading (or building) the model weights
    train_begin_s        process start to the start of training (imports, data, model, adapters, trainer set-up)
    first_step_s         process start to the end of the first optimizer step this process runs (step 1, or the
                         first step after the checkpoint it resumed from): start-up, data, model, compilation;
                         first_step_s - train_begin_s is the first step itself (compilation, kernel autotuning and
                         loading, the step-0 evaluation of eval_during)
    warmup_steps         W = min(10, max(1, steps // 10)): the steps steady_* and recompiles leave out
    steady_tokens_per_s  real (non-pad) tokens per second over the steps after step W, between the logged rows at
                         or after step W (TRL's num_tokens, all ranks); null with fewer than two such rows. Time spent
                         in evaluation during training (eval_during) is left out: it is the manifest's
                         eval_during.seconds (first_step_s includes the step-0 evaluation)
    recompiles           torch.compile (Dynamo) frame compilations after step W: every one stalls a step; 0 when
                         nothing is compiled (a CPU run with train.compile_layers off)
    compile_s            seconds this process spent in Dynamo's frame compilations (tracing, AOTAutograd, inductor,
                         loading from the compile cache), written with first_step_s and again at the end
    compile_cache        hits and misses of inductor's FX graph cache and of the AOTAutograd cache: all misses on a
                         first run, hits when the compile cache (lexfine.compile_cache) kept an earlier run's graphs

Process start is the OS's (/proc/self/stat), so interpreter start-up and imports count; elsewhere the time lexfine
was first imported.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback

from lexfine import compile_cache
from lexfine.clock import process_start_time


def dynamo_compilations() -> int:
    """Frames Dynamo has compiled in this process so far (first compilations and recompilations)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # torch without Dynamo
        return 0
    return int(counters["frames"]["total"])


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def warmup_steps(total_steps: int) -> int:
    return min(10, max(1, total_steps // 10))


class TimingsCallback(TrainerCallback):
    """Records first_step_s at the first step this process completes, steady_tokens_per_s and recompiles at the end
    of training; `before` holds what the recipe timed before training (data_prep_s, model_load_s). `write(timings)`
    is called with the whole dict each time (rank 0 passes a manifest update, the others None)."""

    def __init__(self, write, before: dict | None = None, started: float | None = None):
        self.write = write
        self.timings = dict(before or {})
        self.started = process_start_time() if started is None else started
        self.first_step = None  # global step the first step of this process reached
        self.warmup = 1
        self.marks: list[tuple[int, float, float]] = []  # (step, time, cumulative real tokens) at logged rows
        self.compiled_at_warmup = None
        self.excluded = 0.0  # seconds of evaluation during training, left out of the steady rate

    def exclude_time(self, seconds: float) -> None:
        self.excluded += seconds

    def _emit(self) -> None:
        if self.write is not None:
            self.write(dict(self.timings))

    def on_train_begin(self, args, state, control, **kw):
        self.warmup = warmup_steps(state.max_steps or 0)
        self.timings["train_begin_s"] = round(time.time() - self.started, 2)

    def on_step_end(self, args, state, control, **kw):
        if self.first_step is None:
            self.first_step = state.global_step
            _synchronize()  # a GPU may still be running the step the Python side has already queued
            self.timings["first_step_s"] = round(time.time() - self.started, 2)
            self.timings.update(compile_cache.stats())
            self._emit()  # written now: a run that dies later still tells how long it took to start
        if state.global_step - self.first_step + 1 == self.warmup:
            self.compiled_at_warmup = dynamo_compilations()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and logs.get("num_tokens") is not None and self.first_step is not None \
                and state.global_step - self.first_step + 1 >= self.warmup:
            self.marks.append((state.global_step, time.perf_counter() - self.excluded, float(logs["num_tokens"])))

    def on_train_end(self, args, state, control, **kw):
        rate = None
        if len(self.marks) >= 2:
            (_, t0, n0), (_, t1, n1) = self.marks[0], self.marks[-1]
            rate = round((n1 - n0) / (t1 - t0), 1) if t1 > t0 and n1 > n0 else None
        self.timings.update(
            warmup_steps=self.warmup, steady_tokens_per_s=rate,
            recompiles=dynamo_compilations() - self.compiled_at_warmup if self.compiled_at_warmup is not None else 0,
            **compile_cache.stats())
        self._emit()
