"""Trainer callbacks: lexfine's own metrics log (metrics.jsonl), written by the main process only."""

from __future__ import annotations

import math
import time

from transformers import TrainerCallback

from lexfine.rundir import RunDir


class MetricsCallback(TrainerCallback):
    """One row per logged step: step, epoch, loss, learning_rate, grad_norm, num_tokens, tokens_per_s, elapsed_s.

    `num_tokens` is TRL's count of real (attention-mask) tokens over all ranks; tokens/s is measured between
    two logs, so it covers data loading, forward, backward and the optimizer step.
    """

    def __init__(self, run_dir: RunDir, elapsed_offset: float = 0.0, resumed_tokens: int = 0):
        self.run_dir = run_dir
        self.elapsed_offset = elapsed_offset
        self.resumed_tokens = resumed_tokens  # tokens seen before the checkpoint this process resumed from
        self.tokens_offset = 0
        self.start = None
        self.last_time = None
        self.last_tokens = None
        self.rows = 0

    def on_train_begin(self, args, state, control, **kw):
        self.start = self.last_time = time.perf_counter()

    def exclude_time(self, seconds: float) -> None:
        """Evaluation during training took `seconds`: keep them out of tokens_per_s (elapsed_s still counts them)."""
        if self.last_time is not None:
            self.last_time += seconds

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = logs.get("num_tokens")
        if tokens is not None and self.rows == 0 and self.resumed_tokens and tokens < self.resumed_tokens:
            # TRL's token counter is not in its checkpoints: it restarts at 0 on resume, so continue the count.
            self.tokens_offset = self.resumed_tokens
        tokens = int(tokens) + self.tokens_offset if tokens is not None else None
        rate = None
        if tokens is not None and self.last_tokens is not None and now > self.last_time:
            rate = (tokens - self.last_tokens) / (now - self.last_time)
        elif tokens is not None and self.rows == 0 and now > self.last_time:
            rate = (tokens - max(self.tokens_offset, self.resumed_tokens)) / (now - self.last_time)
        loss = float(logs["loss"])
        row = {
            "step": state.global_step,
            "epoch": round(float(state.epoch or 0.0), 4),
            "loss": loss if math.isfinite(loss) else None,
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "num_tokens": tokens,
            "tokens_per_s": round(rate, 1) if rate is not None else None,
            "elapsed_s": round(self.elapsed_offset + now - self.start, 2),
        }
        self.run_dir.append_metrics(row)
        self.last_time, self.last_tokens = now, tokens
        self.rows += 1
