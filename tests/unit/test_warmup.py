"""train.warmup_ratio: it warms up with the default constant schedule, and 1.0 means the whole run (transformers 5
reads a warmup_steps >= 1 as a step count: 1.0 was one step)."""

import pytest
import torch
from transformers import get_scheduler

from lexfine.config import build_config
from lexfine.rundir import RunDir
from lexfine.train.sft import build_args


def lrs(tmp_path, ratio, scheduler="constant", steps=10):
    cfg = build_config({}, [f"train.warmup_ratio={ratio}", f"train.lr_scheduler={scheduler}", "train.lr=1.0",
                            f"output_dir={tmp_path}"])
    args = build_args(cfg, RunDir(cfg.run_dir()))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(steps),
                          num_training_steps=steps)
    out = []
    for _ in range(steps):
        out.append(round(sched.get_last_lr()[0], 6))
        opt.step()
        sched.step()
    return args, out


def test_warmup_with_the_constant_schedule_warms_up(tmp_path):
    args, lr = lrs(tmp_path, 0.2)
    assert args.lr_scheduler_type == "constant_with_warmup"
    assert lr == [0.0, 0.5] + [1.0] * 8
    # without warm-up the constant schedule stays; other schedules keep their name
    args, lr = lrs(tmp_path, 0.0)
    assert args.lr_scheduler_type == "constant" and lr == [1.0] * 10
    args, lr = lrs(tmp_path, 0.5, scheduler="linear")
    assert args.lr_scheduler_type == "linear" and lr[:6] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


@pytest.mark.parametrize("steps", [7, 10, 467])
def test_warmup_ratio_one_is_the_whole_run(tmp_path, steps):
    args, lr = lrs(tmp_path, 1.0, steps=steps)
    assert args.get_warmup_steps(steps) == steps
    assert lr == [round(i / steps, 6) for i in range(steps)]  # linear from 0, never the peak within the run
