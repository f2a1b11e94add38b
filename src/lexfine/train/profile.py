"""`train.profile_steps=[FIRST, LAST]`: torch.profiler over those optimizer steps of a training run, written to the
run's `profile/` folder by the main process (lexfine.profiling says what is in it). Not in the run id."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

from lexfine.profiling import ProfileWindow

log = logging.getLogger("lexfine.train")


class ProfileCallback(TrainerCallback):
    """Starts the profiler at the beginning of optimizer step `first`, stops it at the end of step `last`."""

    def __init__(self, out_dir: Path, first: int, last: int):
        self.window = ProfileWindow(out_dir, first, last)

    def on_step_begin(self, args, state, control, **kw):
        self.window.begin(state.global_step + 1, state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kw):
        self.window.end(state.global_step, state.num_input_tokens_seen)

    def on_train_end(self, args, state, control, **kw):
        w = self.window
        if w.prof is not None:  # the run ended inside the window: keep what was recorded
            w.end(state.global_step, state.num_input_tokens_seen, force=True)
        elif not w.done:
            log.warning("train.profile_steps=[%d, %d]: this process never began step %d (it ended, or resumed past "
                        "it, at step %d); nothing profiled", w.first, w.last, w.first, state.global_step)
