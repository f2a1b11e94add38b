"""A real divergence on the CPU: full fine-tuning of the tiny Apertus (real architecture code) at an absurd
learning rate through the `lexfine train` CLI. (The embedded SmolLM2 collapses to a uniform output at lr 1e6 with
a finite loss of ln(vocab) and a zero gradient, and a full SmolLM2 step takes seconds here; the tiny model's
first Adam step at lr 1e30 overflows its activations: NaN from step 2 on, as a real blow-up does.)"""

import os
import subprocess
import sys

import pytest
import yaml

from lexfine.config import validate
from lexfine.errors import EXIT_DIVERGED
from lexfine.rundir import RunDir
from lexfine.train import run
from lexfine.train.divergence import TrainingDiverged


def diverging(tiny_config, **launch) -> dict:
    return tiny_config(method="full", data={"limit": 8}, launch=launch or {"num_processes": 1},
                       train={"max_steps": 5, "batch_size": 1, "max_length": 192, "lr": 1e30, "save_steps": 1,
                              "save_total_limit": 2, "logging_steps": 1, "gradient_checkpointing": False,
                              "max_nonfinite_steps": 2, "group_by_length": False})


def lexfine_train(tree: dict, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "diverge.yaml"
    path.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", "from lexfine.cli import main; main()", "train", str(path), *extra],
                          capture_output=True, text=True, timeout=900, env=env)


def test_full_finetune_at_an_absurd_lr_ends_diverged(tiny_config, tmp_path):
    tree = diverging(tiny_config)
    res = lexfine_train(tree, tmp_path)
    assert res.returncode == EXIT_DIVERGED == 65, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged") and "step 3" in last and "checkpoint-1" in last

    cfg = validate(tree)
    rd = RunDir(cfg.run_dir())
    m = rd.manifest()
    assert (m["status"], m["diverged_at_step"], m["last_finite_step"]) == ("diverged", 3, 1)
    assert m["last_finite_checkpoint"] == "checkpoints/checkpoint-1"
    assert [p.name for p in rd.checkpoints.glob("checkpoint-*")] == ["checkpoint-1"]  # NaN states never saved
    assert not rd.model_dir.exists()
    rows = rd.metrics()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] > 1 and "nonfinite" not in rows[0]
    for r in rows[1:]:  # the NaN steps: flagged, null, never the 0.0 transformers' filter logged
        assert r["loss"] is None and r["nonfinite"] == ["loss", "grad_norm"]
    assert not any(r["loss"] == 0.0 for r in rows)

    # running it again does not train it again: same answer, nothing touched
    with pytest.raises(TrainingDiverged, match="diverged before .*--force"):
        run(cfg)
    assert rd.manifest()["status_time"] == m["status_time"]


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step(tiny_config, tmp_path):
    # a rank that went on training would hang the other in its next collective: exit 65 means they agreed
    tree = diverging(tiny_config, strategy="ddp", num_processes=2)
    res = lexfine_train(tree, tmp_path, "--launcher", "torchrun")
    assert res.returncode == EXIT_DIVERGED, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: training diverged")
    rd = RunDir(validate(tree).run_dir())
    m = rd.manifest()
    assert (m["status"], m["diverged_at_step"], m["global_batch"], m["world_size"]) == ("diverged", 3, 2, 2)
    assert [r["step"] for r in rd.metrics()] == [1, 2, 3]  # rank 0 alone writes
    assert [p.name for p in rd.checkpoints.glob("checkpoint-*")] == ["checkpoint-1"]
