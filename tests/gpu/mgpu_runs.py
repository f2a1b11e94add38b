"""Training runs and their processes for tests/gpu/test_multigpu.py: `lexfine train` in a subprocess, its log and
run directory, and its process tree (read from /proc) to kill or signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from multigpu import descendants  # noqa: E402  (the benchmark's process-tree walk, shared)

# A dry run of the multi-GPU tests' logic on a CPU: 2 gloo processes under torchrun, a tiny Apertus, DeepSpeed on its
# CPU accelerator where installed (tests/cpu_shim). Not a measurement of anything a GPU does.
ON_CPU = os.environ.get("LEXFINE_MGPU_ON_CPU") == "1"
SHIM = Path(__file__).parents[1] / "cpu_shim"


class Run:
    def __init__(self, cfg: dict, workdir: Path):
        self.cfg, self.workdir = cfg, workdir
        self.name = f"{cfg['name']}-{Path(cfg['output_dir']).name}"
        self.path = workdir / "configs" / f"{self.name}.yaml"
        self.log = workdir / "logs" / f"{self.name}.log"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(yaml.safe_dump(cfg))

    def env(self, **extra) -> dict:
        # NVIDIA_TF32_OVERRIDE=0: no TF32 in cuBLAS/cuDNN, whatever a library switches on: fp32 means fp32 here
        env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1", "NVIDIA_TF32_OVERRIDE": "0", **extra}
        if self.cfg["launch"]["num_processes"] == 1:
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        if ON_CPU:
            env.update(cpu_env(self.cfg["launch"]["strategy"]))
        return env

    def start(self, **env) -> subprocess.Popen:
        f = open(self.log, "a")
        launcher = ["--launcher", "torchrun"] if ON_CPU else []  # accelerate starts one CPU process (DESIGN.md)
        return subprocess.Popen([sys.executable, "-m", "lexfine.cli", "train", str(self.path), *launcher], stdout=f,
                                stderr=f, env=self.env(**env), start_new_session=True)

    def train(self, timeout: int = 420) -> "Run":
        t0 = time.time()
        proc = self.start()
        try:
            self.rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            self.rc = 124
        self.wall_s = round(time.time() - t0, 1)
        return self

    reused = False

    def completed(self) -> bool:
        found = sorted(Path(self.cfg["output_dir"]).glob(f"{self.cfg['name']}-*/manifest.json"))
        return bool(found) and json.loads(found[-1].read_text()).get("status") == "completed"

    @property
    def dir(self) -> Path:
        found = sorted(Path(self.cfg["output_dir"]).glob(f"{self.cfg['name']}-*"))
        assert found, f"{self.name}: no run directory; log tail:\n{self.tail()}"
        return found[-1]

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def ok(self) -> "Run":
        assert self.rc == 0, f"{self.name}: exit code {self.rc}; log tail:\n{self.tail()}"
        return self

    def manifest(self) -> dict:
        return json.loads((self.dir / "manifest.json").read_text())

    def rows(self) -> list[dict]:
        path = self.dir / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []

    def train_rows(self) -> list[dict]:
        return [r for r in self.rows() if "loss" in r]

    def losses(self) -> list[float]:
        return [r["loss"] for r in self.train_rows()]


def cpu_env(strategy: str) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu", "LEXFINE_CPU_SHIM_DS": "1" if strategy.startswith("zero") else "0",
            "LEXFINE_CPU_SHIM_FSDP": "1" if strategy == "fsdp2" else "0"}


def record(test: str, run: Run, **extra) -> None:
    path = os.environ.get("LEXFINE_MGPU_RESULTS")
    if not path:
        return
    m = run.manifest() if run.rc == 0 else {}
    row = {"test": test, "name": run.cfg["name"], "method": run.cfg["method"], "model": run.cfg["model"],
           "strategy": run.cfg["launch"]["strategy"], "gpus": run.cfg["launch"]["num_processes"], "rc": run.rc,
           "wall_s": run.wall_s, "reused": run.reused, "timings": m.get("timings"), "tokens_per_s": m.get("tokens_per_s"),
           "peak_gpu_memory_gib": m.get("peak_gpu_memory_gib"), "save_s": m.get("save_s"), **extra}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def kill_tree(pid: int, sig=signal.SIGKILL) -> list[int]:
    pids = descendants(pid)
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    return pids


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_gone(pids: list[int], timeout: float = 30) -> bool:
    end = time.time() + timeout
    while any(alive(p) for p in pids) and time.time() < end:
        time.sleep(0.2)
    return not any(alive(p) for p in pids)


def fresh(path: Path) -> Path:
    """An empty output folder (a kept LEXFINE_MGPU_WORKDIR holds the previous session's run: it would be skipped)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_rank(pid: int) -> int | None:
    try:
        env = dict(x.split("=", 1) for x in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in x)
        return int(env["RANK"]) if "LEXFINE_RUN_LOCK" in env and "RANK" in env else None
    except (OSError, ValueError, KeyError):
        return None


def wait_for_step(run: Run, proc: subprocess.Popen, step: int, timeout: int = 360) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            pytest.fail(f"{run.name} ended (exit {proc.returncode}) before step {step}:\n{run.tail()}")
        try:
            if any(r.get("step", 0) >= step for r in run.train_rows()):
                return
        except (AssertionError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    kill_tree(proc.pid)
    pytest.fail(f"{run.name} did not reach step {step} in {timeout} s:\n{run.tail()}")
