"""Crash-safety of `lexfine train` with real processes (issue 16, items 1, 2, 3 and 7): a second trainer of the same
run is refused while the first trains, SIGTERM exits 75 with a checkpoint, a half-written newest checkpoint is
skipped on resume; signals before training and during the evaluations after it stop at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lexfine.config import validate
from lexfine.errors import EXIT_INTERRUPTED, EXIT_LOCKED
from lexfine.rundir import RunDir
from lexfine.runlock import lock_holder

REPO = Path(__file__).resolve().parents[2]
# The first trainer pauses after logging step 1 while PAUSE exists, so the test controls when it moves on.
PAUSING_TRAINER = """
import os, sys, time
from lexfine.train import callbacks
original = callbacks.MetricsCallback.on_log
def on_log(self, *a, **kw):
    original(self, *a, **kw)
    while os.path.exists(sys.argv[1]):
        time.sleep(0.1)
callbacks.MetricsCallback.on_log = on_log
from lexfine.cli import main
main(sys.argv[2:])
"""


def wait_for(predicate, timeout=300.0, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.mark.slow  # three `lexfine train` processes (~1-2 min on a busy 2-core CPU, most of it imports)
def test_second_trainer_is_refused_sigterm_exits_75_and_a_broken_checkpoint_is_skipped(tiny_config, tmp_path):
    tree = tiny_config(train__max_steps=3, train__save_steps=1, train__batch_size=1, train__max_length=128,
                       data__limit=8)
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    rd = RunDir(validate(tree).run_dir())
    train = ["train", str(cfg_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pause = tmp_path / "pause"
    pause.touch()
    first = subprocess.Popen([sys.executable, "-c", PAUSING_TRAINER, str(pause), *train], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: [r["step"] for r in rd.metrics()] == [1], proc=first)
        assert rd.status == "running" and lock_holder(rd.path)["pid"] == first.pid

        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "lexfine.cli", *train], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == EXIT_LOCKED and time.monotonic() - t0 < 60
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"locked by pid {first.pid}" in lines[0], second.stderr

        first.send_signal(signal.SIGTERM)  # preemption: checkpoint at the next step, exit 75
        pause.unlink()
        _, err = first.communicate(timeout=300)
        assert first.returncode == EXIT_INTERRUPTED, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert rd.status == "interrupted" and lock_holder(rd.path) is None
    assert [r["step"] for r in rd.metrics()] == [1, 2]
    assert rd.latest_checkpoint().name == "checkpoint-2"

    (rd.checkpoints / "checkpoint-2" / "trainer_state.json").write_text("")  # `: > trainer_state.json`
    third = subprocess.run([sys.executable, "-m", "lexfine.cli", *train], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "skipping incomplete checkpoint checkpoint-2: trainer_state.json is empty" in third.stderr
    m = rd.manifest()
    assert m["status"] == "completed" and m["resumed_from"] == "checkpoint-1" and "error" not in m
    assert [r["step"] for r in rd.metrics()] == [1, 2, 3]


def test_sigterm_before_training_leaves_the_run_interrupted_and_exits_75(tiny_config, tmp_path, monkeypatch):
    from lexfine import cli, models

    def load_then_get_preempted(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the setup")

    monkeypatch.setattr(models, "load_tokenizer", load_then_get_preempted)
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config()))
    with pytest.raises(SystemExit) as e:
        cli.main(["train", str(cfg_file)])
    assert e.value.code == EXIT_INTERRUPTED
    rd = RunDir(validate(tiny_config()).run_dir())
    m = rd.manifest()
    assert m["status"] == "interrupted" and "SIGTERM during setup" in m["error"]
    assert lock_holder(rd.path) is None and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_during_the_evaluation_after_training_stops_it(tiny_config, tmp_path, monkeypatch):
    import lexfine.eval
    from lexfine import cli

    def slow_eval(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        raise AssertionError("SIGTERM did not stop the evaluation")

    monkeypatch.setattr(lexfine.eval, "run_configured_evals", slow_eval)
    tree = tiny_config(train__max_steps=1, eval=["sjp"])
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        cli.main(["train", str(cfg_file)])
    assert e.value.code == EXIT_INTERRUPTED and time.monotonic() - t0 < 120
    m = RunDir(validate(tree).run_dir()).manifest()
    assert m["status"] == "completed" and "SIGTERM" in m["eval_error"] and not m.get("evals")


def test_a_run_that_fails_before_training_is_marked_failed_at_setup(tiny_config):
    from lexfine.train import run

    cfg = validate(tiny_config(data__train="/nonexistent/cases.jsonl"))
    with pytest.raises(Exception):
        run(cfg)
    m = RunDir(cfg.run_dir()).manifest()
    assert m["status"] == "failed" and m["failed_stage"] == "setup" and "/nonexistent/cases.jsonl" in m["error"]
    assert not RunDir(cfg.run_dir()).checkpoints.exists() and lock_holder(cfg.run_dir()) is None
