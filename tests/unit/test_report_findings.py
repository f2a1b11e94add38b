"""Findings on synthetic run sets whose answers are known by construction."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from lexfine.report.collect import collect
from lexfine.report.findings import Settings, compute, to_json
from lexfine.report.synthetic import loss_curve, write_run


def _grid(root, lora: dict, full: dict, **kw):
    """lora: {rank: {lr: final}}, full: {lr: final}."""
    for rank, by_lr in lora.items():
        for lr, final in by_lr.items():
            write_run(root, name=f"r{rank}-lr{lr:g}", rank=rank, lr=lr, losses=loss_curve(final), **kw)
    for lr, final in full.items():
        write_run(root, name=f"full-lr{lr:g}", method="full", lr=lr, losses=loss_curve(final), **kw)


def _findings(root, **settings):
    groups = compute(collect([root]), Settings(**settings))["groups"]
    assert len(groups) == 1, list(groups)
    return next(iter(groups.values()))


def test_optimum_inside_the_grid(tmp_path):
    _grid(tmp_path, {8: {1e-4: 0.9, 3e-4: 0.7, 1e-3: 0.8}, 64: {1e-4: 0.85, 3e-4: 0.69, 1e-3: 0.75}},
          {1e-5: 0.8, 3e-5: 0.6, 1e-4: 0.65})
    f = _findings(tmp_path)
    assert f["best_lr"] == {"full": 3e-5, "lora": {"8": 3e-4, "64": 3e-4}}
    assert f["best_lr_at_grid_edge"] == {"full": None, "lora": {"8": None, "64": None}}
    assert f["lr_ratio_lora_over_full"] == pytest.approx(10)
    assert f["lr_ratio_per_rank"] == {"8": pytest.approx(10), "64": pytest.approx(10)}
    assert f["rank_independent"] is True
    # full 0.6 vs best LoRA 0.69 (r64): relative gap, negative because full FT is lower
    assert f["loss_gap_full_vs_best_lora"] == pytest.approx((0.6 - 0.69) / 0.69)
    assert f["final_loss"]["lora_best_rank"] == 64
    assert f["diverged"] == []


def test_optimum_at_the_grid_edges_and_rank_dependence(tmp_path):
    _grid(tmp_path, {4: {1e-4: 0.9, 1e-3: 0.8}, 16: {1e-4: 0.7, 1e-3: 0.75}}, {1e-5: 0.8, 1e-4: 0.7})
    f = _findings(tmp_path, min_lrs_for_rank_claims=2)
    assert f["best_lr"]["lora"] == {"4": 1e-3, "16": 1e-4}
    assert f["best_lr_at_grid_edge"]["lora"] == {"4": "high", "16": "low"}
    assert f["best_lr_at_grid_edge"]["full"] == "high"
    assert f["rank_independent"] is False
    assert f["best_lr_spread"]["max_over_min"] == pytest.approx(10)
    # ratio from the best LoRA configuration (r16 at 1e-4) over full's 1e-4; the log-median of 1e-3, 1e-4 is ~3.16e-4
    assert f["lr_ratio_lora_over_full"] == pytest.approx(1)
    assert f["lr_ratio_median_over_ranks"] == pytest.approx(math.sqrt(10))
    assert f["lr_ratio_per_rank"] == {"4": pytest.approx(10), "16": pytest.approx(1)}


def test_ties_go_to_the_smaller_lr(tmp_path):
    _grid(tmp_path, {8: {1e-4: 0.7, 1e-3: 0.7, 1e-5: 0.9}}, {})
    f = _findings(tmp_path)
    assert f["best_lr"] == {"full": None, "lora": {"8": 1e-4}}
    assert f["best_lr_ties"] == {"lora_r8": [1e-4, 1e-3]}
    assert f["lr_ratio_lora_over_full"] is None and f["loss_gap_full_vs_best_lora"] is None


def test_diverged_runs_are_listed_and_never_best(tmp_path):
    _grid(tmp_path, {8: {1e-4: 0.8, 3e-4: 0.75}}, {})
    # NaN in the middle of the curve: diverged even though its tail is low
    nan_curve = loss_curve(0.5)
    nan_curve[10] = float("nan")
    write_run(tmp_path, name="nan", rank=8, lr=1e-3, losses=nan_curve)
    # a loss that ends above where it started: finite, but diverged (and the lowest final loss of all)
    write_run(tmp_path, name="rising", rank=8, lr=3e-3, losses=[0.3 + 0.01 * i for i in range(60)])
    f = _findings(tmp_path)
    assert [n.split("-")[0] for n in f["diverged"]] == ["nan", "rising"]
    assert f["best_lr"]["lora"] == {"8": 3e-4}
    assert f["lrs_tried"]["lora_r8"] == [1e-4, 3e-4, 1e-3, 3e-3]
    assert f["recommended"]["run"].startswith("r8-lr0.0003")
    nan_run = next(v for k, v in f["runs"].items() if k.startswith("nan"))
    assert nan_run["diverged"] and nan_run["final_loss"] == pytest.approx(0.5)  # its tail is finite


def test_all_runs_diverged(tmp_path):
    write_run(tmp_path, name="bad", rank=8, lr=1e-2, losses=[1.0, 2.0, float("inf")])
    f = _findings(tmp_path)
    assert f["recommended"]["run"] is None and f["best_lr"]["lora"] == {"8": None}
    assert math.isnan(f["runs"][f["diverged"][0]]["final_loss"])
    text = to_json({"8B": f})  # JSON has no NaN/Infinity: a non-finite loss is written as null
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["8B"]["runs"][f["diverged"][0]]["final_loss"] is None


def test_rank_saturation_and_replicates(tmp_path):
    _grid(tmp_path, {4: {1e-3: 0.80}, 8: {1e-3: 0.76}, 16: {1e-3: 0.752}, 32: {1e-3: 0.75}}, {})
    # a replicate of r32 (other seed) with 0.754: the configuration's loss is the mean, 0.752
    write_run(tmp_path, name="r32-lr0.001", rank=32, lr=1e-3, losses=loss_curve(0.754), seed=7)
    f = _findings(tmp_path)
    sat = f["rank_saturation"]
    assert f["final_loss"]["lora_best_per_rank"]["32"] == pytest.approx(0.752)
    # best: r16 and r32 tie at 0.752 -> the smaller rank is reported; 0.5% of 0.752: r8 (0.76) is outside
    assert f["final_loss"]["lora_best_rank"] == 16
    assert sat["rank"] == 16 and sat["ranks_within_tolerance"] == [16, 32]
    assert sat["all_at_or_above_within_tolerance"] is True
    assert _findings(tmp_path, rank_tolerance=0.02)["rank_saturation"]["rank"] == 8


def test_smoothing_window_is_configurable(tmp_path):
    losses = [2.0] * 10 + [1.0] * 10 + [0.5] * 5
    write_run(tmp_path, name="a", rank=8, lr=1e-4, losses=losses)
    assert _findings(tmp_path, smooth_last=5)["runs"][next(iter(_findings(tmp_path)["runs"]))]["final_loss"] == 0.5
    f = _findings(tmp_path, smooth_last=20)
    assert next(iter(f["runs"].values()))["final_loss"] == pytest.approx((10 * 1.0 + 5 * 0.5 + 5 * 2.0) / 20)
    assert f["smoothing"] == "mean of the last 20 logged training-loss values of each run"


def _eval(f1, acc, lexam, test_f1=None):
    return {"sjp-validation-loglik": {"accuracy": acc, "macro_f1": f1},
            "sjp-test-loglik": {"accuracy": acc, "macro_f1": f1 if test_f1 is None else test_f1},
            "lexam_mcq4-loglik": {"accuracy": lexam}}


def test_recommendation_respects_the_lexam_drop(tmp_path):
    base = {"lexam_mcq4-loglik": {"accuracy": 0.40}, "sjp-loglik": {"accuracy": 0.6, "macro_f1": 0.4}}
    # best F1 but forgets 8 points; second best forgets 3; third keeps everything
    write_run(tmp_path, name="greedy", rank=8, lr=1e-3, losses=loss_curve(0.6), evals=_eval(0.80, 0.85, 0.32),
              base_evals=base)
    write_run(tmp_path, name="balanced", rank=8, lr=1e-4, losses=loss_curve(0.7), evals=_eval(0.75, 0.80, 0.37),
              base_evals=base)
    write_run(tmp_path, name="timid", rank=8, lr=1e-5, losses=loss_curve(0.9), evals=_eval(0.60, 0.70, 0.40),
              base_evals=base)
    f = _findings(tmp_path)
    rec = f["recommended"]
    assert rec["run"].startswith("balanced") and rec["criterion"] == "validation_task_metric"
    assert rec["lexam_drop_points"] == pytest.approx(3.0)
    assert f["retention"]["task_metric"] == "macro_f1" and f["retention"]["lexam_key"] == "lexam_mcq4-loglik"
    assert "macro_f1" in rec["why"] and "5 points" in rec["why"]
    assert _findings(tmp_path, max_lexam_drop=10)["recommended"]["run"].startswith("greedy")
    strict = _findings(tmp_path, max_lexam_drop=0)["recommended"]
    assert strict["run"].startswith("timid")
    none_ok = _findings(tmp_path, max_lexam_drop=0)
    assert none_ok["recommended"]["criterion"] == "validation_task_metric"


def test_a_base_model_scoring_zero_still_counts_as_a_base_score(tmp_path):
    """A tiny base model can score 0.0 on LEXam: that is a measurement, not a missing value."""
    base = {"lexam_mcq4-loglik": {"accuracy": 0.0}}
    write_run(tmp_path, name="up", rank=8, lr=1e-3, losses=loss_curve(0.6), evals=_eval(0.8, 0.85, 0.25),
              base_evals=base)
    f = _findings(tmp_path)
    assert f["retention"]["lexam_key"] == "lexam_mcq4-loglik" and f["retention"]["lexam_base_accuracy"] == 0.0
    assert f["recommended"]["criterion"] == "validation_task_metric"
    assert f["recommended"]["lexam_drop_points"] == pytest.approx(-25.0)


def test_recommendation_without_evals_is_lowest_loss(tmp_path):
    _grid(tmp_path, {8: {1e-4: 0.8, 1e-3: 0.7}}, {1e-5: 0.65})
    rec = _findings(tmp_path)["recommended"]
    assert rec["run"].startswith("full-lr1e-05") and rec["criterion"] == "lowest_loss"
    assert "mean of the last 20" in rec["why"]


def test_recommendation_with_task_but_no_lexam(tmp_path):
    write_run(tmp_path, name="a", rank=8, lr=1e-4, losses=loss_curve(0.8),
              evals={"sjp-validation-loglik": {"accuracy": 0.7, "macro_f1": 0.5}})
    write_run(tmp_path, name="b", rank=8, lr=1e-3, losses=loss_curve(0.7),
              evals={"sjp-validation-loglik": {"accuracy": 0.7, "macro_f1": 0.6}})
    write_run(tmp_path, name="c", rank=8, lr=1e-5, losses=loss_curve(0.9))  # missing evals: not a candidate
    rec = _findings(tmp_path)["recommended"]
    assert rec["run"].startswith("b") and rec["criterion"] == "validation_task_metric"
    assert "retention was not checked" in rec["why"] and "no test-split evaluation" in rec["why"]


def test_findings_json_is_deterministic_with_string_rank_keys(tmp_path):
    _grid(tmp_path, {1: {1e-4: 0.81234567891, 1e-3: 0.7}, 512: {1e-3: 0.69}}, {1e-4: 0.6})
    a = to_json(compute(collect([tmp_path])))
    b = to_json(compute(collect([tmp_path])))
    assert a == b
    data = json.loads(a)["groups"]
    assert list(data) == ["8B-random"]  # random weights: never grouped with a trained 8B
    assert set(data["8B-random"]["best_lr"]["lora"]) == {"1", "512"}
    assert data["8B-random"]["runs"][next(k for k in data["8B-random"]["runs"] if k.startswith("r1-lr0.0001"))][
        "final_loss"] == 0.812346  # rounded to 6 significant digits
    for key in ("best_lr", "lr_ratio_lora_over_full", "loss_gap_full_vs_best_lora", "diverged", "recommended"):
        assert key in data["8B-random"]


def test_ranks_with_too_few_lrs_make_no_rank_claims(tmp_path):
    """A rank tried at one LR has no located optimum: it neither breaks rank independence nor sets saturation."""
    _grid(tmp_path, {4: {1e-4: 0.9, 3e-4: 0.7, 1e-3: 0.8}, 16: {1e-4: 0.85, 3e-4: 0.69, 1e-3: 0.75},
                     64: {1e-5: 0.5}}, {1e-5: 0.8, 3e-5: 0.6, 1e-4: 0.65})
    f = _findings(tmp_path)
    assert f["best_lr"]["lora"]["64"] == 1e-5  # still reported per rank, at a "single" grid point
    assert f["best_lr_at_grid_edge"]["lora"]["64"] == "single"
    assert f["rank_independent"] is True and f["rank_independence_ranks"] == [4, 16]
    assert "64" in f["rank_independence_excluded"]
    assert f["best_lr_spread"]["max_over_min"] == pytest.approx(1)
    # r64 has the lowest loss, but at an LR the other ranks were not tried at: saturation is r64 alone
    assert f["rank_saturation"]["ranks"] == [64] and f["rank_saturation"]["ranks_left_out"] == [4, 16]
    f = _findings(tmp_path, min_lrs_for_rank_claims=1)
    assert f["rank_independent"] is False


def test_a_run_that_answers_one_letter_never_passes_retention(tmp_path):
    """LEXam accuracy 0.232 within 4 points of a base of 0.27 is no retention when every answer is 'D'."""
    base = {"lexam_mcq4-loglik": {"accuracy": 0.27, "n": 100}}
    names = {}
    for name, lr, f1, counts in (("collapsed", 1e-3, 0.58, {"A": 0, "B": 1, "C": 0, "D": 99}),
                                 ("healthy", 1e-4, 0.50, {"A": 30, "B": 25, "C": 25, "D": 20})):
        d = write_run(tmp_path, name=name, rank=8, lr=lr, losses=loss_curve(0.7),
                      evals={"sjp-validation-loglik": {"macro_f1": f1, "accuracy": 0.7},
                             "lexam_mcq4-loglik": {"accuracy": 0.25 if name == "healthy" else 0.232}},
                      base_evals=base)
        names[name] = d.name
        summary = d / "eval" / "lexam_mcq4-loglik" / "summary.json"
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps({"accuracy": 0.25 if name == "healthy" else 0.232, "n": 100,
                                       "prediction_counts": counts}))
    f = _findings(tmp_path)
    collapsed, healthy = f["runs"][names["collapsed"]], f["runs"][names["healthy"]]
    assert collapsed["lexam_collapsed"] is True and collapsed["lexam_drop_points"] == pytest.approx(3.8)
    assert collapsed["lexam_top_answer_share"] == pytest.approx(0.99)
    assert healthy["lexam_collapsed"] is False
    assert f["retention"]["collapsed"] == [names["collapsed"]]
    assert f["recommended"]["run"] == names["healthy"]  # lower validation macro-F1, but it still answers
    assert "collapsed" in f["recommended"]["why"]


def test_best_lr_resolution_pairs_runs_on_the_same_batches(tmp_path):
    """Same seed, same data: per-step noise is shared, so a small but consistent gap is resolved when paired;
    a different seed is compared unpaired, with each run's own standard error."""
    import random
    rng = random.Random(0)
    noise = [rng.gauss(0, 0.05) for _ in range(40)]  # batch difficulty, shared by every run on the same batches
    write_run(tmp_path, name="a", rank=8, lr=1e-4, losses=[0.5 + e for e in noise])
    write_run(tmp_path, name="b", rank=8, lr=1e-3, losses=[0.51 + e + rng.gauss(0, 0.002) for e in noise])
    f = _findings(tmp_path)
    res = f["best_lr_resolution"]["lora"]["8"]
    assert f["best_lr"]["lora"]["8"] == 1e-4 and res["runner_up_lr"] == 1e-3
    assert res["basis"] == "paired" and res["resolved"] is True and res["z"] > 10
    # the same gap between runs on different batches (another seed) is buried in the noise
    for d in tmp_path.iterdir():
        shutil.rmtree(d)
    write_run(tmp_path, name="a", rank=8, lr=1e-4, losses=[0.5 + e for e in noise])
    write_run(tmp_path, name="b", rank=8, lr=1e-3, losses=[0.51 + rng.gauss(0, 0.05) for _ in noise], seed=7)
    res = _findings(tmp_path)["best_lr_resolution"]["lora"]["8"]
    assert res["basis"] == "unpaired" and res["resolved"] is False and res["z"] < 2


def _sjp_validation_run(root, name: str, lr: float, f1: float, ci: list[float], accuracy: float) -> None:
    """A LoRA r8 run with an SJP validation summary (575 cases, 78.6% dismissals) carrying macro-F1 and its CI."""
    d = write_run(root, name=name, rank=8, lr=lr, losses=loss_curve(0.7))
    summary = d / "eval" / "sjp-validation-loglik" / "summary.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps({"accuracy": accuracy, "macro_f1": f1, "macro_f1_ci95": ci, "n": 575,
                                   "majority_baseline": 0.786}))


def test_a_recommendation_no_better_than_the_majority_class_says_so(tmp_path):
    """SJP is ~79% dismissals: always answering 'dismissal' has macro-F1 0.786/1.786 = 0.440."""
    for name, lr, f1, ci in (("a", 1e-4, 0.449, [0.431, 0.469]), ("b", 1e-3, 0.44, [0.428, 0.449])):
        _sjp_validation_run(tmp_path, name, lr, f1, ci, accuracy=0.786)
    rec = _findings(tmp_path)["recommended"]
    assert rec["task_metric_validation"] == pytest.approx(0.449)
    assert rec["majority_class_level"] == pytest.approx(0.786 / 1.786)
    assert rec["above_majority_class"] is False
    assert "not distinguishable" in rec["why"]


def test_the_recommendation_lists_the_candidates_inside_its_ci(tmp_path):
    """Selection picks the highest validation score, but runs scoring inside its 95% CI are not worse on this
    evidence: the recommendation names them (best first) and says the choice among them is not resolved."""
    for name, lr, f1, ci in (("best", 3e-4, 0.572, [0.526, 0.618]), ("near", 1e-4, 0.555, [0.51, 0.60]),
                             ("tie-low", 1e-5, 0.526, [0.48, 0.57]), ("far", 1e-3, 0.50, [0.46, 0.54])):
        _sjp_validation_run(tmp_path, name, lr, f1, ci, accuracy=0.8)
    rec = _findings(tmp_path)["recommended"]
    assert rec["run"].startswith("best")
    assert [x["run"].split("-")[0] for x in rec["within_ci"]] == ["near", "tie"]
    assert rec["within_ci"][0]["task_metric_validation"] == pytest.approx(0.555)
    assert "2 other candidate(s) score inside its 95% CI" in rec["why"]
