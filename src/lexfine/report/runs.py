"""What every run source is converted into: `Run` and `RunSet`, and the small pure converters loaders share.

collect.py reads run directories and discovers inputs; wandb_export.py converts W&B exports; both produce these
objects and neither imports the other's reading code.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from lexfine.eval.metrics import top_answer_share

CURVE_COLUMNS = ("step", "loss", "tokens", "lr", "elapsed_s")


@dataclass
class Run:
    name: str
    source: str  # "lexfine" | "wandb"
    path: str
    method: str  # "lora" | "full"
    rank: int | None  # None for full fine-tuning
    lr: float | None
    size: str | None  # "8B", "135M", ... (None when nothing tells)
    curve: pd.DataFrame  # one row per logged optimizer step: CURVE_COLUMNS; loss may be NaN/inf (diverged)
    model: str | None = None
    evals: dict[str, dict[str, float]] = field(default_factory=dict)  # "<task>-<mode>" -> headline metrics
    base_evals: dict[str, dict[str, float]] = field(default_factory=dict)  # same, for the base model
    status: str | None = None
    tokens_per_s: float | None = None
    world_size: int | None = None
    num_nodes: int | None = None
    gpu: str | None = None
    strategy: str | None = None
    group: tuple = ()  # comparison group (report/identity.py): (source, shared-identity hash, LoRA-keys hash|None)
    identity: dict | None = None  # the shared training identity (lexfine runs), to name what differs between groups
    random_weights: bool = False  # a random-weight model (random:<arch>) is never compared with trained weights
    nonfinite_steps: int = 0  # logged steps with a non-finite loss or grad norm (null + `nonfinite` flag)
    eval_settings: dict[str, dict] = field(default_factory=dict)  # "<key>" -> {data, split, limit} of the eval
    base_settings: dict[str, dict] = field(default_factory=dict)  # the same for base_evals (when recorded)
    seed: int | None = None  # same group and seed: the same batches in the same order (paired comparisons)

    @property
    def config_key(self) -> tuple:
        """Runs with the same key are replicates (other seeds, nodes, strategies) of one configuration."""
        return (self.method, self.rank, self.lr)


@dataclass
class RunSet:
    runs: list[Run]
    base_evals: dict[str, dict[str, dict[str, float]]]  # size -> "<task>-<mode>" -> metrics
    notes: list[str]  # what was skipped and why: shown in the report
    inputs: list[str]

    def sizes(self) -> list[str]:
        return sorted({r.size or "unknown" for r in self.runs}, key=size_sort_key)


# ------------------------------------------------------------------------------------------------
# Sizes


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


# ------------------------------------------------------------------------------------------------
# Small helpers shared by the loaders


def to_float(x: Any) -> float | None:
    """A number or None; 'nan'/'inf' strings become float nan/inf (a diverged loss must stay visible)."""
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    s = str(x).strip()
    if not s:
        return None
    try:
        return float(s)
    except ValueError:
        return None


def headline(summary: dict) -> dict[str, float]:
    """Keep the scalar metrics of an eval summary (accuracy, macro_f1, n, ...), drop breakdowns; add
    `top_answer_share` (the most frequent prediction's share) when the summary counts its predictions."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    for k, v in summary.items():  # confidence intervals [low, high] -> <k>_low, <k>_high
        if k.endswith("_ci95") and isinstance(v, (list, tuple)) and len(v) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            out[f"{k}_low"], out[f"{k}_high"] = float(v[0]), float(v[1])
    share = top_answer_share(summary.get("prediction_counts"))
    if share is not None and "top_answer_share" not in out:
        out["top_answer_share"] = share
    return out


def throughput_from_curve(curve: pd.DataFrame) -> float | None:
    """Tokens/s between the first and last logged step: leaves out start-up time before the first step."""
    c = curve.dropna(subset=["tokens", "elapsed_s"])
    if len(c) < 2:
        return None
    dt = float(c["elapsed_s"].iloc[-1] - c["elapsed_s"].iloc[0])
    dn = float(c["tokens"].iloc[-1] - c["tokens"].iloc[0])
    return dn / dt if dt > 0 and dn > 0 else None


def make_curve(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(CURVE_COLUMNS))
    for c in CURVE_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df.sort_values("step", kind="stable").reset_index(drop=True)
