"""The recommendation: selected on the SJP validation years, reported once on the test years.

Eval keys name their split: `sjp-validation-<mode>` / `sjp-test-<mode>` (eval entries `sjp@validation`,
`sjp@test`); a plain `sjp-<mode>` takes the split its summary.json records (`settings.split`); the reference
study's exports (source wandb) scored the test years. LEXam has one split (test): it is a retention constraint,
not a selection score. A LEXam drop is computed only against a base-model score of the same task and mode on
the same data, split and limit (`settings` of both summaries), else no drop is reported.
"""

from __future__ import annotations

from typing import Any

from lexfine.report.runs import Run

MODES = ("loglik", "generate")
LEXAM_KEYS = tuple(f"lexam_mcq{n}-{m}" for n in (4, 8, 16, 32) for m in MODES)


def sjp_split(run: Run, key: str) -> str | None:
    parts = key.split("-")
    if parts[0] != "sjp":
        return None
    if len(parts) == 3:
        return parts[1]
    split = (run.eval_settings.get(key) or {}).get("split")
    if split is None and run.source == "wandb":
        return "test"
    return split


def _sjp_key(runs: list[Run], split: str, mode: str) -> str | None:
    """The eval key holding `split` scores in `mode` for most runs (split-named keys first)."""
    counts: dict[str, int] = {}
    for r in runs:
        for key in r.evals:
            if key.split("-")[0] == "sjp" and key.endswith(f"-{mode}") and sjp_split(r, key) == split:
                counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda k: (counts[k], len(k.split("-")) == 3, k))


def _metric(runs: list[Run], key: str | None) -> str | None:
    if key is None:
        return None
    return "macro_f1" if any("macro_f1" in r.evals.get(key, {}) for r in runs) else "accuracy"


def majority_level(metrics: dict, metric: str | None) -> float | None:
    """The task metric of always answering the majority class of a two-class task (SJP), from its share p:
    accuracy p; macro-F1 (2p/(1+p) + 0) / 2 = p/(1+p)."""
    p = metrics.get("majority_baseline")
    if p is None or metric not in ("accuracy", "macro_f1"):
        return None
    return p if metric == "accuracy" else p / (1 + p)


def base_lexam(run: Run, key: str, group_runs: list[Run], size_base: dict) -> float | None:
    """The base model's accuracy on the same task, mode, data, split and limit as this run's evaluation."""
    want = run.eval_settings.get(key)
    candidates = [(run.base_evals.get(key), run.base_settings.get(key))]
    candidates += [(o.base_evals.get(key), o.base_settings.get(key)) for o in group_runs if o is not run]
    candidates.append((size_base.get(key), None))  # W&B base exports record no settings, nor do their runs
    for metrics, settings in candidates:
        if metrics and metrics.get("accuracy") is not None and settings == want:
            return metrics["accuracy"]
    return None


def _within_ci(chosen: Run, cands: list[Run], key: str, metric: str, info: dict[str, dict]) -> list[dict] | None:
    """The other candidates whose validation score lies inside the chosen run's 95% CI (best first): the selection
    cannot tell them from it. None when the chosen run's summary carries no CI."""
    low = chosen.evals.get(key, {}).get(f"{metric}_ci95_low")
    if low is None:
        return None
    return [{"run": r.name, "method": r.method, "rank": r.rank, "lr": r.lr,
             "task_metric_validation": info[r.name]["task_metric_validation"]}
            for r in sorted(cands, key=lambda r: (-info[r.name]["task_metric_validation"], r.name))
            if r is not chosen and info[r.name]["task_metric_validation"] >= low]


def recommend(runs: list[Run], ok: list[Run], final: dict[str, float], size_base: dict, max_drop: float,
              describe: str, collapse_share: float = 0.9) -> tuple[dict, dict, dict[str, dict]]:
    mode = next((m for m in MODES if _sjp_key(runs, "validation", m) or _sjp_key(runs, "test", m)), None)
    sel_key = _sjp_key(runs, "validation", mode) if mode else None
    test_key = _sjp_key(runs, "test", mode) if mode else None
    metric = _metric(runs, sel_key or test_key)
    lexam_key = next((k for k in LEXAM_KEYS if any("accuracy" in r.evals.get(k, {}) for r in runs)), None)
    info: dict[str, dict] = {}
    bases = []
    for r in runs:
        d: dict[str, Any] = {}
        for key, name in ((sel_key, "task_metric_validation"), (test_key, "task_metric_test")):
            if key and metric in r.evals.get(key, {}):
                d[name] = r.evals[key][metric]
        if lexam_key and "accuracy" in r.evals.get(lexam_key, {}):
            d["lexam_accuracy"] = r.evals[lexam_key]["accuracy"]
            share = r.evals[lexam_key].get("top_answer_share")
            if share is not None:
                d["lexam_top_answer_share"] = share
                d["lexam_collapsed"] = share >= collapse_share
            base = base_lexam(r, lexam_key, runs, size_base)
            if base is not None:
                d["lexam_base_accuracy"] = base
                d["lexam_drop_points"] = 100 * (base - d["lexam_accuracy"])
                bases.append(base)
        info[r.name] = d
    retention = {"selection_key": sel_key, "selection_split": "validation" if sel_key else None,
                 "report_key": test_key, "report_split": "test" if test_key else None, "task_metric": metric,
                 "lexam_key": lexam_key, "lexam_split": "test" if lexam_key else None,
                 "lexam_base_accuracy": bases[0] if bases and len(set(bases)) == 1 else None,
                 "max_drop_points": max_drop, "collapse_share": collapse_share,
                 "collapsed": sorted(n for n, d in info.items() if d.get("lexam_collapsed"))}

    def rec(r: Run | None, why: str, criterion: str, split: str | None) -> dict:
        if r is None:
            return {"run": None, "why": why, "criterion": criterion, "selection_split": split}
        return {"run": r.name, "why": why, "criterion": criterion, "selection_split": split, "method": r.method,
                "rank": r.rank, "lr": r.lr, "final_loss": final[r.name], **info[r.name]}

    def within(cands: list[Run]) -> tuple[list[Run], str]:
        """Runs whose LEXam drop is allowed; the words that say how retention was checked."""
        with_drop = [r for r in cands if "lexam_drop_points" in info[r.name]]
        if not with_drop:
            what = "no LEXam evaluation" if lexam_key is None else "no LEXam score with a matching base-model score"
            return cands, f"; {what}, so retention was not checked"
        # a collapsed run (one answer letter for nearly every question) lost the task, whatever its accuracy
        collapsed = [r for r in with_drop if info[r.name].get("lexam_collapsed")]
        alive = [r for r in with_drop if not info[r.name].get("lexam_collapsed")]
        note = (f" and that do not give one answer to {collapse_share:.0%} or more of the questions "
                f"({len(collapsed)} collapsed runs left out)" if collapsed else "")
        kept = [r for r in alive if info[r.name]["lexam_drop_points"] <= max_drop + 1e-9]
        if kept:
            return kept, (f" among {len(kept)} runs whose LEXam accuracy ({lexam_key}) is at most {max_drop:g} points "
                          f"below the base model's on the same questions{note}")
        pool = alive or with_drop
        least = min(info[r.name]["lexam_drop_points"] for r in pool)
        return ([r for r in pool if info[r.name]["lexam_drop_points"] <= least + 1e-9],
                f"; no {'non-collapsed ' if collapsed and alive else ''}run kept LEXam ({lexam_key}) within "
                f"{max_drop:g} points: runs with the smallest drop ({least:.1f} points)"
                + ("; every run with a LEXam score collapsed to one answer" if not alive else ""))

    def best(cands: list[Run], name: str) -> Run:
        return min(cands, key=lambda r: (-info[r.name][name], final[r.name], r.name))

    extra: dict[str, Any] = {}
    if not ok:
        return rec(None, "every run diverged or none completed", "none", None), retention, info
    selectable = [r for r in ok if "task_metric_validation" in info[r.name]]
    if selectable:
        cands, how = within(selectable)
        r = best(cands, "task_metric_validation")
        test = info[r.name].get("task_metric_test")
        why = (f"highest validation SJP {metric} ({sel_key}) = {info[r.name]['task_metric_validation']:.4f}{how}; "
               + (f"its test SJP {metric} ({test_key}), reported once: {test:.4f}" if test is not None
                  else "no test-split evaluation of it"))
        out = rec(r, why, "validation_task_metric", "validation")
        trivial = majority_level(r.evals.get(sel_key, {}), metric)
        if trivial is not None:
            low = r.evals[sel_key].get(f"{metric}_ci95_low")
            out["majority_class_level"] = trivial
            out["above_majority_class"] = None if low is None else low > trivial
            if low is not None and low <= trivial:
                out["why"] += (f"; its 95% CI (low {low:.4f}) includes the {metric} of always answering the majority "
                               f"class ({trivial:.4f}): on validation it is not distinguishable from that")
        out["within_ci"] = _within_ci(r, cands, sel_key, metric, info)
        if out["within_ci"]:
            shown = ", ".join(f"{x['run']} ({x['task_metric_validation']:.4f})" for x in out["within_ci"][:5])
            more = len(out["within_ci"]) - 5
            out["why"] += (f"; {len(out['within_ci'])} other candidate(s) score inside its 95% CI, so the choice "
                           f"among them is not resolved: {shown}" + (f" and {more} more" if more > 0 else ""))
        return out, retention, info
    tested = [r for r in ok if "task_metric_test" in info[r.name]]
    if tested:
        cands, how = within(tested)
        r = best(cands, "task_metric_test")
        extra = {"run": r.name, "split": "test", "task_metric_test": info[r.name]["task_metric_test"],
                 "note": "highest test score" + how + "; not a selection (chosen on test, so optimistic)"}
        out = rec(None, f"no SJP evaluation on the validation years (eval: [sjp@validation, sjp@test]): no run is "
                  f"selected; choosing on the test score ({test_key}) would report it optimistically. Highest test "
                  f"score: {r.name}", "no_validation_split", None)
        out["best_on_test"] = extra
        return out, retention, info
    r = min(ok, key=lambda r: (final[r.name], r.name))
    return rec(r, f"no SJP evaluations: lowest final training loss ({describe}) = {final[r.name]:.4f}",
               "lowest_loss", "train"), retention, info
