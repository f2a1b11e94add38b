"""Model sizes as report labels ("8B", "135M"): from what was trained (parameter count), the name only as a fallback."""

from __future__ import annotations

from typing import Any

from lexfine.report.runs import size_from_name, size_from_params, size_sort_key  # noqa: F401


def _float(x: Any) -> float | None:
    try:
        return float(x) if x is not None and not isinstance(x, bool) else None
    except (TypeError, ValueError):
        return None


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
