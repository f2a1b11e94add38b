"""Preemption: on SIGUSR1/SIGTERM save a checkpoint at the next step boundary, stop, and requeue under SLURM."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

from transformers import TrainerCallback

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionCallback(TrainerCallback):
    def __init__(self, signals=SIGNALS):
        self.received = False
        self.preempted = False
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def _agree(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = self.received
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([1.0 if flag else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def on_step_end(self, args, state, control, **kw):
        if self._agree():
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
        return control


def requeue_if_preempted(preempted: bool) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    if not preempted or not job:
        return False
    if int(os.environ.get("RANK", "0")) != 0:
        return False
    subprocess.run(["scontrol", "requeue", job], check=False)
    return True
