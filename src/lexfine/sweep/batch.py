"""A sweep's global batch, kept whatever the GPU count: `global_batch: 128` in a sweep file.

The global batch (per-device batch x gradient accumulation x processes) is what the optimizer sees, so it is part
of what the learning rate means: a sweep that sets it derives `train.grad_accum` for each run from its
`train.batch_size` and the processes that run it (`launch.num_processes` when planned or run locally; the SLURM
profile's nodes x GPUs per node when submitted). A GPU count that does not divide it is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from lexfine.config import RunConfig
from lexfine.errors import ConfigError


def grad_accum_for(global_batch: int, batch_size: int, processes: int) -> int:
    per_step = batch_size * processes
    if global_batch % per_step:
        fits = [p for p in range(1, global_batch // batch_size + 1) if global_batch % (batch_size * p) == 0]
        raise ConfigError(
            f"global_batch {global_batch} is not a multiple of train.batch_size {batch_size} x {processes} processes "
            f"= {per_step}; use a GPU count among {', '.join(map(str, fits))} or another train.batch_size")
    return global_batch // per_step


def check_global_batch(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"global_batch must be a positive integer (sequences per optimizer step), not {value!r}")
    return value


def fit(cfg: RunConfig, global_batch: int | None, processes: int | None = None,
        machines: int | None = None) -> RunConfig:
    """cfg on `processes` (default: its own launch.num_processes), grad_accum set to keep the global batch."""
    launch = cfg.launch
    if processes is not None:
        launch = launch.model_copy(update={"num_processes": processes, "num_machines": machines or 1})
    cfg = cfg.model_copy(update={"launch": launch})
    if global_batch is None:
        return cfg
    accum = grad_accum_for(global_batch, cfg.train.batch_size, launch.num_processes)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"grad_accum": accum})})


def for_resources(sweep, resources: Callable) -> object:
    """The sweep re-planned for the hardware that runs it: each run's launch set from resources(run) -> (nodes,
    processes per node) and, with a global batch, its grad_accum derived again (run ids follow the config)."""
    runs = []
    for run in sweep.runs:
        nodes, per_node = resources(run)
        try:
            cfg = fit(run.config, sweep.global_batch, nodes * per_node, nodes)
        except ConfigError as e:
            raise ConfigError(f"run {run.name}: {e}") from None
        runs.append(dataclasses.replace(run, config=cfg, run_id=cfg.run_id()))
    return dataclasses.replace(sweep, runs=runs)
