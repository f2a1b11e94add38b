"""Seed noise (report/seeds.py) on synthetic runs: its pooled SD, and resolution claims that must clear it."""

from __future__ import annotations

import math
import random

import pytest

from lexfine.report.collect import collect
from lexfine.report.findings import Settings, compute
from lexfine.report.synthetic import loss_curve, write_run


def _findings(root):
    groups = compute(collect([root]), Settings())["groups"]
    assert len(groups) == 1, list(groups)
    return next(iter(groups.values()))


def _evals(f1: float, lexam: float) -> dict:
    return {"sjp-validation-loglik": {"accuracy": 0.8, "macro_f1": f1}, "lexam_mcq4-loglik": {"accuracy": lexam}}


def test_pooled_sd_over_the_replicated_configurations(tmp_path):
    # LoRA r8 at 1e-4 with three seeds (sd 0.02), full FT at 1e-5 with two (sd 0.03 / sqrt 2), r8 at 1e-3 with one
    for seed, final, f1 in ((42, 0.70, 0.60), (7, 0.72, 0.65), (3, 0.74, 0.55)):
        write_run(tmp_path, name=f"r8-1e-4-s{seed}", rank=8, lr=1e-4, seed=seed, losses=loss_curve(final),
                  evals=_evals(f1, 0.30))
    for seed, final in ((42, 0.60), (7, 0.63)):
        write_run(tmp_path, name=f"full-1e-5-s{seed}", method="full", lr=1e-5, seed=seed, losses=loss_curve(final))
    write_run(tmp_path, name="r8-1e-3", rank=8, lr=1e-3, losses=loss_curve(0.8))
    # a diverged fourth seed of r8 at 1e-4 is no replicate: it must not widen the SD
    write_run(tmp_path, name="r8-1e-4-s9", rank=8, lr=1e-4, seed=9, losses=loss_curve(0.7)[:-1] + [math.nan])
    f = _findings(tmp_path)
    noise = f["seed_noise"]
    configs = {(c["method"], c["rank"], c["lr"]): c for c in noise["configurations"]}
    assert set(configs) == {("lora", 8, 1e-4), ("full", None, 1e-5)}
    lora, full = configs[("lora", 8, 1e-4)], configs[("full", None, 1e-5)]
    assert lora["n_seeds"] == 3 and sorted(lora["seeds"]) == [3, 7, 42]
    assert lora["sd"] == pytest.approx(0.02) and full["sd"] == pytest.approx(0.03 / math.sqrt(2))
    # sqrt((2 * 0.02^2 + 1 * 0.03^2 / 2) / 3)
    assert noise["pooled_sd"] == pytest.approx(math.sqrt((2 * 0.0004 + 0.00045) / 3))
    assert noise["df"] == 3
    # per seed, aligned with the seeds: the losses and the recommendation's metric; none where a run has none
    by_seed = dict(zip(lora["seeds"], zip(lora["final_losses"], lora["task_metric_validation"])))
    assert by_seed == {42: pytest.approx((0.70, 0.60)), 7: pytest.approx((0.72, 0.65)), 3: pytest.approx((0.74, 0.55))}
    assert lora["lexam_accuracy"] == pytest.approx([0.30] * 3)
    assert full["task_metric_validation"] is None and full["lexam_accuracy"] is None
    assert noise["task_metric"] == "macro_f1" and "pooled_sd" in noise["rule"]


def test_a_best_lr_gap_inside_the_seed_noise_is_not_resolved(tmp_path):
    """Two LRs on the same batches: the paired z sees a consistent gap of 0.01 (z > 10), but another seed moves a
    configuration's loss by 0.04 (full FT below), so the gap is 0.25 seed standard errors: not resolved."""
    rng = random.Random(0)
    noise = [rng.gauss(0, 0.05) for _ in range(40)]
    write_run(tmp_path, name="a", rank=8, lr=1e-4, losses=[0.5 + e for e in noise])
    write_run(tmp_path, name="b", rank=8, lr=1e-3, losses=[0.51 + e + rng.gauss(0, 0.002) for e in noise])
    write_run(tmp_path, name="full-s42", method="full", lr=1e-5, losses=loss_curve(0.60, steps=40))
    write_run(tmp_path, name="full-s7", method="full", lr=1e-5, seed=7, losses=loss_curve(0.64, steps=40))
    f = _findings(tmp_path)
    pooled = f["seed_noise"]["pooled_sd"]
    assert pooled == pytest.approx(0.04 / math.sqrt(2))
    res = f["best_lr_resolution"]["lora"]["8"]
    assert res["basis"] == "paired" and res["z"] > 10  # the within-trajectory z alone would call it resolved
    assert res["seed_z"] == pytest.approx(res["difference"] / (pooled * math.sqrt(2)))
    assert res["seed_z"] < 2 and res["resolved"] is False
    assert "seed_z >= 2" in f["best_lr_resolution"]["rule"]
    # the full-vs-LoRA gap (0.62 - ~0.5) is far outside the seed noise; n = 2 seeds for full FT, 1 for LoRA
    gap = f["loss_gap_resolution"]
    assert gap["z"] == f["loss_gap_z"]
    assert gap["seed_z"] == pytest.approx(gap["difference"] / (pooled * math.sqrt(1 / 2 + 1)))
    assert gap["seed_z"] > 2 and gap["resolved"] is True


def test_a_best_lr_gap_beyond_the_seed_noise_stays_resolved(tmp_path):
    write_run(tmp_path, name="a", rank=8, lr=1e-4, losses=loss_curve(0.50))
    write_run(tmp_path, name="a7", rank=8, lr=1e-4, seed=7, losses=loss_curve(0.52))
    rng = random.Random(1)
    write_run(tmp_path, name="b", rank=8, lr=1e-3, losses=[v + rng.gauss(0, 0.01) for v in loss_curve(0.60)])
    f = _findings(tmp_path)
    res = f["best_lr_resolution"]["lora"]["8"]
    # 0.09 over 0.02/sqrt(2) x sqrt(1/2 + 1/1)
    assert res["seed_z"] == pytest.approx(res["difference"] / (0.02 / math.sqrt(2) * math.sqrt(1.5)))
    assert res["seed_z"] > 2 and res["z"] > 2 and res["resolved"] is True


def test_without_replicates_seed_noise_is_null_and_z_alone_decides(tmp_path):
    rng = random.Random(0)
    noise = [rng.gauss(0, 0.05) for _ in range(40)]
    write_run(tmp_path, name="a", rank=8, lr=1e-4, losses=[0.5 + e for e in noise])
    write_run(tmp_path, name="b", rank=8, lr=1e-3, losses=[0.51 + e + rng.gauss(0, 0.002) for e in noise])
    write_run(tmp_path, name="full", method="full", lr=1e-5, losses=[0.6 + e for e in noise])
    f = _findings(tmp_path)
    assert f["seed_noise"] is None
    res = f["best_lr_resolution"]["lora"]["8"]
    assert "seed_z" not in res and res["resolved"] is True and res["z"] > 10
    assert "seed noise was not measured" in f["best_lr_resolution"]["rule"]
    gap = f["loss_gap_resolution"]
    assert "seed_z" not in gap and gap["resolved"] == (abs(f["loss_gap_z"]) >= 2)
    assert "seed noise was not measured" in gap["rule"]


def test_runs_without_a_recorded_seed_are_no_seed_replicates(tmp_path):
    """W&B exports record no seed: two of them at one configuration may be the same seed on other node counts."""
    for name, final in (("x", 0.5), ("y", 0.6)):
        write_run(tmp_path, name=name, rank=8, lr=1e-4, losses=loss_curve(final))
    runset = collect([tmp_path])
    for r in runset.runs:
        r.seed = None
    f = compute(runset, Settings())["groups"]
    assert next(iter(f.values()))["seed_noise"] is None


def test_rank_saturation_lists_the_ranks_seed_noise_cannot_separate(tmp_path):
    """r4 is 0.2% above the best rank (inside the 0.5% tolerance), r16 3% above: outside the tolerance, but with a
    seed SD of 0.04 it is 0.4 seed SE away, so seed noise cannot tell it from the best. r64 is 40% above: apart."""
    for rank, final in ((4, 0.501), (8, 0.50), (16, 0.515), (64, 0.70)):
        for lr, bump in ((1e-4, 0.05), (1e-3, 0.0)):
            write_run(tmp_path, name=f"r{rank}-{lr:g}", rank=rank, lr=lr, losses=loss_curve(final + bump))
    write_run(tmp_path, name="r8-1e-4-s7", rank=8, lr=1e-4, seed=7, losses=loss_curve(0.55 + 0.04))  # the noise
    f = _findings(tmp_path)
    sat = f["rank_saturation"]
    assert sat["ranks_within_tolerance"] == [4, 8]
    assert sat["ranks_within_seed_noise"] == [4, 8, 16]


def test_rank_saturation_without_replicates_says_seed_noise_was_not_measured(tmp_path):
    for rank, final in ((4, 0.50), (16, 0.51)):
        write_run(tmp_path, name=f"r{rank}", rank=rank, lr=1e-3, losses=loss_curve(final))
    assert _findings(tmp_path)["rank_saturation"]["ranks_within_seed_noise"] is None
