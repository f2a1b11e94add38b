"""The published SmolLM2-135M study (docs/results/smollm2-sjp/runs): its two seed-replicated configurations give the
seed noise that every best-LR claim must clear. Findings only (no figures): about a second.

Skipped where the seed-7 replicates are not in this checkout's run folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lexfine.report.collect import collect
from lexfine.report.findings import Settings, compute

RUNS = Path(__file__).resolve().parents[2] / "docs" / "results" / "smollm2-sjp" / "runs"


@pytest.fixture(scope="module")
def answer_only():
    if not RUNS.is_dir() or not any("-seed7-" in p.name for p in RUNS.iterdir()):
        pytest.skip(f"{RUNS} holds no seed-7 replicate runs")
    groups = compute(collect([RUNS]), Settings())["groups"]
    replicated = {label: f for label, f in groups.items() if f["seed_noise"]}
    assert len(replicated) == 1, list(replicated)  # only the answer-only loss group has replicates
    return next(iter(replicated.values()))


def test_seed_noise_lists_the_two_replicated_configurations(answer_only):
    noise = answer_only["seed_noise"]
    configs = {(c["method"], c["rank"], c["lr"]): c for c in noise["configurations"]}
    assert set(configs) == {("full", None, 1e-4), ("lora", 16, 1e-3)}
    for key, losses in ((("full", None, 1e-4), (0.1175, 0.1231)), (("lora", 16, 1e-3), (0.1192, 0.1290))):
        c = configs[key]
        assert c["seeds"] == [42, 7] and len(c["runs"]) == 2
        assert c["final_losses"] == pytest.approx(losses, abs=1e-4)
        assert len(c["task_metric_validation"]) == 2 and len(c["lexam_accuracy"]) == 2
    sds = [c["sd"] for c in configs.values()]
    assert noise["df"] == 2
    assert noise["pooled_sd"] == pytest.approx(math.sqrt(sum(sd * sd for sd in sds) / 2))
    assert 0.005 < noise["pooled_sd"] < 0.007


def test_best_lr_differences_inside_the_seed_noise_are_not_resolved(answer_only):
    """r256 (0.0072 above, paired z 2.2) and r4 (0.0148, paired z 2.2) were 'resolved' on the within-run SE alone."""
    res = answer_only["best_lr_resolution"]
    for rank in ("4", "256"):
        r = res["lora"][rank]
        assert r["z"] >= 2 and r["seed_z"] < 2 and r["resolved"] is False
    assert all(r is None or not r["resolved"] for r in [res["full"], *res["lora"].values()])
    assert answer_only["loss_gap_resolution"]["resolved"] is False
