"""One run, one writer (issue 16, item 2): the run lock, its staleness rules, takeover races, effective status."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from lexfine.errors import LexfineError
from lexfine.rundir import RunDir
from lexfine.runlock import (ENV_HELD, LOCK_NAME, RunLock, RunLockedError, _pid_namespace, effective_status,
                             lock_holder)


def write_lock(run_dir, **info):
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": 1, "pidns": _pid_namespace(), "started": "2026-11-28T08:00:00+00:00",
              "heartbeat": time.time(), "token": "t0", **info}
    (run_dir / LOCK_NAME).write_text(json.dumps(record))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_holder_is_refused_in_one_line_naming_the_holder(tmp_path):
    with RunLock(tmp_path / "r"):
        holder = lock_holder(tmp_path / "r")
        assert holder["pid"] == __import__("os").getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path / "r").acquire()
        msg = str(e.value)
        assert isinstance(e.value, LexfineError) and "\n" not in msg
        assert f"pid {holder['pid']} on {holder['host']} since {holder['started']}" in msg
    assert lock_holder(tmp_path / "r") is None and not (tmp_path / "r" / LOCK_NAME).exists()


def test_a_dead_holder_on_this_host_is_stale_at_once(tmp_path):
    write_lock(tmp_path, pid=dead_pid())
    assert lock_holder(tmp_path) is None
    with RunLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token


def test_a_dead_pid_in_another_pid_namespace_is_judged_by_the_heartbeat(tmp_path):
    write_lock(tmp_path, pid=dead_pid(), pidns=12345)  # a container with this host name: its pids are not ours
    assert lock_holder(tmp_path) is not None
    write_lock(tmp_path, pid=dead_pid(), pidns=12345, heartbeat=time.time() - 3600)
    assert lock_holder(tmp_path) is None


def test_another_node_is_judged_by_its_heartbeat(tmp_path):
    write_lock(tmp_path, host="node-elsewhere", pid=dead_pid(), heartbeat=time.time() - 5)
    assert lock_holder(tmp_path)["host"] == "node-elsewhere"  # its pid means nothing here: fresh heartbeat wins
    with pytest.raises(RunLockedError, match="node-elsewhere"):
        RunLock(tmp_path).acquire()
    write_lock(tmp_path, host="node-elsewhere", heartbeat=time.time() - 3600)  # its node died
    assert lock_holder(tmp_path) is None
    with RunLock(tmp_path):
        assert lock_holder(tmp_path)["host"] == socket.gethostname()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    with RunLock(tmp_path, heartbeat_s=0.05):
        first = lock_holder(tmp_path)["heartbeat"]
        time.sleep(0.3)
        assert lock_holder(tmp_path)["heartbeat"] > first


@pytest.mark.parametrize("attempt", range(5))
def test_racing_takers_of_a_stale_lock_get_exactly_one_winner(tmp_path, attempt):
    write_lock(tmp_path, host="node-elsewhere", heartbeat=0)
    winners, losers, barrier = [], [], threading.Barrier(8)

    def take():
        lock = RunLock(tmp_path, heartbeat_s=60)
        barrier.wait()
        try:
            lock.acquire()
            winners.append(lock)
        except RunLockedError:
            losers.append(lock)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 7
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == winners[0].token
    winners[0].release()


def test_processes_launched_by_the_holder_inherit_the_lock(tmp_path, monkeypatch):
    with RunLock(tmp_path) as parent:
        monkeypatch.setenv(ENV_HELD, parent.child_env()[ENV_HELD])
        with RunLock(tmp_path) as child:
            assert child.inherited
        assert lock_holder(tmp_path)["token"] == parent.token  # the child's exit does not release it


def test_running_without_a_live_holder_is_dead(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.create("name: r\n", "r-1")
    rd.set_status("running")
    assert effective_status(rd.path) == "dead"
    with RunLock(rd.path):
        assert effective_status(rd.path) == "running"
    rd.set_status("completed")
    assert effective_status(rd.path) == "completed"


def test_a_new_status_never_keeps_the_old_error(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.create("name: r\n", "r-1")
    rd.set_status("failed", error="OSError: disk full", traceback="Traceback ...", failed_stage="training")
    m = rd.set_status("completed", steps=4)
    assert m["status"] == "completed" and not {"error", "traceback", "failed_stage"} & set(m)
    assert rd.set_status("interrupted", error="preempted")["error"] == "preempted"


def test_a_requeued_slurm_job_takes_over_its_earlier_run_at_once(tmp_path, monkeypatch):
    """SLURM kills a preempted job's processes (maybe on another node, lock still fresh) before requeueing it."""
    write_lock(tmp_path, host="node-elsewhere", slurm_job_id="4242", slurm_restart=None)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert lock_holder(tmp_path) is None
    monkeypatch.setenv("SLURM_JOB_ID", "5000")  # another job: the fresh lock stands
    assert lock_holder(tmp_path)["host"] == "node-elsewhere"
