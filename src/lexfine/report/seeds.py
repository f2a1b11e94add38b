"""Seed noise: how far a configuration's smoothed final loss moves when only the seed changes.

A run's own standard error (and the paired z of two runs on the same batches) measures batch-to-batch noise
within one trajectory. Another seed draws another data order and another initialisation of the LoRA weights, and
moves the final loss by more than that. Where a group holds configurations run with several seeds, their pooled
sample SD is the yardstick a best-LR or full-vs-LoRA difference must clear too (docs/report.md, "Seed noise").
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from lexfine.report.runs import Run

RULE = ("configurations (same group, method, rank and LR) run with two or more known seeds; runs of one seed (other "
        "node counts or strategies) are averaged first; sd: sample SD of the per-seed smoothed final losses; "
        "pooled_sd = sqrt(sum((n_i - 1) sd_i^2) / sum(n_i - 1)) over those configurations, df = sum(n_i - 1)")


def n_seeds(runs: list[Run]) -> int:
    """Independent draws a configuration's loss averages over: its distinct seeds (an unrecorded seed counts once)."""
    return len({r.seed for r in runs})


def _by_seed(runs: list[Run]) -> dict[int, list[Run]]:
    out: dict[int, list[Run]] = {}
    for r in sorted(runs, key=lambda r: r.name):  # seeds in the order of their first run's name
        if r.seed is not None:  # a run without a recorded seed cannot be told apart from another seed's run
            out.setdefault(r.seed, []).append(r)
    return out


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _configuration(key: tuple, by_seed: dict[int, list[Run]], final: dict[str, float],
                   info: dict[str, dict]) -> dict[str, Any]:
    method, rank, lr = key
    seeds = list(by_seed)
    losses = [_mean([final[r.name] for r in by_seed[sd]]) for sd in seeds]
    entry: dict[str, Any] = {"method": method, "rank": rank, "lr": lr, "n_seeds": len(seeds), "seeds": seeds,
                             "runs": [r.name for sd in seeds for r in by_seed[sd]], "final_losses": losses,
                             "sd": statistics.stdev(losses)}
    for name in ("task_metric_validation", "lexam_accuracy"):
        values = [_mean([info.get(r.name, {}).get(name) for r in by_seed[sd]]) for sd in seeds]
        entry[name] = values if any(v is not None for v in values) else None
    return entry


def seed_noise(members: dict[tuple, list[Run]], final: dict[str, float], info: dict[str, dict],
               retention: dict[str, Any]) -> dict[str, Any] | None:
    """`members`: config key -> the group's completed, non-diverged runs of it. None when no configuration has two
    seeds or a seed's loss is not finite."""
    configs = []
    for key in sorted(members, key=lambda k: (k[0], k[1] or 0, k[2] or 0)):
        by_seed = _by_seed(members[key])
        if len(by_seed) >= 2:
            configs.append(_configuration(key, by_seed, final, info))
    configs = [c for c in configs if all(math.isfinite(x) for x in c["final_losses"])]
    if not configs:
        return None
    df = sum(c["n_seeds"] - 1 for c in configs)
    pooled = math.sqrt(sum((c["n_seeds"] - 1) * c["sd"] ** 2 for c in configs) / df)
    return {"configurations": configs, "pooled_sd": pooled, "df": df, "rule": RULE,
            "task_metric": retention.get("task_metric"), "task_metric_key": retention.get("selection_key"),
            "lexam_key": retention.get("lexam_key")}


def seed_z(difference: float, noise: dict[str, Any] | None, a: list[Run], b: list[Run]) -> float | None:
    """difference / (pooled_sd * sqrt(1/n_a + 1/n_b)), n = seeds averaged in each compared configuration. None
    when seed noise was not measured (or measured as exactly zero: nothing to divide by)."""
    sd = (noise or {}).get("pooled_sd")
    if not sd or not a or not b or not math.isfinite(difference):
        return None
    return difference / (sd * math.sqrt(1 / n_seeds(a) + 1 / n_seeds(b)))


def rule_note(noise: dict[str, Any] | None) -> str:
    """What a `rule` string adds about seed noise."""
    if noise is None:
        return ("; seed noise was not measured (no configuration of this group has runs of two or more recorded "
                "seeds), so z covers only the batch-to-batch noise within one run's trajectory, not another seed's "
                "data order and initialisation")
    return ("; seed_z: the difference over its seed-to-seed standard error, pooled_sd (seed_noise) x "
            "sqrt(1/n_a + 1/n_b) with n the seeds averaged in each compared configuration")
