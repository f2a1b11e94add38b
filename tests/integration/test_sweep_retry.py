"""The packed runner's free-memory gate and its automatic retry of transient GPU failures, with fake GPUs (their free
memory given by a function) and fake child processes that fail the way trainings failed on 4 x H200 on 2026-11-28:
a CUDA OOM as a run starts, cuDNN attention (`mha_graph.execute`) near the end."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest
import yaml
from typer.testing import CliRunner

from lexfine.cli import app
from lexfine.rundir import RunDir
from lexfine.sweep.gpus import Gpu
from lexfine.sweep.grid import load_sweep
from lexfine.sweep.local import read_state, summary
from lexfine.sweep.pack import run_packed
from lexfine.sweep.retry import transient_reason

OOM = ("OutOfMemoryError: CUDA out of memory. Tried to allocate 18.00 MiB. GPU 0 has a total capacity of 139.80 GiB "
       "of which 5.50 MiB is free. Process 1456 has 24.89 GiB memory in use.")
MHA = ("RuntimeError: Expected mha_graph.execute(handle, variant_pack, workspace_ptr.get()).is_good() to be true, "
       "but got false.")

# A training in a few lines: a first attempt that fails writes a checkpoint first (as a run at step 250 would have);
# `attempts` counts the launches of each run.
FAKE_CHILD = r'''
import json, os, sys, time
run_dir, what, kind = sys.argv[1:4]
path = os.path.join(run_dir, "manifest.json")
def update(**kw):
    m = json.load(open(path)); m.update(kw)
    json.dump(m, open(path + ".tmp", "w")); os.replace(path + ".tmp", path)
if kind == "eval":
    sys.exit(0)
m = json.load(open(path))
attempt = m.get("attempts", 0) + 1
update(status="running", attempts=attempt, t_start=time.time(), cuda=os.environ["CUDA_VISIBLE_DEVICES"])
time.sleep(0.3)
fail = what.endswith("-always") or (what.endswith("-once") and attempt == 1)
if fail:
    ck = os.path.join(run_dir, "checkpoints", "checkpoint-250")
    os.makedirs(ck, exist_ok=True)
    json.dump({"global_step": 250}, open(os.path.join(ck, "trainer_state.json"), "w"))
    for f in ("adapter_model.bin", "optimizer.pt"):
        open(os.path.join(ck, f), "wb").write(b"weights")
    if what.startswith("oom"):  # what lexfine train records: the exception's first line
        update(status="failed", error=sys.argv[4]); sys.exit(1)
    if what.startswith("mha"):  # a rank that dies without a word in the manifest: only its log says why
        print("Traceback (most recent call last):", file=sys.stderr)
        print(sys.argv[5], file=sys.stderr); sys.exit(1)
if what == "valueerror":
    update(status="failed", error="ValueError: the collator got a bad row"); sys.exit(1)
if what == "usererror":
    update(status="failed", error="ConfigError: train.lr must be > 0"); sys.exit(2)
update(status="completed", steps=266, final_loss=1.5, t_end=time.time()); sys.exit(0)
'''


@pytest.fixture
def make_sweep(tmp_path):
    def make(n: int):
        p = tmp_path / "s.yaml"
        p.write_text(yaml.safe_dump({"name": "r", "output_dir": str(tmp_path / "sweeps"), "eval": [],
                                     "base": {"model": "smollm2-135m", "train": {"max_steps": 2}},
                                     "grid": {"train.seed": list(range(1, n + 1))}}))
        return load_sweep(p)
    return make


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(FAKE_CHILD)

    def make(behaviour: dict[int, str]):
        def command(sweep, job, launcher):
            return [sys.executable, str(script), str(job.run.run_dir), behaviour.get(job.run.index, "ok"), job.kind,
                    OOM, MHA]
        return command
    return make


def attempts(sweep) -> list[int]:
    """How many times each run's training was launched."""
    return [RunDir(r.run_dir).manifest().get("attempts", 0) for r in sweep.runs]


def gpus(n, mem=139.8):
    return [Gpu(str(i), mem) for i in range(n)]


def packed(sweep, command, lines, n_gpus=1, per_gpu=1, **kw):
    kw.setdefault("retry_delay_s", 0.0)
    return run_packed(sweep, gpus(n_gpus), per_gpu, poll_s=0.05, echo=lines.append, command=command, **kw)


# -- the free-memory gate ---------------------------------------------------------------------------------------


def test_a_gpu_without_free_memory_gets_no_run_and_the_next_one_waits_for_room(make_sweep, fake):
    sweep = make_sweep(3)
    command = fake({})
    lines = []
    # GPU 0 is full of other processes' memory; GPU 1 has room for two runs of 22 GiB, not three
    out = packed(sweep, command, lines, n_gpus=2, per_gpu=2, gpu_memory_per_run=22,
                 free_memory=lambda: {"0": 5.5, "1": 50.0})
    assert [o.state for o in out] == ["trained"] * 3
    m = [RunDir(r.run_dir).manifest() for r in sweep.runs]
    assert [x["cuda"] for x in m] == ["1", "1", "1"]  # never on GPU 0, although it had free slots
    assert m[2]["t_start"] >= min(m[0]["t_end"], m[1]["t_end"])  # the third waited for one of them to end
    waiting = [x for x in lines if "waiting:" in x]
    assert len(waiting) == 1 and sweep.runs[2].name in waiting[0]  # said once, for the run that waited
    assert "GPU 0 has 5.5 GiB free" in waiting[0] and "needs 22.0 GiB" in waiting[0]
    assert "other processes hold memory" in waiting[0]
    assert all(row.get("waiting") is None for row in read_state(sweep.sweep_dir).values())  # cleared on start


def test_a_run_waits_until_other_processes_free_memory(make_sweep, fake):
    sweep = make_sweep(1)
    command = fake({})
    free = {"0": 5.5}
    t_freed = []

    def release():
        t_freed.append(time.time())
        free["0"] = 139.0

    threading.Timer(1.0, release).start()
    lines = []
    out = packed(sweep, command, lines, gpu_memory_per_run=22, free_memory=lambda: dict(free))
    assert out[0].state == "trained"
    assert RunDir(sweep.runs[0].run_dir).manifest()["t_start"] >= t_freed[0]
    assert sum("waiting: GPU 0 has 5.5 GiB free" in x for x in lines) == 1


def test_without_a_known_need_or_free_figure_the_gate_lets_runs_start(make_sweep, fake):
    sweep = make_sweep(1)
    command = fake({})
    lines = []
    # --runs-per-gpu 1 and no --gpu-memory-per-run: nothing to compare the free memory with
    assert packed(sweep, command, lines, free_memory=lambda: {"0": 0.5})[0].state == "trained"
    sweep = make_sweep(2)
    assert [o.state for o in packed(sweep, command, lines, gpu_memory_per_run=22,
                                    free_memory=lambda: {})] == ["skipped", "trained"]  # nvidia-smi could not tell
    assert not any("waiting" in x for x in lines)


def test_waiting_with_nothing_running_times_out_with_the_reason(make_sweep, fake):
    sweep = make_sweep(2)
    command = fake({})
    lines = []
    t0 = time.perf_counter()
    out = packed(sweep, command, lines, gpu_memory_per_run=22, free_memory=lambda: {"0": 5.5}, gpu_wait_s=0.5)
    assert time.perf_counter() - t0 < 5
    assert [o.state for o in out] == ["failed", "failed"] and attempts(sweep) == [0, 0]
    assert out[0].detail.startswith("not started: no GPU had 22.0 GiB free for ")
    assert "GPU 0 5.5 GiB" in out[0].detail and "\n" not in out[0].detail
    assert [RunDir(r.run_dir).status for r in sweep.runs] == ["planned", "planned"]  # untouched: a rerun starts them
    assert read_state(sweep.sweep_dir)[sweep.runs[0].run_id]["error"] == out[0].detail


# -- automatic retries ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("behaviour, reason", [("oom-once", "OutOfMemoryError: CUDA out of memory"),
                                               ("mha-once", "RuntimeError: Expected mha_graph.execute")])
def test_a_transient_gpu_failure_is_retried_from_its_checkpoint(make_sweep, fake, behaviour, reason):
    sweep = make_sweep(2)
    command = fake({1: behaviour})
    lines = []
    out = packed(sweep, command, lines)
    assert [o.state for o in out] == ["trained", "trained"]
    assert attempts(sweep) == [2, 1]
    assert out[0].retries == 1 and out[0].detail == "completed after 1 retry" and out[1].retries == 0
    retry = [x for x in lines if "retrying" in x]
    assert len(retry) == 1 and f"retrying (1/1) after transient failure: {reason}" in retry[0]
    assert any("resuming from checkpoint-250" in x for x in lines)  # the second launch resumes
    assert any("completed in" in x and "after 1 retry" in x for x in lines)
    row = read_state(sweep.sweep_dir)[sweep.runs[0].run_id]
    assert row["retries"] == 1 and row["retry_reason"].startswith(reason) and row["status"] == "completed"
    assert "retried after transient GPU failures:" in summary(out)

    from lexfine.sweep.status import collect, render

    text = render(collect(sweep, query_slurm=False))
    assert f"{sweep.runs[0].run_id}: completed after 1 retry (transient GPU failure: {reason}" in text
    res = CliRunner().invoke(app, ["sweep", "status", str(sweep.sweep_dir.parent.parent / "s.yaml"), "--json",
                                   "--no-slurm"])
    assert json.loads(res.output.splitlines()[0])["retries"] == 1


@pytest.mark.parametrize("behaviour", ["valueerror", "usererror"])
def test_other_failures_are_never_retried(make_sweep, fake, behaviour):
    sweep = make_sweep(1)
    command = fake({1: behaviour})
    lines = []
    out = packed(sweep, command, lines, retries=3)
    assert out[0].state == "failed" and out[0].retries == 0 and attempts(sweep) == [1]
    assert not any("retrying" in x for x in lines)


def test_retries_0_turns_it_off_and_retries_run_out(make_sweep, fake):
    sweep = make_sweep(1)
    command = fake({1: "oom-once"})
    lines = []
    out = packed(sweep, command, lines, retries=0)
    assert out[0].state == "failed" and attempts(sweep) == [1] and "CUDA out of memory" in out[0].detail
    assert not any("retrying" in x for x in lines)

    sweep = make_sweep(2)  # run 1 failed before: this sweep trains it again (its second launch completes); run 2
    command = fake({1: "oom-once", 2: "oom-always"})  # fails every time
    out = packed(sweep, command, lines, retries=2)
    assert out[0].state == "trained" and out[0].retries == 0
    assert out[1].state == "failed" and attempts(sweep) == [2, 3]
    assert out[1].retries == 2 and out[1].detail.endswith("after 2 retries")
    assert [x.split("retrying ")[1][:5] for x in lines if "retrying" in x] == ["(1/2)", "(2/2)"]


def test_sequential_runner_retries_a_transient_failure_too(make_sweep, monkeypatch):
    from lexfine.sweep import local

    sweep = make_sweep(1)
    rd = RunDir(sweep.runs[0].run_dir)
    codes = [1, 0]

    def fake_run(cmd, log, verbose, echo):
        code = codes.pop(0)
        rd.set_status("failed", error=OOM) if code else rd.set_status("completed")
        return code

    monkeypatch.setattr(local, "_run_logged", fake_run)
    lines = []
    out = local.run_sweep(sweep, echo=lines.append, evaluate=False, retry_delay_s=0)
    assert codes == [] and out[0].state == "trained" and out[0].detail == "completed after 1 retry"
    assert any("retrying (1/1) after transient failure: OutOfMemoryError" in x for x in lines)


def test_transient_reasons():
    assert transient_reason(1, OOM).startswith("OutOfMemoryError: CUDA out of memory")
    assert transient_reason(1, MHA) == MHA
    for line in ("RuntimeError: cuDNN error: CUDNN_STATUS_EXECUTION_FAILED",
                 "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                 "RuntimeError: CUDA error: out of memory",
                 "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE)"):
        assert transient_reason(1, line) == line
    for line in ("ValueError: bad row", "RuntimeError: CUDNN_STATUS_NOT_SUPPORTED", "training diverged", None):
        assert transient_reason(1, line) is None
    assert transient_reason(2, OOM) is None  # a user error is never retried, whatever it says
    assert transient_reason(0, OOM) is None


def test_fake_free_memory_and_help(monkeypatch):
    from lexfine.sweep.gpus import free_memory, inventory

    monkeypatch.setenv("LEXFINE_FAKE_GPUS", "0:139.8:5.5,1:139.8")
    assert [g.memory_gib for g in inventory()] == [139.8, 139.8]
    assert free_memory() == {"0": 5.5}  # GPU 1: unknown, never waited for
    for width in ("80", "200"):
        res = CliRunner().invoke(app, ["sweep", "run", "--help"], env={"COLUMNS": width, "TERMINAL_WIDTH": width})
        assert res.exit_code == 0
        for opt in ("--retries", "--gpu-wait", "--gpu-memory-per-run", "--runs-per-gpu", "--gpus", "transient"):
            assert opt in res.output
