"""Model sizes as report labels ("8B", "135M"): from what was trained (parameter count), the name only as a fallback."""

from __future__ import annotations

import math
import re
from typing import Any


def _float(x: Any) -> float | None:
    try:
        return float(x) if x is not None and not isinstance(x, bool) else None
    except (TypeError, ValueError):
        return None


_SIZE_RE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)([bBmMkK])(?![A-Za-z0-9])")


def size_from_name(name: str | None) -> str | None:
    """'random:apertus-8b' -> '8B', 'HuggingFaceTB/SmolLM2-135M-Instruct' -> '135M', '/models/x' -> None."""
    if not name:
        return None
    last = re.split(r"[/:\\]", str(name).rstrip("/"))[-1]  # a parent folder like /scratch/u4b must not count
    m = _SIZE_RE.search(last)
    if not m:
        return None
    num = m.group(1)
    num = num.rstrip("0").rstrip(".") if "." in num else num
    return f"{num}{m.group(2).upper()}"


def size_from_params(total: Any) -> str | None:
    try:
        n = float(total)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(n) or n <= 0:
        return None
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            if v >= 10 or abs(v - round(v)) <= 0.05 * v:  # a label: 8.05e9 parameters (Apertus-8B) is "8B"
                return f"{round(v)}{unit}"
            return f"{v:.1f}".rstrip("0").rstrip(".") + unit
    return f"{int(n)}"


def size_sort_key(size: str) -> tuple:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMB]?)", size or "")
    if not m:
        return (1, 0.0, size)
    return (0, float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[m.group(2)], size)


def model_size(cfg: dict, manifest: dict) -> str | None:
    """The base model's size from what was trained, never from the name alone: the parameter count in the manifest
    (minus the trainable adapter for LoRA), else the name when the architecture is not overridden
    (random:apertus-8b with arch_overrides is a tiny model, not an 8B)."""
    params = manifest.get("parameters") or {}
    total, trainable = _float(params.get("total")), _float(params.get("trainable"))
    if total:
        if cfg.get("method", "lora") == "lora" and trainable and trainable < total:
            total -= trainable
        return size_from_params(total)
    if (cfg.get("model_args") or {}).get("arch_overrides"):
        return None
    return size_from_name(cfg.get("model"))
