"""The shipped reference sweep reproduces the study's runs (issue 15, point 6), through the real CLI, and the eval
entries sjp@validation / sjp@test that select on validation and report on test (point 5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lexfine.cli import app
from lexfine.config import RunConfig
from lexfine.errors import ConfigError
from lexfine.eval.tasks import eval_key, split_entry
from lexfine.sweep.local import eval_args

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "configs" / "slurm" / "cscs_alps.yaml"


def _profile(tmp_path: Path, **over) -> Path:
    data = yaml.safe_load(PROFILE.read_text())
    data.update(over)
    p = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _dry_run(tmp_path: Path, monkeypatch, profile: Path):
    monkeypatch.chdir(tmp_path)  # the sweep's output_dir (sweeps/) is relative to the working directory
    return CliRunner().invoke(app, ["sweep", "submit", str(REPO / "configs/sweep/reference_study_8b.yaml"),
                                    "--slurm-profile", str(profile), "--dry-run"])


def _configs(tmp_path: Path) -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((tmp_path / "sweeps/ref8b/configs").glob("*.yaml"))]


@pytest.mark.parametrize("nodes, gpus", [(1, 4), (2, 4), (1, 1)])
def test_reference_sweep_dry_run_keeps_the_study_settings_on_any_gpu_count(tmp_path, monkeypatch, nodes, gpus):
    res = _dry_run(tmp_path, monkeypatch, _profile(tmp_path, nodes=nodes, gpus_per_node=gpus))
    assert res.exit_code == 0, res.output
    cfgs = _configs(tmp_path)
    assert len(cfgs) == 33
    for c in cfgs:
        t, launch = c["train"], c["launch"]
        assert t["batch_size"] * t["grad_accum"] * launch["num_processes"] == 128
        assert launch["num_processes"] == nodes * gpus and c["data"]["loss_on"] == "all"
        assert t["lr_scheduler"] == "constant" and t["warmup_ratio"] == 0 and t["epochs"] == 1
        assert c["eval"] == ["sjp@validation", "sjp@test", "lexam_mcq4"]
        if c["method"] == "lora":
            assert c["lora"]["alpha"] == 32
    scripts = list((tmp_path / "sweeps/ref8b/slurm").glob("*.eval.sbatch"))
    text = scripts[0].read_text()
    assert "--task sjp@validation" in text and "--task sjp@test" in text


def test_a_gpu_count_that_does_not_divide_the_global_batch_is_refused(tmp_path, monkeypatch):
    res = _dry_run(tmp_path, monkeypatch, _profile(tmp_path, gpus_per_node=3))
    assert res.exit_code == 2
    assert "global_batch 128 is not a multiple of train.batch_size 4 x 3 processes" in res.output
    assert "Traceback" not in res.output


def test_split_eval_entries():
    assert split_entry("sjp@validation", "loglik") == ("sjp@validation", "loglik")
    assert split_entry("sjp@test:generate", "loglik") == ("sjp@test", "generate")
    assert eval_key("sjp@validation", "loglik") == "sjp-validation-loglik" and eval_key("sjp", "loglik") == "sjp-loglik"
    for bad in ("lexam_mcq4@test", "sjp@dev"):
        with pytest.raises(ConfigError, match="sjp@validation"):
            split_entry(bad, "loglik")
    cfg = RunConfig(eval=["sjp", "sjp@validation", "sjp@test:generate"], eval_options={"sjp_split": "all"})
    args = eval_args(cfg, "sjp@validation")
    assert args[:2] == ["--task", "sjp@validation"] and "--split" not in args  # the task names its split
    assert eval_args(cfg, "sjp")[args.index("--task"):][:2] == ["--task", "sjp"] and "--split" in eval_args(cfg, "sjp")
    with pytest.raises(ValueError, match="sjp@validation or sjp@test"):
        RunConfig(eval=["sjp@later"])


def test_planned_ids_are_the_ids_submitted_on_the_alps_profile(tmp_path, monkeypatch):
    """`sweep plan`/`status` plan for one 4-GPU node: the ids `submit` writes there are the same runs."""
    from lexfine.sweep.grid import load_sweep

    res = _dry_run(tmp_path, monkeypatch, PROFILE)
    assert res.exit_code == 0, res.output
    planned = {r.run_id for r in load_sweep(REPO / "configs/sweep/reference_study_8b.yaml").runs}
    assert {p.stem for p in (tmp_path / "sweeps/ref8b/configs").glob("*.yaml")} == planned
