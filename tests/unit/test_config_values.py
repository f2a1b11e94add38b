"""Bad training values fail when the config is validated (config show, --dry-run, sweep plan), in one line."""

import subprocess
import sys

import pytest

from lexfine.cli import main
from lexfine.config import _COMMON_OPTIMIZERS, _COMMON_SCHEDULERS, build_config
from lexfine.errors import ConfigError


@pytest.mark.parametrize("override,needles", [
    ("train.lr_scheduler=bogus", ["'bogus'", "cosine", "constant"]),
    ("train.optim=bogus", ["'bogus'", "adamw_torch"]),
    ("train.max_steps=0", ["train.max_steps", ": 0", "-1"]),
    ("train.max_steps=-5", ["-5", "-1"]),
    ("train.lr=inf", ["train.lr", "inf", "finite"]),
    ("train.lr=nan", ["train.lr", "nan", "finite"]),
    ("train.lr=0", ["train.lr"]),
    ("train.epochs=inf", ["train.epochs", "finite"]),
])
def test_bad_values_are_refused_at_config_show(override, needles, capsys):
    with pytest.raises(SystemExit) as e:
        main(["config", "show", "src/lexfine/configs/quickstart.yaml", override])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert all(n in err[0] for n in needles), err[0]


@pytest.mark.parametrize("override", ["train.max_steps=-1", "train.max_steps=1", "train.lr_scheduler=cosine",
                                      "train.lr_scheduler=warmup_stable_decay", "train.optim=adamw_torch_fused",
                                      "train.optim=adagrad"])
def test_good_values_pass(override):
    build_config({}, [override])


def test_fast_path_names_are_transformers_names():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    assert set(_COMMON_SCHEDULERS) <= {s.value for s in SchedulerType}
    assert set(_COMMON_OPTIMIZERS) <= {o.value for o in OptimizerNames}


def test_validating_common_values_does_not_import_transformers():
    code = ("import sys; from lexfine.config import build_config; "
            "build_config({}, ['train.lr_scheduler=cosine', 'train.optim=adamw_torch_fused']); "
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bad_value_in_a_sweep_grid_is_one_line_at_plan(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\nbase: {train: {max_steps: 2}}\ngrid:\n  train.lr_scheduler: [constant, bogus]\n")
    with pytest.raises(SystemExit) as e:
        main(["sweep", "plan", str(sweep)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'bogus'" in err[0] and "cosine" in err[0]


def test_max_steps_zero_is_refused_in_library_use():
    with pytest.raises(ConfigError, match="max_steps"):
        build_config({}, ["train.max_steps=0"])
