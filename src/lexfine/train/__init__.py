"""Training: `run(cfg)` trains in this process; `python -m lexfine.train CONFIG [k=v ...]` is the entry point
for launchers (accelerate launch -m lexfine.train, torchrun -m lexfine.train, srun)."""

from __future__ import annotations


def run(cfg):
    from lexfine.train.diskfull import full_disk_is_one_line
    from lexfine.train.sft import run as _run

    with full_disk_is_one_line(cfg.run_dir()):
        return _run(cfg)


__all__ = ["run"]
