"""Which GPUs a local sweep may pack runs onto, and how much memory each has.

`--gpus auto` is every visible GPU: the entries of CUDA_VISIBLE_DEVICES when it is set, else nvidia-smi's indices,
else torch.cuda.device_count(); none (a CPU machine) means the sequential runner. `--gpus 0,1` names them
(as CUDA_VISIBLE_DEVICES values: what each run's process is given). `--gpus none` forces the sequential runner.

nvidia-smi is asked first so that the sweep runner never creates a CUDA context of its own (that would hold
~0.5 GiB on GPU 0 for the whole sweep).

`free_memory()` asks nvidia-smi (again without a CUDA context) how much memory each GPU has free right now: the
packed runner's free-memory gate (sweep/gate.py) starts nothing on a GPU that other processes have filled.

Testing hook: LEXFINE_FAKE_GPUS="0:80,1:80" (id:GiB, comma-separated) replaces the detection, so that the
scheduler runs real processes on a CPU machine (they get CUDA_VISIBLE_DEVICES and ignore it); "0:80:5.5" (id:GiB:free
GiB) also fakes the free memory (unknown, so never waited for, when left out).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from lexfine.errors import ConfigError

FAKE_ENV = "LEXFINE_FAKE_GPUS"


@dataclass(frozen=True)
class Gpu:
    id: str
    """What CUDA_VISIBLE_DEVICES of a run's process is set to (an index or a UUID)."""
    memory_gib: float | None
    name: str = "GPU"


def _fake(spec: str) -> list[Gpu]:
    out = []
    for item in spec.split(","):
        gid, _, mem = item.strip().partition(":")
        mem = mem.partition(":")[0]
        if gid:
            out.append(Gpu(gid, float(mem) if mem else 80.0, "fake GPU"))
    return out


def _query(fields: str) -> list[list[str]] | None:
    """nvidia-smi --query-gpu=<fields> as rows of stripped strings; None when it cannot tell."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        res = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return [[p.strip() for p in line.split(",")] for line in res.stdout.splitlines() if line.strip()]


def _nvidia_smi() -> list[Gpu] | None:
    rows = _query("index,uuid,memory.total,name")
    if rows is None:
        return None
    gpus = []
    for parts in rows:
        if len(parts) >= 4:
            try:
                gpus.append(Gpu(parts[0], float(parts[2]) / 1024, ",".join(parts[3:])))  # MiB -> GiB
            except ValueError:
                continue
            gpus.append(Gpu(parts[1], float(parts[2]) / 1024, ",".join(parts[3:])))  # the same GPU by UUID
    return gpus


def _torch() -> list[Gpu]:
    try:
        import torch

        n = torch.cuda.device_count()
        return [Gpu(str(i), torch.cuda.get_device_properties(i).total_memory / 2**30, torch.cuda.get_device_name(i))
                for i in range(n)]
    except Exception:
        return []


def free_memory() -> dict[str, float]:
    """GiB free now on each GPU, by index and by UUID (both name it in CUDA_VISIBLE_DEVICES); GPUs it cannot tell
    (no nvidia-smi, MIG slices, "[N/A]") are absent: the gate lets runs start there, as before it existed."""
    fake = os.environ.get(FAKE_ENV)
    if fake is not None:
        out = {}
        for item in fake.split(","):
            parts = item.strip().split(":")
            if len(parts) >= 3 and parts[0] and parts[2]:
                out[parts[0]] = float(parts[2])
        return out
    out = {}
    for parts in _query("index,uuid,memory.free") or []:
        if len(parts) >= 3:
            try:
                free = float(parts[2]) / 1024  # MiB -> GiB
            except ValueError:
                continue
            out[parts[0]] = out[parts[1]] = free
    return out


def inventory() -> list[Gpu]:
    """Every GPU this process may hand out, by CUDA_VISIBLE_DEVICES value (the fake list when set)."""
    fake = os.environ.get(FAKE_ENV)
    if fake is not None:
        return _fake(fake)
    smi = _nvidia_smi()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if smi is None:
        found = _torch()  # counts the visible GPUs only, numbered from 0: give them their visible names back
        if visible is not None:
            ids = [v.strip() for v in visible.split(",") if v.strip()]
            found = [Gpu(i, g.memory_gib, g.name) for i, g in zip(ids, found)]
        return found
    by_id = {g.id: g for g in smi}
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return [by_id.get(i, Gpu(i, None)) for i in ids if not i.startswith("-")]
    seen, out = set(), []
    for g in smi:
        if not g.id.startswith("GPU-") and g.id not in seen:  # indices only, once each
            seen.add(g.id)
            out.append(g)
    return out


def select(spec: str) -> list[Gpu]:
    """The GPUs of a --gpus value: `auto`, `none` (or `cpu`), or ids `0,1`. An empty list: run sequentially."""
    spec = spec.strip().lower() if spec.strip().lower() in ("auto", "none", "cpu") else spec.strip()
    if spec in ("none", "cpu"):
        return []
    found = inventory()
    if spec == "auto":
        return found
    ids = [i.strip() for i in spec.split(",") if i.strip()]
    if not ids or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus {spec!r} is not auto, none or distinct ids such as 0,1")
    by_id = {g.id: g for g in found}
    missing = [i for i in ids if i not in by_id]
    if missing:
        have = ", ".join(g.id for g in found) or "none"
        raise ConfigError(f"--gpus {spec!r}: GPU {missing[0]} is not visible here (visible: {have}); "
                          "use --gpus auto, or --gpus none to run one run after another")
    return [by_id[i] for i in ids]
