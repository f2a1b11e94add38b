"""Findings computed from the runs themselves, per model size.

One smoothing everywhere: a run's final loss is the mean of its last K logged training losses (K = smooth_last,
default 20; all of them when fewer were logged). Replicates of one configuration (same size, method, rank, LR:
other seeds, node counts or ZeRO stages) are averaged over their non-diverged runs. How sure a difference is:
report/resolution.py (standard errors within a run) and report/seeds.py (the spread between seeds).
docs/report.md defines every finding; findings.json is written with sorted keys and floats rounded to 6
significant digits, so the same inputs give a byte-identical file.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any

from lexfine.report.divergence import DivergenceRule, divergence
from lexfine.report.identity import differences
from lexfine.report.resolution import best_lr_resolution, best_lr_rule, gap_resolution, gap_z, smoothed_final_loss_se
from lexfine.report.runs import Run, RunSet, size_sort_key
from lexfine.report.seeds import seed_noise, seed_z
from lexfine.report.select import LEXAM_KEYS, recommend

__all__ = ["Settings", "compute", "to_json", "smoothed_final_loss", "is_diverged", "LEXAM_KEYS"]


@dataclass(frozen=True)
class Settings:
    smooth_last: int = 20
    """Final loss = mean of the last this-many logged training losses."""
    rank_tolerance: float = 0.005
    """Rank saturation: smallest rank whose loss is within this relative tolerance of the best LoRA loss."""
    max_lexam_drop: float = 5.0
    """Recommendation: allowed LEXam accuracy drop from the base model, in percentage points."""
    rise_margin: float = 0.02
    """Divergence: relative margin of the last window's mean over the first's (report/divergence.py)."""
    spike_ratio: float = 0.5
    """Divergence: a last window this fraction above the run's best rolling mean is a spike."""
    collapse_share: float = 0.9
    """Retention: a run that gives one answer letter to at least this share of the LEXam questions has collapsed
    (its accuracy is then the share of that letter among the gold answers, not knowledge): it never passes."""
    min_lrs_for_rank_claims: int = 3
    """Rank independence of the best LR: only ranks with at least this many LRs tried take part."""

    def describe(self) -> str:
        return f"mean of the last {self.smooth_last} logged training-loss values of each run"

    @property
    def rule(self) -> DivergenceRule:
        return DivergenceRule(smooth_last=self.smooth_last, rise_margin=self.rise_margin, spike_ratio=self.spike_ratio)


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


def divergence_reason(run: Run, s: Settings | int) -> str | None:
    rule = s.rule if isinstance(s, Settings) else Settings(smooth_last=s).rule
    return divergence(run.curve["loss"].tolist(), rule, nonfinite_steps=run.nonfinite_steps, status=run.status)


def is_diverged(run: Run, s: Settings | int) -> bool:
    """Non-finite values, a significant rise from the first to the last window, or a late spike (divergence.py)."""
    return divergence_reason(run, s) is not None


def _rel(a: float, b: float) -> float | None:
    """(a - b) / b, or None when b is zero or a value is missing (a zero loss must not divide)."""
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return (a - b) / b

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


def group_findings(runs: list[Run], size_base: dict, s: Settings) -> dict[str, Any]:
    """Findings over one comparison group of completed runs (report/identity.py)."""
    k = s.smooth_last
    final = {r.name: smoothed_final_loss(r, k) for r in runs}
    reasons = {r.name: divergence_reason(r, s) for r in runs}
    diverged = sorted(n for n, why in reasons.items() if why)
    ok = [r for r in runs if r.name not in diverged]

    # configuration losses: mean over non-diverged replicates
    groups: dict[tuple, list[float]] = {}
    for r in ok:
        groups.setdefault(r.config_key, []).append(final[r.name])
    cfg_loss = {key: sum(v) / len(v) for key, v in groups.items()}
    ses: dict[tuple, list[float]] = {}
    for r in ok:
        ses.setdefault(r.config_key, []).append(smoothed_final_loss_se(r, k))
    cfg_se = {key: math.sqrt(sum(x * x for x in v)) / len(v) for key, v in ses.items()}  # SE of the mean
    members: dict[tuple, list[Run]] = {}
    for r in ok:
        members.setdefault(r.config_key, []).append(r)

    def runs_by_lr(method: str, rank: int | None) -> dict[float, list[Run]]:
        return {lr: v for (m, rk, lr), v in members.items() if m == method and rk == rank and lr is not None}
    tried: dict[tuple, list[float]] = {}  # LRs tried per (method, rank), diverged runs included
    for r in runs:
        if r.lr is not None:
            tried.setdefault((r.method, r.rank), [])
            if r.lr not in tried[(r.method, r.rank)]:
                tried[(r.method, r.rank)].append(r.lr)

    def by_lr(method: str, rank: int | None, table: dict | None = None) -> dict[float, float]:
        return {lr: v for (m, rk, lr), v in (cfg_loss if table is None else table).items()
                if m == method and rk == rank and lr is not None}

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

    # a rank with one or two LRs tried has no located optimum: it takes no part in rank-independence claims
    covered = [rk for rk in finite_ranks if len(tried.get(("lora", rk), [])) >= s.min_lrs_for_rank_claims]
    per_rank_lrs = [lora_best_lr[rk] for rk in covered]
    ratio = best_lora_lr / full_lr if best_lora_lr and full_lr else None
    # the median of per-rank best LRs, taken in log space so that an even count stays on a geometric midpoint
    median_lr = math.exp(statistics.median(math.log(x) for x in per_rank_lrs)) if per_rank_lrs else None

    recommended, retention, runs_info = recommend(runs, ok, final, size_base, s.max_lexam_drop, s.describe(),
                                                  s.collapse_share)
    noise = seed_noise(members, final, runs_info, retention)
    full_runs = members.get(("full", None, full_lr), [])
    lora_runs = members.get(("lora", best_rank, best_lora_lr), [])
    gap = None
    if full_lr is not None and best_rank is not None:
        gap = gap_z(full_runs, lora_runs, full_best - lora_best, cfg_se.get(("full", None, full_lr)),
                    cfg_se.get(("lora", best_rank, best_lora_lr)), k)

    saturation = None
    if best_rank is not None:  # over the ranks tried at (at least) every LR the best rank was tried at
        best_grid = set(tried.get(("lora", best_rank), []))
        same = [rk for rk in finite_ranks if best_grid <= set(tried.get(("lora", rk), []))]
        within = [rk for rk in same if lora_best_loss[rk] <= lora_best * (1 + s.rank_tolerance)]
        sat = min(within)
        above = [lora_best_loss[rk] for rk in same if rk >= sat]
        saturation = {
            "rank": sat,
            "tolerance": s.rank_tolerance,
            "ranks_within_tolerance": within,
            "spread_at_or_above": _rel(max(above), min(above)),
            "all_at_or_above_within_tolerance": all(rk in within for rk in same if rk >= sat),
            "ranks": same,
            "ranks_left_out": [rk for rk in finite_ranks if rk not in same],  # not tried at the best rank's LRs
            # ranks whose best loss is less than 2 seed standard errors above the best rank's: seed noise cannot
            # tell them apart (None: seed noise not measured)
            "ranks_within_seed_noise": None if noise is None else [
                rk for rk in same if (seed_z(lora_best_loss[rk] - lora_best, noise,
                                             members.get(("lora", rk, lora_best_lr[rk]), []),
                                             members.get(("lora", best_rank, best_lora_lr), [])) or 0.0) < 2],
        }

    out: dict[str, Any] = {
        "smoothing": s.describe(),
        "divergence_rule": s.rule.describe(),
        "settings": {"smooth_last": s.smooth_last, "rank_tolerance": s.rank_tolerance,
                     "max_lexam_drop_points": s.max_lexam_drop, "rise_margin": s.rise_margin,
                     "spike_ratio": s.spike_ratio, "collapse_share": s.collapse_share,
                     "min_lrs_for_rank_claims": s.min_lrs_for_rank_claims},
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
        "rank_independent": (len(set(per_rank_lrs)) == 1) if len(per_rank_lrs) >= 2 else None,
        "rank_independence_ranks": covered,
        "rank_independence_excluded": {str(rk): f"{len(tried.get(('lora', rk), []))} LR(s) tried, fewer than "
                                                f"{s.min_lrs_for_rank_claims}" for rk in finite_ranks
                                       if rk not in covered},
        "best_lr_spread": ({"min": min(per_rank_lrs), "max": max(per_rank_lrs),
                            "max_over_min": max(per_rank_lrs) / min(per_rank_lrs)} if per_rank_lrs else None),
        "final_loss": {"full_best": full_best, "full_best_lr": full_lr, "lora_best": lora_best,
                       "lora_best_rank": best_rank, "lora_best_lr": best_lora_lr,
                       "lora_best_per_rank": {str(rk): lora_best_loss[rk] for rk in ranks}},
        "loss_gap_full_vs_best_lora": _rel(full_best, lora_best),
        "loss_gap_z": gap,
        "loss_gap_resolution": gap_resolution(gap, full_best - lora_best, noise, full_runs, lora_runs),
        "best_lr_resolution": {
            "full": best_lr_resolution(by_lr("full", None), by_lr("full", None, cfg_se), full_lr,
                                       runs_by_lr("full", None), k, noise),
            "lora": {str(rk): best_lr_resolution(by_lr("lora", rk), by_lr("lora", rk, cfg_se), lora_best_lr[rk],
                                                 runs_by_lr("lora", rk), k, noise) for rk in ranks},
            "rule": best_lr_rule(noise),
        },
        "seed_noise": noise,
        "rank_saturation": saturation,
        "diverged": diverged,
    }
    out["recommended"], out["retention"] = recommended, retention
    out["runs"] = {r.name: {"method": r.method, "rank": r.rank, "lr": r.lr, "final_loss": final[r.name],
                            "final_loss_se": smoothed_final_loss_se(r, k),
                            "first_loss": first_loss(r), "steps": len(r.curve), "diverged": r.name in diverged,
                            "divergence": reasons[r.name], "status": r.status, **runs_info.get(r.name, {})}
                   for r in runs}
    out["throughput"] = _throughput(runs)
    return out


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


SPLITS = {
    "final_loss, best_lr, loss_gap, rank_saturation": "training loss (the training split, as logged)",
    "task_metric_validation": "SJP validation years (2015-2016): the selection score",
    "task_metric_test": "SJP test years (2017-2020): reported once, for the selected run",
    "lexam_accuracy, lexam_drop_points": "LEXam test split (a retention constraint, not a selection score)",
}


def comparison_groups(runs: list[Run]) -> dict[str, list[Run]]:
    """Comparable runs by group label. LoRA runs group on (source, shared identity, LoRA keys other than r); a full
    fine-tune joins every LoRA group of its shared identity (or forms one when there is none)."""
    shared: dict[tuple, dict[str | None, list[Run]]] = {}
    for r in runs:
        key = r.group[:2] if r.group else (r.source, r.size)
        shared.setdefault(key, {}).setdefault(r.group[2] if len(r.group) > 2 else None, []).append(r)
    found: list[tuple[list[Run], dict]] = []
    for by_lora in shared.values():
        fulls = by_lora.pop(None, [])
        for members in (by_lora.values() if by_lora else [[]]):
            group = members + fulls
            first = next((r for r in group if r.method == "lora"), group[0])
            found.append((group, dict(first.identity or {})))
    labels = [_label(g[0]) for g, _ in found]
    out: dict[str, list[Run]] = {}
    for label in sorted(set(labels), key=lambda x: (size_sort_key(x.split("-")[0]), x)):
        idx = [i for i, lb in enumerate(labels) if lb == label]
        diffs = differences([found[i][1] for i in idx]) if len(idx) > 1 else [{}]
        for i, diff in zip(idx, diffs):
            name = label if len(idx) == 1 else f"{label} [" + ", ".join(f"{k}={v}" for k, v in diff.items()) + "]"
            out[name] = sorted(found[i][0], key=lambda r: r.name)
    return out


def _label(r: Run) -> str:
    return (r.size or "unknown") + ("-random" if r.random_weights else "")


def compute(runset: RunSet, settings: Settings | None = None) -> dict[str, Any]:
    """findings.json: {groups: {label: findings}, diverged: [run ids], not_completed: {run: status}, ...}.

    Only `completed` runs enter a group's findings; diverged ones (any status) are listed and never ranked."""
    s = settings or Settings()
    diverged = sorted(r.name for r in runset.runs if is_diverged(r, s))
    completed = [r for r in runset.runs if r.status == "completed"]
    groups = comparison_groups(completed)
    out = {
        "groups": {label: group_findings(runs, runset.base_evals.get(runs[0].size or "unknown", {}), s)
                   for label, runs in groups.items()},
        "diverged": diverged,
        "not_completed": {r.name: r.status or "unknown" for r in runset.runs if r.status != "completed"},
        "splits": SPLITS,
        "grouping": ("runs are compared only within a group: same training identity (config without output, "
                     "evaluation, launch and speed keys; global batch = batch x accumulation x processes) except "
                     "the sweep axes train.lr, lora.r, method and the seed; full fine-tunes join the LoRA groups "
                     "they share the rest with"),
    }
    if any(" [" in label for label in groups):
        out["mixed"] = ("the inputs hold runs that differ in more than the sweep axes and the seed: each group is "
                        "reported on its own; the bracket names the keys that differ")
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
