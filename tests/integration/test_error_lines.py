"""Damaged files and a full disk through the real CLI: exit code 2, one line naming the file and the fix, no traceback
(issue 16, item 6)."""

import errno
import json
from pathlib import Path

import pytest
import yaml

from lexfine.cli import main
from lexfine.config import validate
from lexfine.rundir import RunDir


def _one_line(argv, capsys, logs: bool = False) -> str:
    """The one error line; with `logs` (training), other stderr lines are progress logs and bars."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    if logs:
        lines = [line[line.index("error: "):] for line in lines if "error: " in line]  # after an unclosed tqdm bar
    assert e.value.code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# files that are not UTF-8 ------------------------------------------------------------------
def test_config_file_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: r\ndata: {system_prompt: Vous êtes juge}\n".encode("latin-1"))
    for argv in (["config", "show", str(path)], ["train", str(path), "--dry-run"]):
        line = _one_line(argv, capsys)
        assert str(path) in line and "UTF-8" in line and "0xea on line 2" in line


def test_sweep_file_not_utf8(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_bytes("name: s\n# coût\ngrid: {train.lr: [1.0e-4]}\n".encode("latin-1"))
    line = _one_line(["sweep", "plan", str(path)], capsys)
    assert str(path) in line and "UTF-8" in line


# a run directory with damaged files ----------------------------------------------------------
@pytest.fixture
def lora_run(tmp_path, tiny_config):
    """A completed-looking LoRA run directory (no training: the damage is found before any model is loaded)."""
    cfg = validate(tiny_config())
    rd = RunDir(cfg.run_dir())
    rd.create(cfg.to_yaml(), cfg.run_id())
    rd.set_status("completed")
    rd.adapter_dir.mkdir()
    (rd.adapter_dir / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": cfg.model}))
    return rd


def _save_adapter(path):
    import torch
    from safetensors.torch import save_file

    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(4, 64)}, str(path))


@pytest.mark.parametrize("damage,needle", [
    ("missing", "has no weights file"),
    ("empty", "are empty"),
    ("truncated", "truncated or corrupt"),
])
def test_damaged_adapter(lora_run, tmp_path, capsys, damage, needle):
    weights = lora_run.adapter_dir / "adapter_model.safetensors"
    if damage != "missing":
        _save_adapter(weights)
        data = weights.read_bytes()
        weights.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    for argv in (["eval", str(lora_run.path), "--task", "sjp", "--limit", "2"],
                 ["export", str(lora_run.path), "--out", str(tmp_path / "exported")]):
        line = _one_line(argv, capsys)
        assert needle in line and str(lora_run.adapter_dir) in line and "Repo id" not in line


@pytest.mark.parametrize("content", ["[1, 2]", "{\"status\": ", "\"completed\"", b"\xff\xfe"])
def test_manifest_not_a_json_object(lora_run, tmp_path, tiny_config, capsys, content):
    if isinstance(content, bytes):
        lora_run.manifest_path.write_bytes(content)
    else:
        lora_run.manifest_path.write_text(content)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config()))
    line = _one_line(["train", str(config)], capsys)
    assert "manifest.json" in line and str(lora_run.path) in line

    line = _one_line(["report", str(lora_run.path), "--out", str(tmp_path / "report")], capsys)
    assert "manifest.json" in line and str(lora_run.path) in line

    sweep = tmp_path / "s.yaml"  # a sweep whose one run is this run directory
    sweep.write_text(yaml.safe_dump({"name": "s", "output_dir": str(tmp_path / "runs"),
                                     "base": {k: v for k, v in tiny_config().items() if k != "name"},
                                     "grid": {"train.lr": [1e-3]}}))
    plan = main_json(["sweep", "plan", str(sweep), "--json"], capsys)
    Path(plan["run_dir"]).parent.mkdir(parents=True)
    lora_run.path.rename(plan["run_dir"])
    line = _one_line(["sweep", "status", str(sweep), "--no-slurm"], capsys)
    assert "manifest.json" in line


def main_json(argv, capsys) -> dict:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert not e.value.code
    return json.loads(capsys.readouterr().out.strip().splitlines()[0])


# a SLURM profile value with an unbalanced quote ------------------------------------------------
def test_profile_unbalanced_quote(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "output_dir": str(tmp_path / "runs"), "eval": ["sjp"],
                                     "base": {"train": {"max_steps": 2}}, "grid": {"train.lr": [1e-4]}}))
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"account": "a", "partition": "p", "time": "01:00:00", "nodes": 1,
                                       "gpus_per_node": 1, "lexfine": 'uv run "lexfine'}))
    line = _one_line(["sweep", "submit", str(sweep), "--slurm-profile", str(profile), "--dry-run"], capsys)
    assert "lexfine" in line and "unbalanced quote" in line and str(profile) in line


# a full disk during training -------------------------------------------------------------------
def test_full_disk_during_training(tmp_path, tiny_config, capsys, monkeypatch):
    cfg = tiny_config(train__max_steps=2, train__save_steps=1, data__limit=4, train__max_length=160)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    rd = RunDir(validate(cfg).run_dir())
    original = RunDir.append_metrics

    def full_at_step_2(self, row):
        if row["step"] == 2:  # checkpoint-1 is complete by now (a step logs, then saves)
            raise OSError(errno.ENOSPC, "No space left on device", str(self.metrics_path))
        original(self, row)

    monkeypatch.setattr(RunDir, "append_metrics", full_at_step_2)
    line = _one_line(["train", str(config)], capsys, logs=True)
    assert "No space left on device" in line and str(rd.metrics_path) in line
    assert "last complete checkpoint" in line and "run the same command again" in line
    assert (rd.checkpoints / "checkpoint-1" / "trainer_state.json").is_file()
    assert rd.status == "failed"
