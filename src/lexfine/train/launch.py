"""Starting processes: `lexfine train` on one process, or through `accelerate launch` for several GPUs.

Only process start-up lives here; sharding (DDP, ZeRO, FSDP2) comes from the run config (see strategies.py).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

ACCELERATE_DIR = Path(__file__).parent / "accelerate"
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp2")


def accelerate_config_path(strategy: str) -> Path:
    """The shipped accelerate config for a strategy. They only start processes (one per GPU, bf16); the
    Trainer applies DeepSpeed/FSDP2 from the run config, so every strategy shares the multi-GPU launcher."""
    if strategy not in STRATEGIES and strategy != "none":
        raise ValueError(f"unknown strategy {strategy!r}; allowed: none, {', '.join(STRATEGIES)}")
    return ACCELERATE_DIR / "multi_gpu.yaml"


def in_distributed_launch() -> bool:
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def pin_single_process(num_processes: int) -> None:
    """One process on a multi-GPU node: the Trainer would wrap the model in nn.DataParallel, which TRL refuses.
    Called by the entry points (never by library code) before CUDA is initialised."""
    if num_processes == 1 and not in_distributed_launch() and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"


def local_command(config_path: str | Path, num_processes: int, launcher: str = "accelerate",
                  num_machines: int = 1, strategy: str = "none") -> list[str]:
    """The command that trains a resolved config on this machine with `num_processes` processes. Refuses, in one
    line and before any process starts, what cannot run here (several machines, an unknown launcher, a strategy
    whose library is missing)."""
    from lexfine.errors import ConfigError
    from lexfine.train.strategies import require_strategy

    if num_machines > 1:
        raise ConfigError(f"launch.num_machines={num_machines} needs one launcher per node: submit it with "
                          "`lexfine sweep submit SWEEP --slurm-profile P` (SLURM)")
    if launcher not in ("accelerate", "torchrun"):
        raise ConfigError(f"launcher {launcher!r} is not accelerate or torchrun")
    require_strategy(strategy)
    cfg = str(config_path)
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
                "-m", "lexfine.train", cfg]
    # A free port, not accelerate's fixed 29500: two launches on one host (a sweep's runs side by side, or a run
    # restarted right after its processes were killed) would otherwise meet on the same rendezvous port.
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config_path("ddp")),
            "--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", str(free_port()),
            "-m", "lexfine.train", cfg]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shell(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
