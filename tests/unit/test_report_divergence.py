"""The divergence rule on real noisy curves: a healthy answer-only run is never flagged, a blow-up always is.

tests/data/noisy_answer_only_metrics.jsonl is the metrics.jsonl of a real CPU run (recorded 2026-11-28):
`lexfine train` of the embedded SmolLM2-135M, LoRA r8 alpha 16, lr 1e-4, batch 1, max_length 128,
data.loss_on=answer, bundled French SJP cases; 65 logged steps. Its loss is ~0.005 on cases the model gets right
and 1-1.8 on the others: the noise that tripped the old rule (last-20 mean above the first logged loss).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lexfine.report.divergence import DivergenceRule, divergence

DATA = Path(__file__).resolve().parents[1] / "data" / "noisy_answer_only_metrics.jsonl"
RULE = DivergenceRule()


@pytest.fixture(scope="module")
def noisy() -> list[float]:
    return [json.loads(line)["loss"] for line in DATA.read_text().splitlines()]


def _old_rule(losses: list[float]) -> bool:
    return sum(losses[-20:]) / len(losses[-20:]) > losses[0]


def test_a_healthy_noisy_run_is_not_diverged_wherever_its_log_starts(noisy):
    # the run's log from any of its first 33 steps on (a resumed job logs such a tail): the old rule flags most
    starts = range(33)
    assert sum(_old_rule(noisy[k:]) for k in starts) >= 10
    assert [k for k in starts if divergence(noisy[k:], RULE)] == []


def test_blow_ups_are_caught(noisy):
    assert divergence(noisy + [3.0 + 0.5 * (i % 3) for i in range(25)], RULE) == "rising"
    assert divergence(noisy[:40] + [4 * x + 2 for x in noisy[40:]], RULE) == "rising"
    # starts high (above where it ends), reaches a good stretch, then climbs: only the spike rule sees it
    high_start = [4 + x for x in noisy[:20]] + noisy[20:45] + [1.5 + x for x in noisy[45:]]
    assert divergence(high_start, RULE) == "spike" and not _old_rule(high_start)
    with_nan = noisy[:30] + [math.nan] + noisy[31:]
    assert divergence(with_nan, RULE) == "nonfinite"
    assert divergence(noisy, RULE, nonfinite_steps=1) == "nonfinite"
    assert divergence(noisy, RULE, status="diverged") == "nonfinite"


def test_short_and_flat_curves(noisy):
    assert divergence([], RULE) is None and divergence([0.5], RULE) is None
    assert divergence([0.0] * 30, RULE) is None  # a zero loss is not a division by zero
    assert divergence([1.0, 1.0, 1.0, 1.0], RULE) is None


def test_no_exported_study_history_is_flagged(shared_data):
    from lexfine.report.collect import collect

    seed = shared_data / "seed_runs"
    if not (seed / "history").is_dir():
        pytest.skip("../shared/data/seed_runs/history is not present")
    runs = collect([seed]).runs
    assert len(runs) == 40
    flagged = {r.name: divergence(r.curve["loss"].tolist(), RULE, nonfinite_steps=r.nonfinite_steps)
               for r in runs}
    assert {n: why for n, why in flagged.items() if why} == {}
