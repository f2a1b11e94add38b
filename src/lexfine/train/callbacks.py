"""Trainer callbacks: lexfine's own metrics log (metrics.jsonl), written by the main process only."""

from __future__ import annotations

import math
import time

from transformers import TrainerCallback

from lexfine.rundir import RunDir
from lexfine.train.divergence import nonfinite_fields


class MetricsCallback(TrainerCallback):
    """One row per logged step: step, epoch, loss, learning_rate, grad_norm, num_tokens, tokens_per_s, elapsed_s.

    `num_tokens` is the Trainer's `state.num_input_tokens_seen` (real, attention-mask tokens over all ranks; build_args
    turns it on). It is saved in every checkpoint's trainer_state.json and restored with it, so after a resume the
    count goes on exactly where the checkpoint left it (TRL's own counter restarts at 0). tokens/s is measured
    between two logs, so it covers data loading, forward, backward and the optimizer step.

    A non-finite (NaN/inf) loss or grad norm is written as null and named in `"nonfinite": ["loss", ...]` (the
    key is present only on such rows): JSON has no NaN, and a null must never be mistaken for a missing value,
    nor a blown-up step for a perfect one (transformers' NaN filter, which logged 0.0, is off: train/sft.py).
    """

    def __init__(self, run_dir: RunDir, elapsed_offset: float = 0.0, resumed_tokens: int = 0):
        self.run_dir = run_dir
        self.elapsed_offset = elapsed_offset
        # tokens in the metrics.jsonl row of the checkpoint resumed from: used only for a checkpoint whose
        # trainer_state.json holds no token count (written before lexfine counted tokens there)
        self.resumed_tokens = resumed_tokens
        self.tokens_offset = 0
        self.start = None
        self.last_time = None
        self.last_tokens = None

    def on_train_begin(self, args, state, control, **kw):
        self.start = self.last_time = time.perf_counter()
        if state.global_step > 0 and not state.num_input_tokens_seen and self.resumed_tokens:
            self.tokens_offset = self.resumed_tokens
        self.last_tokens = self._tokens(args, state)

    def _tokens(self, args, state) -> int | None:
        if getattr(args, "include_num_input_tokens_seen", "no") == "no":
            return None  # a Trainer built without build_args: no count
        return int(state.num_input_tokens_seen) + self.tokens_offset

    def exclude_time(self, seconds: float) -> None:
        """Evaluation during training took `seconds`: keep them out of tokens_per_s (elapsed_s still counts them)."""
        if self.last_time is not None:
            self.last_time += seconds

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = self._tokens(args, state)
        rate = None
        if tokens is not None and self.last_tokens is not None and now > self.last_time:
            rate = (tokens - self.last_tokens) / (now - self.last_time)
        loss = float(logs["loss"])
        bad = nonfinite_fields(logs)
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
        if bad:
            row["nonfinite"] = bad
        self.run_dir.append_metrics(row)
        self.last_time, self.last_tokens = now, tokens
