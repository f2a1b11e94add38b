"""Run names: `<sweep>-<method>[-r<rank>]-lr<lr>[-<other swept keys>]`, e.g. ref8b-lora-r16-lr1e-4.

The name is part of the run id (RunConfig.run_id() hashes it), so it depends only on the keys a sweep sets, never
on how many values a list holds: adding a learning rate to a grid keeps the ids (and the finished runs) of the
others.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lexfine.config import ID_EXCLUDE, RunConfig

ABBREV = {
    "lora.alpha": "a", "lora.dropout": "do", "lora.use_rslora": "rslora", "lora.use_dora": "dora",
    "train.batch_size": "bs", "train.grad_accum": "ga", "train.max_length": "len", "train.epochs": "ep",
    "train.max_steps": "steps", "train.seed": "seed", "train.warmup_ratio": "wu", "train.weight_decay": "wd",
    "train.lr_scheduler": "sched", "data.loss_on": "loss", "data.limit": "n", "model": "m",
}


def fmt_value(v: Any) -> str:
    """Short, stable text for a value: 1e-4 -> '1e-4', 3.0e-05 -> '3e-5', 0.05 -> '0.05', True -> 'true'."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if v == 0 or 1e-2 <= abs(v) < 1e4:
            return f"{v:g}"
        mant, exp = f"{v:.6e}".split("e")
        mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(exp)}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"), sort_keys=True)
    return str(v)


def _id_excluded(key: str) -> bool:
    parts = key.split(".")
    rule = ID_EXCLUDE.get(parts[0])
    return rule is True or (isinstance(rule, set) and len(parts) > 1 and parts[1] in rule)


def _label(key: str, value: Any) -> str:
    text = fmt_value(value)
    if isinstance(value, str) and "/" in value:  # a path or hub id: its last part names it
        text = re.sub(r"(\.(jsonl|json|parquet|csv|ya?ml|txt|gz))+$", "", value.rstrip("/").rsplit("/", 1)[-1])
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:40] or "x"
    abbr = ABBREV.get(key, key.split(".")[-1])
    return f"{abbr}{text}" if text[0].isdigit() else f"{abbr}-{text}"


def run_name(sweep: str, cfg: RunConfig, assignment: dict[str, Any]) -> str:
    """<sweep>-<method>[-r<rank>]-lr<lr>[-<other swept keys>]: readable, and stable while lists grow."""
    parts = [sweep, cfg.method]
    if cfg.method == "lora":
        parts.append(f"r{cfg.lora.r}")
    parts.append(f"lr{fmt_value(cfg.train.lr)}")
    for k, v in assignment.items():
        if k in ("method", "lora.r", "train.lr") or _id_excluded(k):
            continue
        parts.append(_label(k, v))
    return "-".join(parts)[:150].rstrip("._-")
