"""The packed sweep runner with fake GPUs and fake child processes (a few lines of Python each, ~50 ms): slots,
overlap, CUDA_VISIBLE_DEVICES per job, exit codes (failed, killed, diverged, locked), evaluations as jobs, re-runs,
SIGTERM forwarding and the --only order."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import pytest
import yaml
from typer.testing import CliRunner

from lexfine.cli import app
from lexfine.rundir import RunDir
from lexfine.sweep.gpus import Gpu
from lexfine.sweep.grid import load_sweep
from lexfine.sweep.local import read_state
from lexfine.sweep.pack import Slots, run_packed

FAKE_CHILD = r'''
import json, os, signal, sys, time
run_dir, what, kind, entry = sys.argv[1:5]
path = os.path.join(run_dir, "manifest.json")
def update(**kw):
    m = json.load(open(path)); m.update(kw)
    json.dump(m, open(path + ".tmp", "w")); os.replace(path + ".tmp", path)
if kind == "eval":
    if what == "evalfail":
        sys.exit(1)
    evals = json.load(open(path)).get("evals", {})
    evals[entry + "-loglik"] = {"accuracy": 0.5}
    update(evals=evals); sys.exit(0)
update(status="running", t_start=time.time(), cuda=os.environ["CUDA_VISIBLE_DEVICES"])
if what == "term":
    def stop(*a):
        update(status="interrupted", t_end=time.time()); sys.exit(75)
    signal.signal(signal.SIGTERM, stop)
    time.sleep(30); sys.exit(0)
time.sleep(0.8)
update(t_end=time.time())
if what in ("ok", "evalfail"):
    update(status="completed", steps=2, final_loss=1.5); sys.exit(0)
if what == "crash":
    sys.exit(1)
if what == "kill9":
    os.kill(os.getpid(), signal.SIGKILL)
if what == "diverged":
    update(status="diverged", error="non-finite loss at step 2"); sys.exit(65)
if what == "locked":
    update(status="planned"); sys.exit(73)
'''


@pytest.fixture
def make_sweep(tmp_path):
    def make(n: int, **base):
        p = tmp_path / "s.yaml"
        p.write_text(yaml.safe_dump({"name": "p", "output_dir": str(tmp_path / "sweeps"), "eval": ["sjp"],
                                     "base": {"model": "smollm2-135m", "train": {"max_steps": 2}, **base},
                                     "grid": {"train.seed": list(range(1, n + 1))}}))
        return load_sweep(p)
    return make


def fake(tmp_path, behaviour: dict[int, str]):
    script = tmp_path / "child.py"
    script.write_text(FAKE_CHILD)
    calls = []

    def command(sweep, job, launcher):
        calls.append((job.run.index, job.kind))
        return [sys.executable, str(script), str(job.run.run_dir), behaviour.get(job.run.index, "ok"), job.kind,
                str(job.entry)]
    return command, calls


def gpus(n, mem=80.0):
    return [Gpu(str(i), mem) for i in range(n)]


def test_slots_spread_before_doubling_up_and_take_k_at_once():
    s = Slots(["0", "1"], 2)
    assert s.take(1) == ["0"] and s.take(1) == ["1"] and s.take(2) == ["0", "1"]
    assert s.take(1) is None
    s.give(["1"])
    assert s.take(2) is None and s.take(1) == ["1"]


def test_runs_overlap_each_on_its_gpu_then_evaluations(make_sweep, tmp_path):
    sweep = make_sweep(3)
    command, calls = fake(tmp_path, {})
    lines = []
    out = run_packed(sweep, gpus(2), 1, poll_s=0.05, echo=lines.append, command=command)
    assert [o.state for o in out] == ["trained"] * 3
    m = [RunDir(r.run_dir).manifest() for r in sweep.runs]
    assert {m[0]["cuda"], m[1]["cuda"]} == {"0", "1"}  # one run per GPU, side by side
    assert m[0]["t_start"] < m[1]["t_end"] and m[1]["t_start"] < m[0]["t_end"]
    assert m[2]["t_start"] >= min(m[0]["t_end"], m[1]["t_end"])  # the third waited for a free GPU
    assert all("sjp-loglik" in x["evals"] for x in m)  # each evaluation was a job of its own
    assert sorted(set(calls)) == sorted([(i, k) for i in (1, 2, 3) for k in ("train", "eval")])
    assert any("started on GPU 0" in x for x in lines) and any("completed in" in x for x in lines)
    assert all(row.get("gpu") is None for row in read_state(sweep.sweep_dir).values())


def test_failures_stay_in_their_run_and_rerun_skips_finished(make_sweep, tmp_path):
    sweep = make_sweep(6)
    behaviour = {1: "crash", 2: "kill9", 3: "diverged", 4: "locked", 5: "ok", 6: "evalfail"}
    command, calls = fake(tmp_path, behaviour)
    lines = []
    out = run_packed(sweep, gpus(2), 2, poll_s=0.05, echo=lines.append, command=command)
    assert [o.state for o in out] == ["failed", "failed", "diverged", "locked", "trained", "eval-failed"]
    st = [RunDir(r.run_dir).manifest() for r in sweep.runs]
    assert st[0]["status"] == "failed" and "exited with code 1; log:" in st[0]["error"]
    assert st[1]["status"] == "failed" and "code -9" in st[1]["error"]
    assert st[3]["status"] == "planned"  # locked: nothing marked
    assert st[4]["status"] == "completed" and st[5]["status"] == "completed"
    assert any("FAILED" in x for x in lines) and any("diverged" in x for x in lines)

    calls.clear()
    behaviour[4] = "ok"  # the other runner let go of it
    out = run_packed(sweep, gpus(2), 2, poll_s=0.05, echo=lines.append, command=command, retry_failed=False)
    assert [o.state for o in out] == ["failed", "failed", "diverged", "trained", "skipped", "eval-failed"]
    assert sorted(set(calls)) == [(4, "eval"), (4, "train"), (6, "eval")]  # completed runs: only their missing evals


def test_sigterm_stops_children_which_stay_resumable(make_sweep, tmp_path):
    sweep = make_sweep(3)
    command, _ = fake(tmp_path, {1: "term", 2: "term", 3: "term"})
    threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    before = signal.getsignal(signal.SIGTERM)
    out = run_packed(sweep, gpus(1), 2, poll_s=0.05, echo=lambda s: None, command=command)
    assert [o.state for o in out] == ["interrupted", "interrupted", "not-started"]
    assert [RunDir(r.run_dir).status for r in sweep.runs] == ["interrupted", "interrupted", "planned"]
    assert signal.getsignal(signal.SIGTERM) == before


def test_multi_gpu_run_takes_k_gpus_and_too_many_is_refused(make_sweep, tmp_path):
    sweep = make_sweep(1, launch={"num_processes": 2, "strategy": "ddp"})
    command, _ = fake(tmp_path, {})
    assert [o.state for o in run_packed(sweep, gpus(2), 1, poll_s=0.05, echo=lambda s: None, command=command,
                                        evaluate=False)] == ["trained"]
    assert RunDir(sweep.runs[0].run_dir).manifest()["cuda"] == "0,1"
    sweep = make_sweep(2, launch={"num_processes": 4, "strategy": "ddp"})  # run 2 is new (run 1 is done)
    with pytest.raises(Exception, match="launch.num_processes=4 but only 2 GPU"):
        run_packed(sweep, gpus(2), 1, echo=lambda s: None, command=command)


def test_cli_gpus_runs_per_gpu_and_only_order(make_sweep, tmp_path, monkeypatch):
    runner = CliRunner()
    for width in ("80", "200"):  # rich cuts long option names in narrow tables: the description names them too
        res = runner.invoke(app, ["sweep", "run", "--help"], env={"COLUMNS": width, "TERMINAL_WIDTH": width})
        assert res.exit_code == 0
        for opt in ("--gpus", "--runs-per-gpu", "--gpu-memory-per-run", "CUDA_VISIBLE_DEVICES"):
            assert opt in res.output
    make_sweep(3)
    monkeypatch.setenv("LEXFINE_FAKE_GPUS", "0:80")
    res = runner.invoke(app, ["sweep", "run", str(tmp_path / "s.yaml"), "--gpus", "3"])
    assert res.exit_code == 2 and "GPU 3 is not visible here (visible: 0)" in res.output
    res = runner.invoke(app, ["sweep", "run", str(tmp_path / "s.yaml"), "--runs-per-gpu", "9",
                              "--gpu-memory-per-run", "10"])
    assert res.exit_code == 2 and "at most 8 fit: use --runs-per-gpu 8" in res.output
    monkeypatch.setenv("LEXFINE_FAKE_GPUS", "")
    res = runner.invoke(app, ["sweep", "run", str(tmp_path / "s.yaml"), "--runs-per-gpu", "2"])
    assert res.exit_code == 2 and "needs GPUs" in res.output

    from lexfine.sweep.cli import _select

    sweep = load_sweep(tmp_path / "s.yaml")
    assert [r.index for r in _select(sweep, ["3", "1"])] == [3, 1]


def test_status_shows_the_gpu_of_a_running_job(make_sweep):
    from lexfine.sweep.local import prepare, update_state
    from lexfine.sweep.status import collect, render

    sweep = make_sweep(2)
    prepare(sweep)
    assert "gpu" not in render(collect(sweep, query_slurm=False)).splitlines()[0]
    update_state(sweep.sweep_dir, sweep.runs[0].run_id, gpu="1", job="eval sjp")
    header, first = render(collect(sweep, query_slurm=False)).splitlines()[:2]
    assert header.rstrip().endswith("gpu") and first.endswith("1 (eval sjp)")
    assert json.loads(json.dumps(collect(sweep, query_slurm=False)[0]))["gpu"] == "1"


def test_exit_codes_of_a_training_process():
    from lexfine.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_LOCKED
    from lexfine.sweep.local import classify_exit

    assert classify_exit(0, "completed") == "completed"
    assert classify_exit(EXIT_DIVERGED, "running") == classify_exit(1, "diverged") == "diverged"
    assert classify_exit(EXIT_LOCKED, "running") == "locked"  # another runner trains it: not ours to mark
    assert classify_exit(EXIT_INTERRUPTED, "interrupted") == classify_exit(0, "interrupted") == "interrupted"
    assert classify_exit(-15, "running", stopping=True) == "interrupted"  # we stopped it: resumable
    assert classify_exit(-9, "running") == classify_exit(0, "running") == classify_exit(2, "failed") == "failed"


def test_concurrent_base_model_evaluations_leave_one_whole_cache_entry(tmp_path, monkeypatch):
    """Packed eval jobs of runs on the same base model may store the same base-model entry at once."""
    from lexfine.eval import cache

    monkeypatch.setenv("LEXFINE_CACHE", str(tmp_path))
    key = cache.make_key({"model": "base", "task": "sjp"})
    threads = [threading.Thread(target=cache.store, args=(key, {"accuracy": i}, [{"id": i}] * 200)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary, preds = cache.lookup(key)
    assert preds == [{"id": summary["accuracy"]}] * 200  # one writer's entry, whole
    assert [p.name for p in (tmp_path / "eval").iterdir()] == [key]  # no temp folders left behind


def test_sequential_runner_never_marks_a_locked_or_diverged_run_failed(make_sweep, monkeypatch):
    from lexfine.sweep import local

    sweep = make_sweep(2)
    codes = {sweep.runs[0].run_id: 73, sweep.runs[1].run_id: 65}

    def fake_run(cmd, log, verbose, echo):
        rid = next(r for r in codes if any(r in c for c in cmd))
        RunDir(next(r.run_dir for r in sweep.runs if r.run_id == rid)).set_status("running")
        return codes[rid]

    monkeypatch.setattr(local, "_run_logged", fake_run)
    out = local.run_sweep(sweep, echo=lambda s: None)
    assert [(o.state, o.detail) for o in out][0] == ("locked", local.RUNNING_ELSEWHERE)  # another runner has it
    assert out[1].state == "diverged"
    assert [RunDir(r.run_dir).status for r in sweep.runs] == ["running", "running"]  # untouched
