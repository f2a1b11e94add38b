"""A 2-"node" training on one CPU machine through the generated sbatch script: fake srun starts one launcher per
"node" (SLURM_NODEID 0 and 1, SLURM_JOB_NODELIST=localhost) running the generated torchrun command, gloo.

`accelerate launch` cannot start several CPU processes here (see DESIGN.md traps), so the profile uses
`launcher: torchrun`; the accelerate form of the same command is checked argument by argument in
tests/unit/test_slurm.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lexfine.rundir import RunDir
from lexfine.sweep.grid import load_sweep
from lexfine.sweep.slurm import for_profile, load_profile, submit
from tests.slurm_fakes import install


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(tmp_path: Path, tiny_config, max_steps: int, save_steps: int):
    base = tiny_config(train__max_steps=max_steps, train__save_steps=save_steps, train__keep_checkpoints=True)
    sweep_file = tmp_path / "n2.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "n2", "output_dir": str(tmp_path / "sweeps"), "base": base,
                                          "eval": [], "grid": {"train.lr": [1e-3]}}))
    profile = tmp_path / "cpu2.yaml"
    profile.write_text(yaml.safe_dump({"account": None, "partition": None, "time": "00:20:00", "nodes": 2,
                                       "gpus_per_node": 1, "launcher": "torchrun", "python": sys.executable,
                                       "main_process_port": free_port(), "env": {"OMP_NUM_THREADS": 1}}))
    sweep, prof = load_sweep(sweep_file), load_profile(profile)
    rec = submit(sweep, prof, dry_run=True, workdir=str(tmp_path), echo=lambda s: None)[0]
    return for_profile(sweep, prof).runs[0], Path(rec["script"])  # the run as the 2-process job trains it


def run_job(script: Path, fakes, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=fakes.env(SLURM_JOB_ID="31337", SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="2",
                                        SLURM_NNODES="2", HF_HUB_OFFLINE="1", **env))


def test_two_node_cpu_training_completes_and_saves_once(tiny_config, tmp_path):
    fakes = install(tmp_path)
    run, script = setup(tmp_path, tiny_config, max_steps=4, save_steps=2)
    res = run_job(script, fakes, tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "lexfine: run completed" in res.stdout
    assert len(fakes.calls("srun")) == 1
    rd = RunDir(run.run_dir)
    m = rd.manifest()
    assert m["status"] == "completed" and m["world_size"] == 2 and m["hardware"]["num_nodes"] == 2
    assert m["global_batch"] == 2 * 2  # batch 2 x 2 processes
    assert [r["step"] for r in rd.metrics()] == [1, 2, 3, 4]  # rank 0 alone writes: no duplicate rows
    assert sorted(p.name for p in rd.checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (rd.adapter_dir / "adapter_model.safetensors").is_file()
    assert not list(rd.path.glob("*.tmp")) and not list(rd.path.glob(".*.tmp"))


@pytest.mark.slow
def test_preempted_two_node_job_checkpoints_requeues_and_resumes(tiny_config, tmp_path):
    """SIGUSR1 reaches only node 1 (as `--signal=USR1@120` would, a little early): both ranks stop at the same
    step (all-reduce), a checkpoint is saved, the script requeues the job, and the requeued job resumes."""
    fakes = install(tmp_path)
    run, script = setup(tmp_path, tiny_config, max_steps=10, save_steps=100)  # room for a fast machine
    rd = RunDir(run.run_dir)
    res = run_job(script, fakes, tmp_path, FAKE_SIGNAL_WHEN=str(rd.metrics_path), FAKE_SIGNAL_NODES="1")
    assert res.returncode == 75, res.stdout[-2000:] + res.stderr[-4000:]
    assert [c.get("nodes") for c in fakes.calls("srun-signal")] == [[1]]
    assert [c["argv"] for c in fakes.calls("scontrol") if c["argv"][0] == "requeue"] == [["requeue", "31337"]]
    assert rd.status == "interrupted"
    ckpts = [p.name for p in rd.checkpoints.glob("checkpoint-*")]
    assert len(ckpts) == 1 and int(ckpts[0].split("-")[1]) < 10
    stopped = int(ckpts[0].split("-")[1])

    res = run_job(script, fakes, tmp_path)  # the requeued job: same script, same command
    assert res.returncode == 0, res.stderr[-4000:]
    m = rd.manifest()
    assert m["status"] == "completed" and m["resumed_from"] == f"checkpoint-{stopped}" and m["steps"] == 10
    assert [r["step"] for r in rd.metrics()] == list(range(1, 11))
