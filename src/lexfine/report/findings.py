"""Findings computed from the runs themselves, per model size.

One smoothing everywhere: a run's final loss is the mean of its last K logged training losses (K = smooth_last,
default 20; all of them when fewer were logged). Replicates of one configuration (same size, method, rank, LR:
other seeds, node counts or ZeRO stages) are averaged over their non-diverged runs.
docs/report.md defines every finding; findings.json is written with sorted keys and floats rounded to 6
significant digits, so the same inputs give a byte-identical file.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any

from lexfine.report.runs import Run, RunSet, size_sort_key

SJP_KEYS = ("sjp-loglik", "sjp-generate")
LEXAM_KEYS = tuple(f"lexam_mcq{n}-{m}" for n in (4, 8, 16, 32) for m in ("loglik", "generate"))


@dataclass(frozen=True)
class Settings:
    smooth_last: int = 20
    """Final loss = mean of the last this-many logged training losses."""
    rank_tolerance: float = 0.005
    """Rank saturation: smallest rank whose loss is within this relative tolerance of the best LoRA loss."""
    max_lexam_drop: float = 5.0
    """Recommendation: allowed LEXam accuracy drop from the base model, in percentage points."""

    def describe(self) -> str:
        return f"mean of the last {self.smooth_last} logged training-loss values of each run"


def smoothed_final_loss(run: Run, k: int) -> float:
    losses = run.curve["loss"].tolist()
    if not losses:
        return math.nan
    tail = losses[-k:] if k > 0 else losses
    if any(not math.isfinite(x) for x in tail):
        return math.nan
    return sum(tail) / len(tail)


def first_loss(run: Run) -> float:
    losses = run.curve["loss"].tolist()
    return losses[0] if losses else math.nan


def is_diverged(run: Run, k: int) -> bool:
    """Non-finite loss anywhere, or a final (smoothed) loss above the first logged loss."""
    losses = run.curve["loss"].tolist()
    if any(not math.isfinite(x) for x in losses):
        return True
    return smoothed_final_loss(run, k) > first_loss(run)


def _argmin_lr(losses_by_lr: dict[float, float]) -> tuple[float | None, list[float]]:
    """Best LR and the LRs tied with it. Ties (equal to 1e-9 relative) go to the smaller LR: less forgetting."""
    finite = {lr: v for lr, v in losses_by_lr.items() if math.isfinite(v)}
    if not finite:
        return None, []
    best = min(finite.values())
    tied = sorted(lr for lr, v in finite.items() if abs(v - best) <= 1e-9 * max(abs(best), 1e-12))
    return tied[0], tied


def _edge(best: float | None, tried: list[float]) -> str | None:
    """Where the best LR sits in the grid: 'low'/'high' edge (the optimum may lie outside), 'single', or None."""
    if best is None or not tried:
        return None
    if len(tried) == 1:
        return "single"
    if best == min(tried):
        return "low"
    if best == max(tried):
        return "high"
    return None


def _pick_key(runs: list[Run], keys: tuple[str, ...], base: dict | None = None) -> str | None:
    """The first eval key that some run has (and, for LEXam, the base model too)."""
    extra = sorted({k for r in runs for k in r.evals if k.split("-")[0] == keys[0].split("-")[0]})
    for key in list(keys) + extra:
        has_base = base is None or _base_acc(base, runs, key) is not None  # a base score of 0.0 is a score
        if any("accuracy" in r.evals.get(key, {}) for r in runs) and has_base:
            return key
    return None


def _base_acc(size_base: dict, runs: list[Run], key: str) -> float | None:
    for r in runs:
        v = r.base_evals.get(key, {}).get("accuracy")
        if v is not None:
            return v
    v = size_base.get(key, {}).get("accuracy")
    return v


def _task_metric(runs: list[Run], key: str | None) -> str | None:
    if key is None:
        return None
    return "macro_f1" if any("macro_f1" in r.evals.get(key, {}) for r in runs) else "accuracy"


def size_findings(runs: list[Run], size_base: dict, s: Settings) -> dict[str, Any]:
    k = s.smooth_last
    final = {r.name: smoothed_final_loss(r, k) for r in runs}
    diverged = sorted(r.name for r in runs if is_diverged(r, k))
    ok = [r for r in runs if r.name not in diverged]

    # configuration losses: mean over non-diverged replicates
    groups: dict[tuple, list[float]] = {}
    for r in ok:
        groups.setdefault(r.config_key, []).append(final[r.name])
    cfg_loss = {key: sum(v) / len(v) for key, v in groups.items()}
    tried: dict[tuple, list[float]] = {}  # LRs tried per (method, rank), diverged runs included
    for r in runs:
        if r.lr is not None:
            tried.setdefault((r.method, r.rank), [])
            if r.lr not in tried[(r.method, r.rank)]:
                tried[(r.method, r.rank)].append(r.lr)

    def by_lr(method: str, rank: int | None) -> dict[float, float]:
        return {lr: v for (m, rk, lr), v in cfg_loss.items() if m == method and rk == rank and lr is not None}

    ranks = sorted({r.rank for r in runs if r.method == "lora" and r.rank is not None})
    full_lr, full_ties = _argmin_lr(by_lr("full", None))
    lora_best_lr: dict[int, float | None] = {}
    lora_best_loss: dict[int, float] = {}
    ties: dict[str, list[float]] = {}
    for rank in ranks:
        lr, tied = _argmin_lr(by_lr("lora", rank))
        lora_best_lr[rank] = lr
        lora_best_loss[rank] = by_lr("lora", rank)[lr] if lr is not None else math.nan
        if len(tied) > 1:
            ties[f"lora_r{rank}"] = tied
    if len(full_ties) > 1:
        ties["full"] = full_ties
    full_best = by_lr("full", None).get(full_lr, math.nan) if full_lr is not None else math.nan

    finite_ranks = [rk for rk in ranks if math.isfinite(lora_best_loss[rk])]
    best_rank = None
    if finite_ranks:  # ties (to 1e-9 relative, as for LRs) go to the smaller rank: cheaper, same loss
        low = min(lora_best_loss[rk] for rk in finite_ranks)
        best_rank = min(rk for rk in finite_ranks if lora_best_loss[rk] - low <= 1e-9 * max(abs(low), 1e-12))
    lora_best = lora_best_loss[best_rank] if best_rank is not None else math.nan
    best_lora_lr = lora_best_lr.get(best_rank) if best_rank is not None else None

    per_rank_lrs = [lora_best_lr[rk] for rk in finite_ranks]
    ratio = best_lora_lr / full_lr if best_lora_lr and full_lr else None
    # the median of per-rank best LRs, taken in log space so that an even count stays on a geometric midpoint
    median_lr = math.exp(statistics.median(math.log(x) for x in per_rank_lrs)) if per_rank_lrs else None

    saturation = None
    if best_rank is not None:
        within = [rk for rk in finite_ranks if lora_best_loss[rk] <= lora_best * (1 + s.rank_tolerance)]
        sat = min(within)
        above = [lora_best_loss[rk] for rk in finite_ranks if rk >= sat]
        saturation = {
            "rank": sat,
            "tolerance": s.rank_tolerance,
            "ranks_within_tolerance": within,
            "spread_at_or_above": (max(above) - min(above)) / min(above),
            "all_at_or_above_within_tolerance": all(rk in within for rk in finite_ranks if rk >= sat),
        }

    out: dict[str, Any] = {
        "smoothing": s.describe(),
        "settings": {"smooth_last": s.smooth_last, "rank_tolerance": s.rank_tolerance,
                     "max_lexam_drop_points": s.max_lexam_drop},
        "n_runs": len(runs),
        "best_lr": {"full": full_lr, "lora": {str(rk): lora_best_lr[rk] for rk in ranks}},
        "best_lr_ties": ties,
        "lrs_tried": {("full" if m == "full" else f"lora_r{rk}"): sorted(v) for (m, rk), v in
                      sorted(tried.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))},
        "best_lr_at_grid_edge": {
            "full": _edge(full_lr, tried.get(("full", None), [])),
            "lora": {str(rk): _edge(lora_best_lr[rk], tried.get(("lora", rk), [])) for rk in ranks},
        },
        "lr_ratio_lora_over_full": ratio,
        "lr_ratio_basis": "LR of the best LoRA configuration (lowest smoothed loss over all ranks) / best full FT LR",
        "lr_ratio_median_over_ranks": median_lr / full_lr if median_lr and full_lr else None,
        "lr_ratio_per_rank": {str(rk): (lora_best_lr[rk] / full_lr if lora_best_lr[rk] and full_lr else None)
                              for rk in ranks},
        "rank_independent": (len(set(per_rank_lrs)) == 1) if per_rank_lrs else None,
        "best_lr_spread": ({"min": min(per_rank_lrs), "max": max(per_rank_lrs),
                            "max_over_min": max(per_rank_lrs) / min(per_rank_lrs)} if per_rank_lrs else None),
        "final_loss": {"full_best": full_best, "full_best_lr": full_lr, "lora_best": lora_best,
                       "lora_best_rank": best_rank, "lora_best_lr": best_lora_lr,
                       "lora_best_per_rank": {str(rk): lora_best_loss[rk] for rk in ranks}},
        "loss_gap_full_vs_best_lora": ((full_best - lora_best) / lora_best
                                       if math.isfinite(full_best) and math.isfinite(lora_best) else None),
        "rank_saturation": saturation,
        "diverged": diverged,
        "incomplete": sorted(r.name for r in runs if r.status not in (None, "completed")),
    }
    out["recommended"], out["retention"], runs_info = _recommend(runs, ok, final, size_base, s)
    out["runs"] = {r.name: {"method": r.method, "rank": r.rank, "lr": r.lr, "final_loss": final[r.name],
                            "first_loss": first_loss(r), "steps": len(r.curve), "diverged": r.name in diverged,
                            "status": r.status, **runs_info.get(r.name, {})} for r in runs}
    out["throughput"] = _throughput(runs)
    return out


def _recommend(runs, ok, final, size_base, s: Settings):
    task_key = _pick_key(runs, SJP_KEYS)
    metric = _task_metric(runs, task_key)
    lexam_key = _pick_key(runs, LEXAM_KEYS, size_base)
    base_acc = _base_acc(size_base, runs, lexam_key) if lexam_key else None
    info: dict[str, dict] = {}
    for r in runs:
        d: dict[str, Any] = {}
        if task_key and metric in r.evals.get(task_key, {}):
            d["task_metric"] = r.evals[task_key][metric]
        if lexam_key and "accuracy" in r.evals.get(lexam_key, {}):
            d["lexam_accuracy"] = r.evals[lexam_key]["accuracy"]
            own_base = r.base_evals.get(lexam_key, {}).get("accuracy", base_acc)
            if own_base is not None:
                d["lexam_drop_points"] = 100 * (own_base - d["lexam_accuracy"])
        info[r.name] = d
    retention = {"task_key": task_key, "task_metric": metric, "lexam_key": lexam_key, "lexam_base_accuracy": base_acc,
                 "max_drop_points": s.max_lexam_drop}

    def pick(cands, keyf):
        return min(cands, key=keyf) if cands else None

    def rec(r: Run | None, why: str, criterion: str) -> dict:
        if r is None:
            return {"run": None, "why": why, "criterion": criterion}
        return {"run": r.name, "why": why, "criterion": criterion, "method": r.method, "rank": r.rank, "lr": r.lr,
                "final_loss": final[r.name], **info[r.name]}

    scored = [r for r in ok if "task_metric" in info[r.name]]
    if not ok:
        return rec(None, "every run diverged", "none"), retention, info
    if not scored:
        r = pick(ok, lambda r: (final[r.name], r.name))
        return rec(r, f"no task evaluations: lowest final loss ({s.describe()}) = {final[r.name]:.4f}",
                   "lowest_loss"), retention, info
    task_desc = f"SJP {metric} ({task_key})"
    best_task = lambda r: (-info[r.name]["task_metric"], final[r.name], r.name)  # noqa: E731
    with_drop = [r for r in scored if "lexam_drop_points" in info[r.name]]
    if not with_drop:
        r = pick(scored, best_task)
        return rec(r, f"highest {task_desc} = {info[r.name]['task_metric']:.4f}; no LEXam scores with a base-model "
                   "score, so retention was not checked", "task_metric_unchecked"), retention, info
    eligible = [r for r in with_drop if info[r.name]["lexam_drop_points"] <= s.max_lexam_drop + 1e-9]
    if eligible:
        r = pick(eligible, best_task)
        return rec(r, f"highest {task_desc} = {info[r.name]['task_metric']:.4f} among {len(eligible)} runs whose "
                   f"LEXam accuracy ({lexam_key}) is at most {s.max_lexam_drop:g} points below the base model "
                   f"({100 * base_acc:.1f}%); this run: {_drop_words(info[r.name]['lexam_drop_points'])}",
                   "task_metric_within_lexam_drop"), retention, info
    r = pick(with_drop, lambda r: (info[r.name]["lexam_drop_points"], best_task(r)))
    return rec(r, f"no run kept LEXam ({lexam_key}) within {s.max_lexam_drop:g} points of the base model; this run "
               f"has the smallest drop ({info[r.name]['lexam_drop_points']:.1f} points)",
               "smallest_lexam_drop"), retention, info


def _drop_words(points: float) -> str:
    return f"{points:.1f} points lower" if points >= 0.05 else (
        f"{-points:.1f} points higher" if points <= -0.05 else "unchanged")


def _throughput(runs: list[Run]) -> dict[str, Any]:
    """Tokens/s per run and, for runs of one configuration over different node counts, scaling efficiency."""
    rows = [{"run": r.name, "tokens_per_s": r.tokens_per_s, "num_nodes": r.num_nodes, "world_size": r.world_size,
             "gpu": r.gpu, "strategy": r.strategy} for r in runs if r.tokens_per_s]
    scaling = []
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.tokens_per_s and (r.num_nodes or r.world_size):
            # the LR does not change the speed: a group is one method/rank/strategy/GPU over node counts
            groups.setdefault((r.method, r.rank, r.strategy, r.gpu), []).append(r)
    for key, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        scale = lambda r: r.num_nodes or 1  # noqa: E731
        if len({scale(r) for r in members}) < 2:
            continue
        ref = min(members, key=lambda r: (scale(r), r.name))
        for r in sorted(members, key=lambda r: (scale(r), r.name)):
            speedup = r.tokens_per_s / ref.tokens_per_s
            scaling.append({"run": r.name, "num_nodes": scale(r), "reference": ref.name, "speedup": speedup,
                            "efficiency": speedup / (scale(r) / scale(ref))})
    return {"runs": rows, "scaling": scaling}


def compute(runset: RunSet, settings: Settings | None = None) -> dict[str, Any]:
    s = settings or Settings()
    out = {}
    for size in sorted({r.size or "unknown" for r in runset.runs}, key=size_sort_key):
        runs = [r for r in runset.runs if (r.size or "unknown") == size]
        out[size] = size_findings(runs, runset.base_evals.get(size, {}), s)
    return out


def _round(o: Any, digits: int = 6) -> Any:
    if isinstance(o, bool) or o is None:
        return o
    if isinstance(o, float):
        if not math.isfinite(o):
            return None  # JSON has no NaN; a reader must not choke on a diverged run
        return float(f"{o:.{digits}g}")
    if isinstance(o, int):
        return o
    if isinstance(o, dict):
        return {str(k): _round(v, digits) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_round(v, digits) for v in o]
    if hasattr(o, "item"):  # numpy scalars
        return _round(o.item(), digits)
    return o


def to_json(findings: dict[str, Any]) -> str:
    return json.dumps(_round(findings), sort_keys=True, indent=2, allow_nan=False) + "\n"
