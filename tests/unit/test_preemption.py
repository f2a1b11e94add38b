"""PreemptionCallback: a real SIGUSR1/SIGTERM sets a flag; the next step end saves and stops, on every rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace

import pytest

from lexfine.train.preemption import PreemptionCallback, requeue_if_preempted
from tests.slurm_fakes import install


def control():
    return SimpleNamespace(should_save=False, should_training_stop=False)


STATE = SimpleNamespace(global_step=7)


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_and_stops_at_the_next_step(restore_signals, sig):
    cb = PreemptionCallback()
    c = cb.on_step_end(None, STATE, control())
    assert not c.should_save and not c.should_training_stop and not cb.preempted
    os.kill(os.getpid(), sig)
    assert cb.received and cb.signum == sig
    c = cb.on_step_end(None, STATE, control())
    assert c.should_save and c.should_training_stop and cb.preempted


def test_previous_handler_is_kept_and_restored(restore_signals):
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    signal.signal(signal.SIGUSR1, previous)
    cb = PreemptionCallback()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert cb.received and calls == [signal.SIGUSR1]
    cb.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_ignored_signal_stays_harmless(restore_signals):
    # The per-node launcher runs with SIGUSR1 ignored; the trainer's handler must still see it, and the old
    # SIG_IGN must not be "called".
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    cb = PreemptionCallback()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert cb.received


def test_not_on_main_thread_installs_nothing(restore_signals):
    before = signal.getsignal(signal.SIGUSR1)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("cb", PreemptionCallback()))
    t.start()
    t.join()
    assert signal.getsignal(signal.SIGUSR1) is before
    assert not out["cb"].received


# ------------------------------------------------------------------------------------------------
# requeue


def test_requeue_runs_scontrol_on_rank0_under_slurm(tmp_path):
    fakes = install(tmp_path)
    env = fakes.env(SLURM_JOB_ID="123", RANK="0", SLURM_NODEID="0")
    env.pop("LEXFINE_REQUEUE", None)
    os.environ["FAKE_SLURM_LOG"] = str(fakes.log)
    try:
        assert requeue_if_preempted(True, env=env) is True
        assert [c["argv"] for c in fakes.calls("scontrol")] == [["requeue", "123"]]
        assert requeue_if_preempted(False, env=env) is False
        assert requeue_if_preempted(True, env={**env, "RANK": "1"}) is False
        assert requeue_if_preempted(True, env={**env, "SLURM_NODEID": "1"}) is False
        assert requeue_if_preempted(True, env={k: v for k, v in env.items() if k != "SLURM_JOB_ID"}) is False
        assert requeue_if_preempted(True, env={**env, "LEXFINE_REQUEUE": "batch"}) is False
        assert requeue_if_preempted(True, env={**env, "PATH": str(tmp_path / "empty")}) is False  # no scontrol
        assert len(fakes.calls("scontrol")) == 1
    finally:
        os.environ.pop("FAKE_SLURM_LOG", None)


# ------------------------------------------------------------------------------------------------
# ranks agree


AGREE = textwrap.dedent("""
    import os, signal, sys, types
    from types import SimpleNamespace
    import torch.distributed as dist
    # transformers takes seconds to import and is not what is tested here
    sys.modules.setdefault("transformers", types.SimpleNamespace(TrainerCallback=object))
    from lexfine.train.preemption import PreemptionCallback
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    cb = PreemptionCallback()
    stopped = None
    for step in range(1, 6):
        if step == 3 and rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)   # only rank 1 is signalled
        c = cb.on_step_end(None, SimpleNamespace(global_step=step),
                           SimpleNamespace(should_save=False, should_training_stop=False))
        if c.should_training_stop:
            stopped = step
            break
    print("STOPPED", rank, stopped, cb.received)
    dist.destroy_process_group()
""")


def test_all_ranks_stop_at_the_same_step(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(store)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    lines = sorted(line for o, _ in outs for line in o.splitlines() if line.startswith("STOPPED"))
    assert lines == ["STOPPED 0 3 False", "STOPPED 1 3 True"]
