"""The run directory: the only interface between training, evaluation, sweeps and reports.

    <run_dir>/config.yaml      resolved RunConfig
    <run_dir>/manifest.json    status, versions, git sha, hardware, timings, token and truncation counts, evals
    <run_dir>/metrics.jsonl    one JSON object per logged optimizer step (+ eval_during rows: step and eval/ keys)
    <run_dir>/checkpoints/     resumable trainer checkpoints
    <run_dir>/adapter/ | model/  final LoRA adapter or full weights (+ tokenizer)
    <run_dir>/eval/<task>-<mode>/{predictions.jsonl, summary.json}

Only rank 0 writes; every write is atomic (temp file + rename) so a killed job never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import socket
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

STATUSES = ("planned", "running", "completed", "failed", "interrupted", "diverged")
# Manifest keys that describe one status: set_status removes them unless it sets them again.
STATE_DETAIL = ("error", "traceback", "failed_stage", "eval_error")
_DROP = object()
SECRET_ENV_PATTERN = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.I)


_UMASK = os.umask(0)
os.umask(_UMASK)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _clean(o: Any) -> Any:
    """Non-finite floats become null: JSON has no NaN, and readers must not choke on a diverged run."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(_clean(obj), indent=indent, sort_keys=False, default=_json_default, allow_nan=False)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; run directories are shared with a team
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, dumps(obj) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(dumps(r, indent=None) + "\n" for r in rows))


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill: skip it, the next resume rewrites the file
    return rows


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["lexfine", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "liger-kernel"]
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"host": socket.gethostname(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu_name"] = torch.cuda.get_device_name(0)
            info["gpus_per_node"] = torch.cuda.device_count()
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except Exception:
        pass
    info["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    info["num_nodes"] = int(os.environ.get("SLURM_NNODES", os.environ.get("LEXFINE_NUM_MACHINES", "1")))
    for k in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_ARRAY_TASK_ID"):
        if k in os.environ:
            info[k.lower()] = os.environ[k]
    return info


def redact(text: str) -> str:
    """Replace the values of secret-looking environment variables wherever they appear in `text`."""
    for k, v in os.environ.items():
        if v and len(v) >= 6 and SECRET_ENV_PATTERN.search(k):
            text = text.replace(v, f"<{k}>")
    return text


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # paths -------------------------------------------------------------------------------
    config_path = property(lambda self: self.path / "config.yaml")
    manifest_path = property(lambda self: self.path / "manifest.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    adapter_dir = property(lambda self: self.path / "adapter")
    model_dir = property(lambda self: self.path / "model")

    def eval_dir(self, task: str, mode: str) -> Path:
        return self.path / "eval" / f"{task}-{mode}"

    @staticmethod
    def is_run_dir(path: str | Path) -> bool:
        p = Path(path)
        return (p / "config.yaml").is_file() and (p / "manifest.json").is_file()

    # manifest ----------------------------------------------------------------------------
    def manifest(self) -> dict:
        """The manifest ({} before the run exists); a LexfineError (one line) when it is not a JSON object."""
        if not self.manifest_path.exists():
            return {}
        try:
            m = json.loads(self.manifest_path.read_bytes())
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            m, why = None, f"not JSON ({' '.join(str(e).split())[:80]})"
        else:
            why = f"a JSON {type(m).__name__}, not an object"
        if not isinstance(m, dict):
            from lexfine.errors import LexfineError

            raise LexfineError(f"{str(self.manifest_path)!r} is {why}; restore it from a backup, or delete the run "
                               f"directory {str(self.path)!r} to train the run again")
        return m

    def update_manifest(self, **fields: Any) -> dict:
        from lexfine.runlock import manifest_lock

        with manifest_lock(self.path):  # `lexfine eval` may record a result while the trainer writes
            m = self.manifest()
            m.update(fields)
            for k in [k for k, v in fields.items() if v is _DROP]:
                m.pop(k)
            atomic_write_json(self.manifest_path, m)
        return m

    @property
    def status(self) -> str | None:
        return self.manifest().get("status")

    def set_status(self, status: str, **fields: Any) -> dict:
        """A new status drops what described the old one (error, traceback, ...) unless it is given again."""
        assert status in STATUSES, status
        stale = {k: _DROP for k in STATE_DETAIL if k not in fields}
        return self.update_manifest(status=status, status_time=now_iso(), **stale, **fields)

    def create(self, config_yaml: str, run_id: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, config_yaml)
        if not self.manifest_path.exists():
            atomic_write_json(self.manifest_path, {"run_id": run_id, "status": "planned", "created": now_iso()})

    # checkpoints -------------------------------------------------------------------------
    def latest_checkpoint(self, discard_incomplete: bool = False) -> Path | None:
        """The newest *complete* checkpoint (see lexfine.checkpoints); incomplete newer ones are skipped, with
        `discard_incomplete` (the lock holder only) removed."""
        from lexfine.checkpoints import latest_complete

        return latest_complete(self.checkpoints, discard=discard_incomplete)

    # metrics -----------------------------------------------------------------------------
    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def train_metrics(self) -> list[dict]:
        """The training rows only (they carry `loss`), not the eval_during rows (`eval/...` keys)."""
        return [r for r in self.metrics() if "loss" in r]

    def append_metrics(self, row: dict) -> None:
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(dumps(row, indent=None) + "\n")
            f.flush()

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint we resume from (they will be logged again)."""
        rows = [r for r in self.metrics() if r.get("step", 0) <= step]
        write_jsonl(self.metrics_path, rows)

    # evaluations -------------------------------------------------------------------------
    def record_eval(self, task: str, mode: str, summary_path: Path, headline: dict) -> None:
        from lexfine.runlock import manifest_lock

        with manifest_lock(self.path):
            m = self.manifest()
            evals = m.get("evals", {})
            evals[f"{task}-{mode}"] = {"summary": str(summary_path.relative_to(self.path)), **headline}
            m["evals"] = evals
            atomic_write_json(self.manifest_path, m)


def timer() -> float:
    return time.perf_counter()
