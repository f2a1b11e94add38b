"""`lexfine sweep run|status` end to end on a CPU: two tiny runs, one of which fails; the sweep goes on, lists the
failure, and a second invocation skips the completed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from lexfine.rundir import RunDir
from lexfine.sweep.grid import load_sweep
from lexfine.sweep.local import read_state


def lexfine(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lexfine"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-c", "from lexfine.cli import main; main()"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


def test_local_sweep_skips_completed_and_continues_after_failure(tiny_config, tmp_path):
    base = tiny_config(train__max_steps=2, train__save_steps=1)
    base["eval_options"] = {"sjp_data": "bundled:sjp_fr_heldout", "limit": 4, "batch_size": 4, "max_length": 256}
    sweep_file = tmp_path / "tiny.yaml"
    sweep_file.write_text("# lexfine sweep run tiny.yaml\n" + yaml.safe_dump({
        "name": "tiny", "output_dir": str(tmp_path / "sweeps"), "base": base, "eval": ["sjp"],
        "variants": [{"train.lr": [1e-3]}, {"data.train": str(tmp_path / "missing.jsonl")}],
    }))
    sweep = load_sweep(sweep_file)
    good, bad = sweep.runs

    res = lexfine("sweep", "run", str(sweep_file), cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout
    assert "[1/2]" in out and "[2/2]" in out and "failed:" in out and bad.run_id in out.split("failed:")[1]
    g, b = RunDir(good.run_dir), RunDir(bad.run_dir)
    assert g.status == "completed" and b.status == "failed"
    assert [r["step"] for r in g.metrics()] == [1, 2]
    assert "sjp-loglik" in g.manifest()["evals"]  # evaluated by `lexfine eval` after training
    state = read_state(sweep.sweep_dir)
    assert state[good.run_id]["status"] == "completed" and state[bad.run_id]["status"] == "failed"
    assert (sweep.sweep_dir / "sweep.yaml").read_text() == sweep_file.read_text()
    assert (sweep.sweep_dir / "logs" / f"{good.run_id}.train.log").is_file()
    finished = g.manifest()["status_time"]

    res = lexfine("sweep", "run", str(sweep_file), "--skip-failed", cwd=tmp_path)
    assert res.returncode == 1
    assert "completed, skipping training" in res.stdout and "failed before, not retried" in res.stdout
    assert g.manifest()["status_time"] == finished  # not trained again

    res = lexfine("sweep", "status", str(sweep_file), "--no-slurm", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if good.run_id in line)
    assert "completed" in row and "2/2" in row
    assert "sjp-loglik" in res.stdout.splitlines()[0]
    assert "1 completed" in res.stdout and "1 failed" in res.stdout
    rows = [json.loads(x) for x in lexfine("sweep", "status", str(sweep_file), "--json", cwd=tmp_path).stdout.splitlines()]
    assert rows[0]["final_loss"] is not None and rows[0]["evals"]["sjp-loglik"] is not None
