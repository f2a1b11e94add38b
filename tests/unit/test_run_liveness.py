"""A dead run does not look alive, and a second sweep runner leaves a locked run alone (issue 16, items 2 and 3)."""

from __future__ import annotations

import yaml

from lexfine.report.collect import load_run_dir
from lexfine.rundir import RunDir
from lexfine.runlock import RunLock
from lexfine.sweep.grid import load_sweep
from lexfine.sweep.local import RUNNING_ELSEWHERE, prepare, run_sweep
from lexfine.sweep.status import collect, render


def two_run_sweep(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "c", "output_dir": str(tmp_path / "sweeps"),
                                 "base": {"model": "smollm2-135m", "train": {"max_steps": 4}},
                                 "grid": {"train.lr": [1e-4, 1e-3]}}))
    sweep = load_sweep(p)
    prepare(sweep)
    return sweep


def test_status_tells_a_killed_run_from_a_running_one(tmp_path):
    sweep = two_run_sweep(tmp_path)
    alive, killed = (RunDir(r.run_dir) for r in sweep.runs)
    alive.set_status("running")
    killed.set_status("running")  # its process was killed -9: the manifest cannot say so
    with RunLock(alive.path):
        rows = collect(sweep, query_slurm=False)
        assert [r["state"] for r in rows] == ["running", "dead"]
        text = render(rows)
        assert "1 dead, 1 running" in text and "rerun to resume" in text
        assert load_run_dir(killed.path).status == "dead" and load_run_dir(alive.path).status == "running"


def test_a_second_sweep_runner_skips_the_locked_run_and_takes_the_rest(tmp_path):
    sweep = two_run_sweep(tmp_path)
    locked, done = sweep.runs
    RunDir(locked.run_dir).set_status("running")
    RunDir(done.run_dir).set_status("completed", steps=4)
    before = RunDir(locked.run_dir).manifest_path.read_text()
    lines: list[str] = []
    with RunLock(locked.run_dir):
        outcomes = run_sweep(sweep, evaluate=False, echo=lines.append)
    assert [(o.state, o.detail) for o in outcomes] == [("locked", RUNNING_ELSEWHERE), ("skipped", "completed before")]
    assert RunDir(locked.run_dir).manifest_path.read_text() == before  # the holder's manifest is not touched
    assert "running elsewhere" in lines[0] and "pid" in lines[0]


CHILD = """
import json, os, sys
from pathlib import Path
from lexfine.rundir import RunDir
from lexfine.runlock import RunLock
rd = RunDir(os.environ["RUN_DIR"])
with RunLock(rd.path) as lock:  # a launched rank 0: inherits the parent's lock instead of failing on it
    assert lock.inherited
    rd.set_status("interrupted", error="preempted: checkpoint saved")
sys.exit(1)  # what accelerate launch returns when a worker exited 75
"""


def test_multi_process_parent_holds_the_lock_for_its_children_and_exits_75(tmp_path, monkeypatch):
    import sys

    from typer.testing import CliRunner

    from lexfine.cli import app
    from lexfine.config import load_config
    from lexfine.runlock import lock_holder
    from lexfine.train import launch

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": "smollm2-135m", "output_dir": str(tmp_path / "runs"),
                                        "launch": {"num_processes": 2}}))
    run_dir = load_config(cfg_file, []).run_dir()
    monkeypatch.setenv("RUN_DIR", str(run_dir))
    monkeypatch.delenv("LEXFINE_RUN_LOCK", raising=False)
    monkeypatch.setattr(launch, "local_command", lambda *a, **kw: [sys.executable, "-c", CHILD])
    res = CliRunner().invoke(app, ["train", str(cfg_file)])
    assert res.exit_code == 75, res.output
    assert RunDir(run_dir).status == "interrupted" and lock_holder(run_dir) is None


WORKER = """
import os, signal, sys, time
from lexfine.rundir import RunDir
from lexfine.runlock import RunLock
rd = RunDir(os.environ["RUN_DIR"])
inherited_ignore = signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
with RunLock(rd.path):
    (rd.path / "ready.tmp").write_text(str(inherited_ignore))
    os.replace(rd.path / "ready.tmp", rd.path / "ready")
    while not got:
        time.sleep(0.05)
    rd.set_status("interrupted", error="preempted: checkpoint saved")
sys.exit(1)
"""
PARENT = """
import sys
from lexfine.train import launch
launch.local_command = lambda *a, **kw: [sys.executable, "-c", sys.argv[1]]
from lexfine.cli import main
main(["train", sys.argv[2]])
"""


def test_sigterm_to_a_multi_process_parent_reaches_the_workers_as_sigusr1(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from lexfine.config import load_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": "smollm2-135m", "output_dir": str(tmp_path / "runs"),
                                        "launch": {"num_processes": 2}}))
    run_dir = load_config(cfg_file, []).run_dir()
    env = {**os.environ, "RUN_DIR": str(run_dir)}
    env.pop("LEXFINE_RUN_LOCK", None)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, WORKER, str(cfg_file)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 120
        while not (run_dir / "ready").exists() and time.monotonic() < end and parent.poll() is None:
            time.sleep(0.1)
        assert (run_dir / "ready").read_text() == "True"  # the launcher runs with SIGUSR1 ignored
        parent.send_signal(signal.SIGTERM)
        _, err = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 75, err
    assert RunDir(run_dir).status == "interrupted"


def test_a_training_process_that_exits_73_is_skipped_not_failed(tmp_path, monkeypatch):
    """The lock was taken between the runner's look and the training's start: exit 73 means running elsewhere."""
    from lexfine.errors import EXIT_LOCKED
    from lexfine.sweep import local

    sweep = two_run_sweep(tmp_path)
    for r in sweep.runs:
        RunDir(r.run_dir).set_status("running")  # as the other runner's trainers wrote it
    before = [RunDir(r.run_dir).manifest_path.read_text() for r in sweep.runs]
    monkeypatch.setattr(local, "_run_logged", lambda *a, **kw: EXIT_LOCKED)
    outcomes = run_sweep(sweep, evaluate=False, echo=lambda line: None)
    assert [(o.state, o.detail) for o in outcomes] == [("locked", RUNNING_ELSEWHERE)] * 2
    assert [RunDir(r.run_dir).manifest_path.read_text() for r in sweep.runs] == before
