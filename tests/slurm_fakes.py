"""Fake `sbatch`, `srun`, `scontrol`, `squeue` (and any recorder tool) on PATH: they capture argv and environment.

    fakes = install(tmp_path)                       # a bin dir + a JSONL log
    subprocess.run(["bash", script], env=fakes.env(SLURM_JOB_NODELIST="nid[001-002]"))
    fakes.calls("srun")                             # [{"argv": [...], "env": {...}, "cwd": ...}, ...]

srun runs its command once per node, concurrently, with SLURM_NODEID/SLURM_PROCID set as srun would set them
(and with FAKE_NODE_GPUS=k, CUDA_VISIBLE_DEVICES: k GPUs of this host per "node").
scontrol expands simple nodelists (`nid[001-002]`, `a,b`, `localhost`) and accepts `requeue <id>`.
sbatch prints a new job id (1001, 1002, ...). A recorder tool (`recorder(name)`) logs and exits with
FAKE_<NAME>_RC (default 0); with FAKE_WRITE_STATUS=<status> and FAKE_MANIFEST=<path> it writes a manifest.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ENV_KEYS = ("SLURM_NODEID", "SLURM_PROCID", "SLURM_JOB_ID", "MASTER_ADDR", "MASTER_PORT", "LEXFINE_REQUEUE",
            "SLURM_JOB_NODELIST", "NCCL_NVLS_ENABLE")

_COMMON = r'''
import json, os, sys
def log(tool, **extra):
    row = {"tool": tool, "argv": sys.argv[1:], "cwd": os.getcwd(),
           "env": {k: os.environ.get(k) for k in ENV_KEYS}, **extra}
    with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
        f.write(json.dumps(row) + "\n")
'''

SRUN = r'''
import subprocess
args = sys.argv[1:]
opts = {}
i = 0
while i < len(args) and args[i].startswith("-"):
    k, _, v = args[i].partition("=")
    opts[k] = v
    i += 1
cmd = args[i:]
log("srun")
nodes = int(opts.get("--nodes") or os.environ.get("SLURM_JOB_NUM_NODES") or 1)
procs = []
# FAKE_NODE_GPUS=k: "node" n sees GPUs n*k .. n*k+k-1 (CUDA_VISIBLE_DEVICES), as on separate machines
per_node = int(os.environ.get("FAKE_NODE_GPUS", "0"))
for node in range(nodes):
    env = {**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node), "SLURM_LOCALID": "0",
           "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_NODES": str(nodes)}
    if per_node:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(node * per_node + i) for i in range(per_node))
        log("srun-node", node=node, cuda_visible_devices=env["CUDA_VISIBLE_DEVICES"])
    procs.append(subprocess.Popen(cmd, env=env))

def descendants(pid):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out

# FAKE_SIGNAL_WHEN=<file>: once the file has a line, send FAKE_SIGNAL (default USR1) to every process of the
# nodes in FAKE_SIGNAL_NODES (default all), as slurmstepd signals every process of a job step.
trigger = os.environ.get("FAKE_SIGNAL_WHEN")
if trigger:
    import signal, time
    sig = getattr(signal, "SIG" + os.environ.get("FAKE_SIGNAL", "USR1"))
    which = [int(n) for n in os.environ.get("FAKE_SIGNAL_NODES", ",".join(map(str, range(nodes)))).split(",")]
    while all(p.poll() is None for p in procs):
        if os.path.exists(trigger) and open(trigger).read().strip():
            for n in which:
                for pid in descendants(procs[n].pid):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            log("srun-signal", nodes=which)
            break
        time.sleep(0.02)
codes = [p.wait() for p in procs]
sys.exit(next((c for c in codes if c), 0))
'''

SCONTROL = r'''
import re
args = sys.argv[1:]
log("scontrol")
if args[:2] == ["show", "hostnames"]:
    spec = args[2] if len(args) > 2 else os.environ.get("SLURM_JOB_NODELIST", "")
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", spec):
        m = re.fullmatch(r"(.*)\[(.*)\]", part)
        if not m:
            print(part)
            continue
        for rng in m.group(2).split(","):
            a, _, b = rng.partition("-")
            for n in range(int(a), int(b or a) + 1):
                print(f"{m.group(1)}{n:0{len(a)}d}")
    sys.exit(0)
if args[:1] == ["requeue"]:
    sys.exit(int(os.environ.get("FAKE_SCONTROL_RC", "0")))
sys.exit(0)
'''

SBATCH = r'''
counter = os.environ["FAKE_SLURM_LOG"] + ".jobs"
n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1001
open(counter, "w").write(str(n))
log("sbatch", job_id=str(n))
print(f"{n}" if "--parsable" in sys.argv else f"Submitted batch job {n}")
'''

SQUEUE = r'''
log("squeue")
print(os.environ.get("FAKE_SQUEUE_OUT", "").replace(";", "\n"))  # e.g. "1001 PENDING;1003 RUNNING"
'''

RECORDER = r'''
log(TOOL)
status = os.environ.get("FAKE_WRITE_STATUS")
if status and os.environ.get("FAKE_MANIFEST"):
    with open(os.environ["FAKE_MANIFEST"], "w") as f:
        f.write(json.dumps({"run_id": "x", "status": status}, indent=2) + "\n")
sys.exit(int(os.environ.get("FAKE_" + TOOL.upper() + "_RC", "0")))
'''


@dataclass
class Fakes:
    bin: Path
    log: Path

    def env(self, **extra: str) -> dict:
        env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
               "FAKE_SLURM_LOG": str(self.log)}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def calls(self, tool: str | None = None) -> list[dict]:
        if not self.log.exists():
            return []
        rows = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        return [r for r in rows if tool is None or r["tool"] == tool]

    def recorder(self, name: str) -> Path:
        return _write(self.bin / name, f"TOOL = {name!r}\n" + RECORDER)


def _write(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\nENV_KEYS = {ENV_KEYS!r}\n{_COMMON}\n{body}")
    path.chmod(0o755)
    return path


def install(tmp_path: Path, recorders: tuple[str, ...] = ()) -> Fakes:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    fakes = Fakes(bin_dir, tmp_path / "fake_slurm.jsonl")
    for name, body in (("srun", SRUN), ("scontrol", SCONTROL), ("sbatch", SBATCH), ("squeue", SQUEUE)):
        _write(bin_dir / name, body)
    for name in recorders:
        fakes.recorder(name)
    return fakes


def flag(argv: list[str], name: str) -> str | None:
    """Value of `--name value` or `--name=value` in an argv list."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


__all__ = ["install", "Fakes", "flag"]
