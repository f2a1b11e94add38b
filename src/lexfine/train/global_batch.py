"""One run id, one training: the global batch (batch_size x grad_accum x processes) a run trains with.

The global batch is part of the run id (config.RunConfig.run_hash), so a config launched on 1 GPU and on 8 GPUs
names two run directories. What remains to check happens at start-up, on every rank, before anything is written:
- the processes actually started (WORLD_SIZE) are the launch.num_processes the run id was computed from;
- a run that resumes from a checkpoint resumes with the global batch that checkpoint was trained with (the
  manifest records it; older manifests recorded the world size). Another batch would change the optimisation
  and the position in the data, silently.
"""

from __future__ import annotations

from lexfine.config import RunConfig
from lexfine.errors import ConfigError
from lexfine.train.sft import world_size


def recorded_global_batch(manifest: dict, cfg: RunConfig) -> int | None:
    """The global batch a run directory was trained with: the manifest's `global_batch`, or for manifests written
    before lexfine recorded it, batch_size x grad_accum (hashed, so equal to cfg's) x its recorded world size."""
    if isinstance(manifest.get("global_batch"), int):
        return manifest["global_batch"]
    ws = manifest.get("world_size")
    if isinstance(ws, int) and ws >= 1:
        return cfg.train.batch_size * cfg.train.grad_accum * ws
    return None


def check_launch(cfg: RunConfig, manifest: dict, resuming_from: str | None) -> int:
    """Refuse (one line) a launch whose process count differs from launch.num_processes, or a resume with another
    global batch than the checkpoint's. Returns the global batch of this training."""
    ws = world_size()
    if ws != cfg.launch.num_processes:
        raise ConfigError(
            f"launch.num_processes={cfg.launch.num_processes} but {ws} processes are training (WORLD_SIZE={ws}): the "
            f"global batch is part of the run id; set launch.num_processes={ws} (or --num-processes {ws})")
    current = cfg.global_batch
    if resuming_from is None:
        return current
    before = recorded_global_batch(manifest, cfg)
    if before is not None and before != current:
        t = cfg.train
        raise ConfigError(
            f"run {cfg.run_id()}: {resuming_from} was trained with global batch {before}, this launch has {current} "
            f"(train.batch_size {t.batch_size} x train.grad_accum {t.grad_accum} x {ws} processes): resuming would "
            f"change the batch and the data position; launch it with global batch {before}, or train it again with "
            "--force")
    return current
