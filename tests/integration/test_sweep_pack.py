"""`lexfine sweep run --gpus 0,1 --runs-per-gpu 2` on a CPU with fake GPUs (LEXFINE_FAKE_GPUS): real
`python -m lexfine.train` processes side by side, each with its own CUDA_VISIBLE_DEVICES (recorded in its manifest,
ignored on a CPU); a second invocation skips the completed runs. Failures, kills, exit codes and SIGTERM are covered
with light child processes in tests/integration/test_sweep_scheduler.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lexfine.rundir import RunDir
from lexfine.sweep.grid import load_sweep


def lexfine(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lexfine"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-c", "from lexfine.cli import main; main()"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LEXFINE_FAKE_GPUS": "0:80,1:80"}
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow  # ~15 s idle (two processes that import torch + TRL side by side); 80 s on the shared 2-core box
def test_packed_sweep_runs_side_by_side_and_resumes(tiny_config, tmp_path):
    base = tiny_config(train__max_steps=2, train__save_steps=2)
    sweep_file = tmp_path / "packed.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "packed", "output_dir": str(tmp_path / "sweeps"), "base": base, "eval": [],
        "grid": {"train.lr": [1e-3, 1e-4]},
    }))
    sweep = load_sweep(sweep_file)
    a, b = sweep.runs

    res = lexfine("sweep", "run", str(sweep_file), "--gpus", "0,1", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "started on GPU 0" in res.stdout and "started on GPU 1" in res.stdout
    ma, mb = RunDir(a.run_dir).manifest(), RunDir(b.run_dir).manifest()
    assert ma["status"] == mb["status"] == "completed"
    assert ma["started"] <= mb["finished"] and mb["started"] <= ma["finished"]  # side by side
    assert {ma["hardware"]["cuda_visible_devices"], mb["hardware"]["cuda_visible_devices"]} == {"0", "1"}
    assert (sweep.sweep_dir / "logs" / f"{a.run_id}.train.log").is_file()

    res = lexfine("sweep", "run", str(sweep_file), "--gpus", "0,1", "--runs-per-gpu", "2", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.count("completed before, skipping training") == 2
    assert RunDir(a.run_dir).manifest()["finished"] == ma["finished"]  # not trained again
