"""How sure a difference of smoothed final losses is: in standard errors of the runs' own last K losses (paired
step by step when two runs saw the same batches) and, where a group measured it, in seed-to-seed standard errors
(report/seeds.py). docs/report.md defines `best_lr_resolution` and `loss_gap_resolution`.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from lexfine.report.runs import Run
from lexfine.report.seeds import rule_note, seed_z


def smoothed_final_loss_se(run: Run, k: int) -> float:
    """Standard error of the smoothed final loss: sd of the last K logged losses / sqrt(K). Consecutive logged
    steps see different batches, so their losses are close to independent draws around the run's level; a small
    batch (or an answer-only loss over a few label tokens a step) makes this large, and a difference between two
    runs smaller than ~2 combined standard errors is not a difference the data resolve."""
    losses = run.curve["loss"].tolist()
    tail = losses[-k:] if k > 0 else losses
    if len(tail) < 2 or any(not math.isfinite(x) for x in tail):
        return math.nan
    return statistics.stdev(tail) / math.sqrt(len(tail))


def paired_z(a: Run, b: Run, k: int) -> float | None:
    """z of loss(b) - loss(a) over the last K steps both logged, paired step by step: valid when both runs saw the
    same batches in the same order (same comparison group and seed), which removes the batch-to-batch noise that
    both share. None when they are not paired or the steps do not line up."""
    if a.seed is None or a.seed != b.seed or a.group[:2] != b.group[:2]:  # [2]: LoRA keys, not the data order
        return None
    la = dict(zip(a.curve["step"], a.curve["loss"]))
    lb = dict(zip(b.curve["step"], b.curve["loss"]))
    steps = sorted(set(la) & set(lb))
    steps = steps[-k:] if k > 0 else steps
    diffs = [lb[t] - la[t] for t in steps]
    if len(diffs) < 2 or any(not math.isfinite(d) for d in diffs):
        return None
    sd = statistics.stdev(diffs)
    return statistics.fmean(diffs) / (sd / math.sqrt(len(diffs))) if sd > 0 else None


def best_lr_resolution(loss: dict[float, float], se: dict[float, float], best: float | None,
                       members: dict[float, list[Run]], k: int, noise: dict | None) -> dict[str, Any] | None:
    """How far the runner-up LR's loss lies above the best's, in standard errors: paired step by step when both are
    single runs on the same batches (same seed), else from the two runs' own standard errors. Where seed noise was
    measured (report/seeds.py), also in seed-to-seed standard errors (seed_z); resolved: both >= 2."""
    others = {lr: v for lr, v in loss.items() if lr != best and math.isfinite(v)}
    if best is None or not others:
        return None
    runner = min(others, key=lambda lr: (others[lr], lr))
    z, basis = None, "unpaired"
    if len(members.get(best, [])) == 1 and len(members.get(runner, [])) == 1:
        z = paired_z(members[best][0], members[runner][0], k)
        basis = "paired" if z is not None else basis
    if z is None:
        err = math.hypot(se.get(best, math.nan), se.get(runner, math.nan))
        z = (others[runner] - loss[best]) / err if err > 0 else math.nan
    diff = others[runner] - loss[best]
    out = {"runner_up_lr": runner, "difference": diff, "z": z, "basis": basis,
           "resolved": bool(math.isfinite(z) and z >= 2)}
    sz = seed_z(diff, noise, members.get(best, []), members.get(runner, []))
    if sz is not None:
        out["seed_z"] = sz
        out["resolved"] = out["resolved"] and sz >= 2
    return out


def gap_z(full: list[Run], lora: list[Run], diff: float, se_full: float | None, se_lora: float | None,
          k: int) -> float | None:
    """z of the full-vs-LoRA loss gap (negative: full FT lower), paired when both are single same-seed runs."""
    if len(full) == 1 and len(lora) == 1:
        z = paired_z(lora[0], full[0], k)
        if z is not None:
            return z
    err = math.hypot(se_full if se_full is not None else math.nan, se_lora if se_lora is not None else math.nan)
    return diff / err if err > 0 else None


def gap_resolution(z: float | None, diff: float, noise: dict | None, full: list[Run],
                   lora: list[Run]) -> dict[str, Any] | None:
    """loss_gap_z with the seed check: resolved when |z| >= 2 and, where seed noise was measured, |seed_z| >= 2."""
    if z is None or not math.isfinite(z):
        return None
    out = {"difference": diff, "z": z, "resolved": abs(z) >= 2}
    sz = seed_z(diff, noise, full, lora)
    if sz is not None:
        out["seed_z"] = sz
        out["resolved"] = out["resolved"] and abs(sz) >= 2
    out["rule"] = ("full FT's best smoothed loss minus the best LoRA configuration's (negative: full FT lower), in "
                   "standard errors as for best_lr_resolution (z = loss_gap_z); "
                   + ("|z| >= 2 and |seed_z| >= 2: resolved" if noise else "|z| >= 2: resolved") + rule_note(noise))
    return out


def best_lr_rule(noise: dict | None) -> str:
    return ("runner-up LR's smoothed loss minus the best's in standard errors: paired step by step when both are "
            "single runs on the same batches (same group and seed), else over their combined standard errors (sd of "
            "the last K logged losses / sqrt(K)); " + ("z >= 2 and seed_z >= 2: resolved" if noise else "z >= 2: resolved")
            + ", else the grid cannot tell the two LRs apart" + rule_note(noise))
