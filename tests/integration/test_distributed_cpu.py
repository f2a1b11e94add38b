"""2-process data parallel training on a CPU (gloo), started by torchrun as a GPU launcher would start it.

The invariant (TRL tests/invariant style): 1 process x accumulation 2 and 2 processes x accumulation 1 see the
same samples per optimizer step and must give the same loss trajectory. Length grouping is off here: transformers
groups lengths per (per-device batch x accumulation), so the two layouts would see the samples in another order.
"""

import os
import subprocess
import sys

import pytest
import yaml

from lexfine.config import validate
from lexfine.rundir import RunDir
from lexfine.train import run
from lexfine.train.launch import local_command

pytestmark = pytest.mark.slow


def torchrun_two_processes(cfg, tmp_path) -> None:
    """Train `cfg` with 2 gloo processes under torchrun (the CPU stand-in for a 2-GPU launch)."""
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(local_command(path, 2, launcher="torchrun"), capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]


def test_two_processes_match_one_process_with_accumulation(tiny_config, tmp_path):
    single = run(validate(tiny_config(train__grad_accum=2, train__group_by_length=False,
                                      output_dir=str(tmp_path / "one"))))

    cfg = validate(tiny_config(train__grad_accum=1, train__group_by_length=False, output_dir=str(tmp_path / "two"),
                               launch={"strategy": "ddp", "num_processes": 2}))
    torchrun_two_processes(cfg, tmp_path)
    double = RunDir(cfg.run_dir())
    m = double.manifest()
    assert m["status"] == "completed" and m["world_size"] == 2
    assert [r["step"] for r in double.metrics()] == [1, 2, 3, 4]
    # every rank's tokens are counted once
    assert double.metrics()[-1]["num_tokens"] == single.metrics()[-1]["num_tokens"]
    one = [r["loss"] for r in single.metrics()]
    two = [r["loss"] for r in double.metrics()]
    assert two == pytest.approx(one, rel=2e-3)
    assert (double.adapter_dir / "adapter_model.safetensors").is_file()
    assert m["adapter_check"] == single.manifest()["adapter_check"] == {"modules": 12, "lora_B_nonzero": 12}
    assert sys.executable


def test_eval_during_with_two_processes(tiny_config, tmp_path):
    """Both ranks score their shard (5 cases: 3 + 2, uneven) and nobody hangs; rank 0's rows are what
    `lexfine eval` gives for the saved adapter."""
    from lexfine.eval import evaluate

    cfg = validate(tiny_config(train__group_by_length=False, output_dir=str(tmp_path / "two"),
                               eval_during={"every_steps": 2, "limit": 5},
                               launch={"strategy": "ddp", "num_processes": 2}))
    torchrun_two_processes(cfg, tmp_path)
    rd = RunDir(cfg.run_dir())
    rows = [r for r in rd.metrics() if "eval/lexam_mcq4/accuracy" in r]
    assert [r["step"] for r in rows] == [0, 2, 4] and rows[0]["eval/sjp/validation/n"] == 5
    assert [r["step"] for r in rd.train_metrics()] == [1, 2, 3, 4]
    sjp = evaluate(rd.path, "sjp", data="bundled:sjp_fr_heldout", split="validation", limit=5, write=False,
                   progress=False)
    assert rows[-1]["eval/sjp/validation/macro_f1"] == pytest.approx(sjp["macro_f1"], abs=1e-4)
