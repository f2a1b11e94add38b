"""Only complete checkpoints are resumed from (issue 16, item 1): validation of every layout the Trainer writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lexfine.checkpoints import checkpoint_problem, latest_complete
from lexfine.rundir import RunDir


def make_ckpt(root, step, layout="lora"):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    if layout == "lora":
        save_file({"w": torch.ones(4)}, str(d / "adapter_model.safetensors"))
        torch.save({"state": {}}, d / "optimizer.pt")
    elif layout == "full-sharded":
        save_file({"a": torch.ones(2)}, str(d / "model-00001-of-00002.safetensors"))
        save_file({"b": torch.ones(2)}, str(d / "model-00002-of-00002.safetensors"))
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
        torch.save({"state": {}}, d / "optimizer.pt")
    elif layout == "deepspeed":  # ZeRO: optimizer states live in global_step<N>/, named by `latest`
        save_file({"w": torch.ones(4)}, str(d / "adapter_model.safetensors"))
        (d / f"global_step{step}").mkdir()
        torch.save({"m": 1}, d / f"global_step{step}" / "mp_rank_00_model_states.pt")
        torch.save({"o": 1}, d / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        (d / "latest").write_text(f"global_step{step}")
    torch.save({"rng": 1}, d / "rng_state.pth")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


@pytest.mark.parametrize("layout", ["lora", "full-sharded", "deepspeed"])
def test_complete_checkpoints_of_every_layout_are_accepted(tmp_path, layout):
    assert checkpoint_problem(make_ckpt(tmp_path, 4, layout)) is None


def cut(path, keep=None):
    data = path.read_bytes()
    path.write_bytes(b"" if keep is None else data[:keep])


@pytest.mark.parametrize("damage, reason", [
    (lambda d: cut(d / "trainer_state.json"), "trainer_state.json is empty"),
    (lambda d: (d / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    (lambda d: (d / "trainer_state.json").write_text('{"global_step": 2}'), "global_step 2"),
    (lambda d: cut(d / "adapter_model.safetensors", 40), "adapter_model.safetensors is cut short"),
    (lambda d: cut(d / "optimizer.pt", 30), "optimizer.pt is cut short"),
    (lambda d: cut(d / "optimizer.pt"), "optimizer.pt is empty"),
    (lambda d: (d / "optimizer.pt").unlink(), "no optimizer state"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "no model or adapter weights"),
])
def test_incomplete_checkpoints_are_rejected_with_the_reason(tmp_path, damage, reason):
    d = make_ckpt(tmp_path, 4)
    damage(d)
    assert reason in checkpoint_problem(d)


def test_incomplete_deepspeed_and_sharded_checkpoints_are_rejected(tmp_path):
    ds = make_ckpt(tmp_path / "a", 4, "deepspeed")
    cut(ds / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert "is empty" in checkpoint_problem(ds)
    sh = make_ckpt(tmp_path / "b", 4, "full-sharded")
    (sh / "model-00002-of-00002.safetensors").unlink()
    assert "shards that are missing" in checkpoint_problem(sh)


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    rd = RunDir(tmp_path)
    make_ckpt(rd.checkpoints, 2)
    make_ckpt(rd.checkpoints, 4)
    cut(make_ckpt(rd.checkpoints, 6) / "trainer_state.json")
    assert rd.latest_checkpoint().name == "checkpoint-4"
    assert "skipping incomplete checkpoint checkpoint-6: trainer_state.json is empty" in caplog.text
    assert (rd.checkpoints / "checkpoint-6").is_dir()  # looking does not delete


def test_the_lock_holder_discards_broken_checkpoints_so_rotation_cannot_keep_them(tmp_path):
    """save_total_limit rotation keeps the newest checkpoint (by mtime, else by number): a broken checkpoint-6 left
    in place could survive while checkpoint-4, the only complete one, is rotated away."""
    make_ckpt(tmp_path, 4)
    cut(make_ckpt(tmp_path, 6) / "trainer_state.json")
    assert latest_complete(tmp_path, discard=True).name == "checkpoint-4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_no_complete_checkpoint_means_a_fresh_start(tmp_path):
    cut(make_ckpt(tmp_path, 2) / "trainer_state.json")
    assert latest_complete(tmp_path) is None
    assert latest_complete(tmp_path / "absent") is None


def test_a_fresh_start_after_a_broken_only_checkpoint_logs_every_step_once(tmp_path):
    from lexfine.train.sft import _resume_state

    rd = RunDir(tmp_path / "r")
    rd.create("name: r\n", "r-1")
    for s in (1, 2):
        rd.append_metrics({"step": s, "loss": 1.0})
    cut(make_ckpt(rd.checkpoints, 2) / "trainer_state.json")
    assert _resume_state(rd, main=True) == (None, 0.0, 0)
    assert rd.metrics() == [] and not (rd.checkpoints / "checkpoint-2").exists()
