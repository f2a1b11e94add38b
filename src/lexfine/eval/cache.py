"""Cache of *base-model* evaluations, so that a sweep of fifty runs scores the untrained model once per task.

Key: (model identity, task, mode, data fingerprint — which covers the prompt texts —, limit, max_length, prompt
settings, dtype, generation settings, scoring code version). Entries live in <lexfine cache>/eval/<key>/ (the
lexfine cache is ~/.cache/lexfine, or $LEXFINE_CACHE) and are written atomically (temp dir + rename), so that
concurrent runs at worst compute the same entry twice. Trained weights are never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from lexfine.rundir import atomic_write_json, read_json, read_jsonl, write_jsonl

# Bump when a change to prompts, scoring or metrics makes old entries wrong.
SCORING_VERSION = 2  # 2: length-normalised loglik variant, group macro-F1 over classes present


def root() -> Path:
    from lexfine.models import cache_dir

    return cache_dir() / "eval"


def make_key(payload: dict) -> str:
    blob = json.dumps({"v": SCORING_VERSION, **payload}, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def lookup(key: str) -> tuple[dict, list[dict]] | None:
    entry = root() / key
    try:
        if (entry / "summary.json").is_file() and (entry / "predictions.jsonl").is_file():
            return read_json(entry / "summary.json"), read_jsonl(entry / "predictions.jsonl")
    except (OSError, json.JSONDecodeError):
        pass  # a damaged entry is recomputed
    return None


def store(key: str, summary: dict, predictions: list[dict], payload: dict | None = None) -> Path | None:
    entry = root() / key
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}."))
        atomic_write_json(tmp / "summary.json", summary)
        write_jsonl(tmp / "predictions.jsonl", predictions)
        if payload is not None:
            atomic_write_json(tmp / "key.json", payload)
        try:
            os.replace(tmp, entry)
        except OSError:  # another process stored it first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
        return entry
    except OSError:
        return None  # a read-only cache must not fail an evaluation
