"""Non-finite training steps: record them as such, stop a run that keeps producing them, keep its last finite
checkpoint.

transformers' default `logging_nan_inf_filter=True` replaces a NaN/inf loss by the running mean of the logged
loss (0.0 when the first step of a logging window is non-finite), so a blown-up run looks like a perfect one.
lexfine turns the filter off (train/sft.py) and this callback watches the logged values instead:

- a logged row whose loss or grad norm is not finite counts its optimizer steps (one with logging_steps 1) as
  non-finite; a finite row resets the count;
- a non-finite step is never checkpointed (its save is cancelled; save steps are always logged first, so the
  decision is made on the loss of the very step that would be saved);
- after `train.max_nonfinite_steps` consecutive non-finite steps, or when training ends on one, the run is
  `diverged`: training stops, the manifest records `diverged_at_step`, `last_finite_step` and
  `last_finite_checkpoint`, and `lexfine train` exits with errors.EXIT_DIVERGED (65).

The logged loss is the mean over all ranks (the Trainer gathers it) and the grad norm is global, so every rank
decides alike; an all-reduce makes it certain, so all ranks stop at the same step.
"""

from __future__ import annotations

import logging
import math
import re
import shutil

from transformers import TrainerCallback

from lexfine.errors import EXIT_DIVERGED, LexfineError

log = logging.getLogger("lexfine.train")
WATCHED = ("loss", "grad_norm")


def nonfinite_fields(logs: dict) -> list[str]:
    """The watched keys of a log whose value is a number that is not finite (NaN, inf)."""
    bad = []
    for key in WATCHED:
        v = logs.get(key)
        try:
            if v is not None and not math.isfinite(float(v)):
                bad.append(key)
        except (TypeError, ValueError):
            continue
    return bad


class TrainingDiverged(LexfineError):
    """Training stopped on non-finite losses or gradient norms; the run is marked `diverged`."""

    exit_code = EXIT_DIVERGED


class DivergenceCallback(TrainerCallback):
    """Counts consecutive non-finite optimizer steps from the logged loss and grad norm and stops training after
    `max_consecutive` of them. `diverged_at`: the step training stopped at (None: not diverged);
    `last_finite_step`: the last logged step whose values were finite. Give it the trainer (`attach`) so that
    it can reset the Trainer's loss accumulator after a NaN (`tr_loss -= tr_loss` keeps a NaN forever)."""

    def __init__(self, max_consecutive: int = 3):
        self.max_consecutive = max(1, int(max_consecutive))
        self.consecutive = 0
        self.last_logged = 0
        self.last_finite_step: int | None = None
        self.diverged_at: int | None = None
        self.trainer = None

    def attach(self, trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kw):
        self.last_logged = state.global_step  # resumed runs start counting at their checkpoint
        if state.global_step and self.last_finite_step is None:
            self.last_finite_step = state.global_step  # checkpoints only ever hold finite steps

    def on_step_end(self, args, state, control, **kw):
        # A checkpoint is written only after its step's loss was seen: force a log on every save step.
        if control.should_save:
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs:
            return control  # the end-of-training summary, evaluation logs
        steps = max(1, state.global_step - self.last_logged)
        self.last_logged = state.global_step
        from lexfine.train.preemption import any_rank

        bad = any_rank(bool(nonfinite_fields(logs)))
        if not bad:
            self.consecutive = 0
            self.last_finite_step = state.global_step
            return control
        self.consecutive += steps
        control.should_save = False  # never checkpoint a non-finite state
        self._reset_loss_accumulator()
        if state.is_world_process_zero:
            log.warning("step %d: non-finite %s (%d consecutive non-finite step(s), limit %d)", state.global_step,
                        " and ".join(nonfinite_fields(logs)) or "value on another rank", self.consecutive,
                        self.max_consecutive)
        if self.consecutive >= self.max_consecutive:
            self.diverged_at = state.global_step
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kw):
        # Training ran to its end on non-finite steps: the final weights are not to be trusted. (A preemption
        # stop is not an end: its save was cancelled, so the resume replays from the last finite checkpoint.)
        if self.consecutive and self.diverged_at is None and state.max_steps and state.global_step >= state.max_steps:
            self.diverged_at = state.global_step

    def _reset_loss_accumulator(self) -> None:
        tr_loss = getattr(self.trainer, "_tr_loss", None)
        if tr_loss is not None and hasattr(tr_loss, "zero_"):
            import torch

            if not bool(torch.isfinite(tr_loss).all()):
                tr_loss.zero_()


def _step_of(path) -> int | None:
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m else None


def record_divergence(rd, cb: DivergenceCallback, main: bool) -> TrainingDiverged:
    """Mark the run diverged (main process): drop any checkpoint newer than the last finite step, keep the
    others. Returns the error to raise (one line: where it diverged, what was kept, what to do)."""
    ckpts = []
    if rd.checkpoints.is_dir():
        ckpts = sorted((s, p) for p in rd.checkpoints.glob("checkpoint-*") if (s := _step_of(p)) is not None)
    finite = cb.last_finite_step or 0
    kept = [p for s, p in ckpts if s <= finite]
    last = kept[-1] if kept else None
    if main:
        for s, p in ckpts:
            if s > finite:
                shutil.rmtree(p, ignore_errors=True)
    kept_text = f"last finite checkpoint kept: {rd.checkpoints.name}/{last.name}" if last else "no finite checkpoint"
    msg = (f"training diverged: non-finite loss or gradient norm for {cb.consecutive} consecutive step(s) up to "
           f"step {cb.diverged_at} (train.max_nonfinite_steps={cb.max_consecutive}); {kept_text}. Lower train.lr "
           "(or raise warm-up) and train it again with --force")
    if main:
        rd.set_status("diverged", diverged_at_step=cb.diverged_at, last_finite_step=cb.last_finite_step,
                      last_finite_checkpoint=f"{rd.checkpoints.name}/{last.name}" if last else None, error=msg)
    return TrainingDiverged(msg)
