"""Which trainer checkpoints can be resumed from: a checkpoint counts only when it is complete.

HF's Trainer writes a checkpoint as weights -> optimizer/scheduler -> RNG state -> trainer_state.json (last, not
atomically), then deletes older checkpoints. A kill or a full disk during a save leaves a directory that looks like
a checkpoint but cannot be loaded. `checkpoint_problem` rejects one only on definite evidence, so that unusual but
valid layouts are not thrown away:

- trainer_state.json missing, unparsable, or with a global_step other than the directory's number;
- no weights in any layout the Trainer writes: LoRA (adapter_model.safetensors|.bin), full (model.safetensors,
  pytorch_model.bin, or a sharded *.index.json and its shards), DeepSpeed (global_step<N>/, named by `latest`),
  FSDP (pytorch_model_fsdp*);
- no optimizer state: optimizer.pt|.bin, optimizer_0/ (FSDP) or the DeepSpeed global_step folder (which holds it);
- a weights/optimizer/state file that is empty or cut short (a safetensors file whose header does not match its
  size; a torch zip archive without its end record).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import uuid
import zipfile
from pathlib import Path

log = logging.getLogger("lexfine.train")
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin",
            "model.safetensors.index.json", "pytorch_model.bin.index.json")
_OPTIMIZER = ("optimizer.pt", "optimizer.bin")
_CHECKED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")


def _file_problem(p: Path) -> str | None:
    """Why a file is not whole, or None. Only cheap checks: the size and the format's own end markers."""
    try:
        size = p.stat().st_size
    except OSError as e:
        return f"{p.name} cannot be read ({e.strerror})"
    if size == 0:
        return f"{p.name} is empty"
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if p.suffix == ".safetensors":
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if n <= 0 or 8 + n > size:
                    return f"{p.name} is cut short (no complete header)"
                header = json.loads(f.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if 8 + n + end != size:
                    return f"{p.name} is cut short ({size} of {8 + n + end} bytes)"
            elif head[:4] == b"PK\x03\x04" and not zipfile.is_zipfile(p):  # torch.save's zip archive
                return f"{p.name} is cut short (no zip end record)"
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        return f"{p.name} is unreadable ({type(e).__name__})"
    return None


def _shards(index: Path) -> list[Path]:
    try:
        names = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [index.parent / n for n in sorted(names)]


def checkpoint_problem(path: str | Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from, in a few words; None when it is complete."""
    path = Path(path)
    m = CHECKPOINT_RE.fullmatch(path.name)
    if not m or not path.is_dir():
        return "not a checkpoint directory"
    state = path / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json is missing (the save was cut short)"
    try:
        step = json.loads(state.read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        return "trainer_state.json is empty or not valid JSON (the save was cut short)"
    if step != int(m.group(1)):
        return f"trainer_state.json says global_step {step!r}, not {m.group(1)}"
    names = {p.name for p in path.iterdir()}
    ds_dirs = [path / n for n in names if n.startswith("global_step") and (path / n).is_dir()]
    if (path / "latest").is_file():
        try:
            tag = (path / "latest").read_text().strip()
        except OSError:
            tag = ""
        if not tag or not (path / tag).is_dir():
            return f"DeepSpeed's `latest` names {tag!r}, which is not in the checkpoint"
    fsdp = [n for n in names if n.startswith("pytorch_model_fsdp")]
    if not (names & set(_WEIGHTS) or ds_dirs or fsdp):
        return "no model or adapter weights"
    if not (names & set(_OPTIMIZER) or ds_dirs or any(n.startswith("optimizer_") for n in names)):
        return "no optimizer state"
    files = [path / n for n in sorted(names) if n.endswith(_CHECKED_SUFFIXES) and (path / n).is_file()]
    for index in [f for f in files if f.name.endswith(".index.json")]:
        files += _shards(index) or [index]
        if any(not s.exists() for s in _shards(index)):
            return f"{index.name} names shards that are missing"
    for d in ds_dirs + [path / n for n in fsdp + [n for n in names if n.startswith("optimizer_")] if (path / n).is_dir()]:
        files += [f for f in sorted(d.rglob("*")) if f.is_file()]
    for f in files:
        problem = _file_problem(f)
        if problem:
            return problem
    return None


def checkpoints_newest_first(checkpoints_dir: str | Path) -> list[tuple[int, Path]]:
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CHECKPOINT_RE.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def latest_complete(checkpoints_dir: str | Path, discard: bool = False) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones are logged with the reason and, with `discard`
    (the lock holder, before resuming), removed: the Trainer rotates checkpoints by age and number, so a broken
    one left in place could be kept while the last complete one is deleted."""
    for _, p in checkpoints_newest_first(checkpoints_dir):
        try:
            problem = checkpoint_problem(p)
        except OSError as e:  # removed under our feet (another rank discarding it)
            problem = f"unreadable ({e.strerror})"
        if problem is None:
            return p
        log.warning("skipping incomplete checkpoint %s: %s%s", p.name, problem, " (removed)" if discard else "")
        if discard:
            remove_checkpoint(p)
    return None


def remove_checkpoint(p: Path) -> None:
    """Rename out of the `checkpoint-*` namespace first (atomic: other ranks never see half a directory), then delete."""
    aside = p.with_name(f".incomplete-{p.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(p, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)
