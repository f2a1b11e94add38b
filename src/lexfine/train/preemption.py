"""Preemption and time limits: on SIGUSR1/SIGTERM save a checkpoint at the next step boundary, stop, requeue.

SLURM sends SIGUSR1 before the time limit when the job asks for it (`#SBATCH --signal=USR1@120`) and SIGTERM on
preemption. The handler only sets a flag (nothing else is safe inside a signal handler); at the next optimizer
step every rank agrees on the flag (an all-reduce MAX, so all ranks save and stop at the same step, which ZeRO-3
and FSDP checkpoints need), the Trainer saves a resumable checkpoint and stops. The trainer then marks the run
`interrupted` and calls `requeue_if_preempted`; the requeued job runs the same command, which resumes.

Under `lexfine sweep submit` the batch script runs `scontrol requeue` itself (LEXFINE_REQUEUE=batch): inside a
container the SLURM client tools are often missing, and the batch script runs on the host.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading

from transformers import TrainerCallback

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
log = logging.getLogger("lexfine.train")


class PreemptionCallback(TrainerCallback):
    """Turns SIGUSR1/SIGTERM into "save a checkpoint and stop" at the next step end, the same step on all ranks.

    `received`: a signal arrived in this process. `preempted`: training was stopped because of it (a checkpoint
    was saved at that step). Handlers are installed on construction (main thread only) and chain to the
    handlers that were there before; `uninstall()` restores them.
    """

    def __init__(self, signals=SIGNALS, install: bool = True):
        self.signals = tuple(signals)
        self.received = False
        self.signum: int | None = None
        self.preempted = False
        self._previous: dict[int, object] = {}
        if install:
            self.install()

    # signal handling ---------------------------------------------------------------------
    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption handlers not installed: not on the main thread")
            return False
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, frame):
        self.received = True
        self.signum = signum
        prev = self._previous.get(signum)
        # Chain to a Python handler that was there before; never to SIG_DFL (that would kill the process
        # before the checkpoint) nor SIG_IGN.
        if callable(prev) and prev not in (signal.SIG_DFL, signal.SIG_IGN):
            prev(signum, frame)

    # agreement across ranks --------------------------------------------------------------
    def _agree(self) -> bool:
        return any_rank(self.received)

    # trainer hooks -----------------------------------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        # Every rank reaches this point once per optimizer step, so the collective is matched on all ranks.
        if self._agree():
            if not self.preempted:
                log.warning("signal %s: saving a checkpoint at step %s and stopping",
                            self.signum or "(from another rank)", getattr(state, "global_step", "?"))
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
        return control


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (an all-reduce MAX; every rank must call it at the same
    point). Without torch.distributed, or with one process, the flag itself."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return flag
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _is_rank0(env) -> bool:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()
        else:
            rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")))
    except (ImportError, ValueError):
        rank = 0
    return rank == 0 and int(env.get("SLURM_NODEID", "0") or 0) == 0


def requeue_if_preempted(preempted: bool, env=None) -> bool:
    """`scontrol requeue $SLURM_JOB_ID` after a preemption checkpoint: under SLURM, on global rank 0 of node 0
    only, unless the batch script does it (LEXFINE_REQUEUE=batch) or it is switched off (LEXFINE_REQUEUE=0).
    Returns True when the job was requeued."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not preempted or not job or not _is_rank0(env):
        return False
    mode = env.get("LEXFINE_REQUEUE", "1").lower()
    if mode in ("0", "no", "false", "off", "batch"):
        if mode == "batch":
            log.info("preempted: the batch script requeues job %s", job)
        return False
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if not scontrol:
        log.warning("preempted, but scontrol is not available here: resubmit job %s to resume", job)
        return False
    out = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, (out.stderr or out.stdout).strip()[:200])
        return False
    log.warning("requeued job %s: it resumes from the checkpoint", job)
    return True
