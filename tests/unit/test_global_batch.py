"""One run id, one training: the global batch (batch x accumulation x processes) is part of the run id, the
manifest records it, and a launch or a resume with another global batch is refused before anything is written."""

import hashlib
import json

import pytest
from typer.testing import CliRunner

from lexfine.config import ID_EXCLUDE, build_config
from lexfine.errors import ConfigError
from lexfine.rundir import RunDir
from lexfine.train.global_batch import check_launch, recorded_global_batch
from tests.unit.test_checkpoints import make_ckpt


def test_the_world_size_changes_the_run_id_but_not_the_node_split():
    one = build_config({}, ["launch.num_processes=1"])
    eight = build_config({}, ["launch.num_processes=8"])
    two_by_four = build_config({}, ["launch.num_processes=8", "launch.num_machines=2", "launch.strategy=zero3"])
    assert one.run_id() != eight.run_id()
    assert eight.run_id() == two_by_four.run_id()
    assert (one.global_batch, eight.global_batch) == (4, 32)
    # the same global batch from another per-device split is another config (batch_size is hashed as before)
    assert build_config({}, ["train.batch_size=32"]).run_id() != eight.run_id()
    # single-process run ids are what they were before the global batch was hashed
    payload = one.model_dump(mode="json", exclude={**ID_EXCLUDE, "lora": {"quantize"}})  # (lora.quantize came later)
    old = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:8]
    assert one.run_hash() == old


def test_config_show_prints_another_run_directory_per_world_size(tmp_path):
    from lexfine.cli import app

    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: gb\ntrain: {batch_size: 2, grad_accum: 4}\n")
    out = {}
    for n in (1, 8):
        res = CliRunner().invoke(app, ["config", "show", str(cfg), f"launch.num_processes={n}"])
        assert res.exit_code == 0, res.output
        lines = res.output.strip().splitlines()
        assert lines[-1].startswith("# run directory: runs/gb-")
        assert f"# global batch: {2 * 4 * n} " in lines[-2]
        out[n] = lines[-1]
    assert out[1] != out[8]


def test_a_launch_with_another_process_count_is_refused(monkeypatch):
    cfg = build_config({}, ["launch.num_processes=4"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"launch.num_processes=4 but 2 processes .*launch.num_processes=2"):
        check_launch(cfg, {}, None)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert check_launch(cfg, {}, None) == 16


def test_a_resume_with_another_global_batch_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = build_config({}, ["train.grad_accum=2"])  # global batch 8
    assert check_launch(cfg, {"global_batch": 8}, "checkpoint-10") == 8
    with pytest.raises(ConfigError, match=r"checkpoint-10 was trained with global batch 32, this launch has 8") as e:
        check_launch(cfg, {"global_batch": 32}, "checkpoint-10")
    assert "\n" not in str(e.value)
    # a manifest from before global_batch was recorded: batch x accumulation x the world size it recorded
    assert recorded_global_batch({"world_size": 4}, cfg) == 32
    with pytest.raises(ConfigError, match="global batch 32"):
        check_launch(cfg, {"world_size": 4}, "checkpoint-10")
    assert check_launch(cfg, {"global_batch": 32}, None) == 8  # nothing to resume: a fresh start


def test_train_refuses_the_resume_before_touching_the_run(tmp_path, monkeypatch):
    from lexfine.train import run

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = build_config({}, [f"output_dir={tmp_path}"])
    rd = RunDir(cfg.run_dir())
    rd.create(cfg.to_yaml(), cfg.run_id())
    rd.set_status("interrupted", world_size=8)  # written by older code, trained on 8 processes
    make_ckpt(rd.checkpoints, 5)  # a complete checkpoint: resume only takes those (lexfine.checkpoints)
    before = rd.manifest_path.read_text()
    with pytest.raises(ConfigError, match="global batch 32, this launch has 4"):
        run(cfg)
    assert rd.manifest_path.read_text() == before
