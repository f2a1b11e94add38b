"""Findings you can trust (issue 15): comparison groups, completed runs only, base scores matched on the same
questions, selection on validation and one test score, no division by a zero loss."""

from __future__ import annotations

import json

import pytest

from lexfine.report.collect import collect
from lexfine.report.findings import Settings, compute, to_json
from lexfine.report.synthetic import loss_curve, write_run


def _groups(root, **kw):
    return compute(collect([root]), Settings(**kw))


def _one(root, **kw):
    groups = _groups(root, **kw)["groups"]
    assert len(groups) == 1, list(groups)
    return next(iter(groups.values()))


def test_runs_differing_beyond_the_sweep_axes_are_never_averaged(tmp_path):
    # the reference grid: lr x rank x method, two seeds of one configuration (replicates, averaged)
    write_run(tmp_path, name="a", rank=8, lr=1e-4, losses=loss_curve(0.80))
    write_run(tmp_path, name="a", rank=8, lr=1e-4, losses=loss_curve(0.82), seed=7)
    write_run(tmp_path, name="b", rank=8, lr=1e-3, losses=loss_curve(0.70))
    write_run(tmp_path, name="f", method="full", lr=1e-5, losses=loss_curve(0.60))
    # same lr/rank, but another loss, alpha or global batch: each is its own group, never a replicate
    write_run(tmp_path, name="all", rank=8, lr=1e-4, losses=loss_curve(0.10), overrides={"data.loss_on": "all"})
    write_run(tmp_path, name="alpha", rank=8, lr=1e-4, losses=loss_curve(0.20), overrides={"lora.alpha": 64})
    write_run(tmp_path, name="gb", rank=8, lr=1e-4, losses=loss_curve(0.30), world_size=8)
    out = _groups(tmp_path)
    groups = out["groups"]
    assert len(groups) == 4 and "mixed" in out
    main = next(g for g in groups.values() if len(g["runs"]) == 4)
    assert main["final_loss"]["lora_best_per_rank"]["8"] == pytest.approx(0.70)
    assert main["best_lr"] == {"full": 1e-5, "lora": {"8": 1e-3}}
    labels = " ".join(groups)
    assert "data.loss_on=all" in labels and "lora.alpha=64" in labels and "train.global_batch=" in labels
    # the full fine-tune shares everything but the LoRA keys with both LoRA groups of its identity
    assert sum("f-" in " ".join(g["runs"]) for g in groups.values()) == 2


def test_model_size_comes_from_what_was_trained_not_the_name(tmp_path):
    write_run(tmp_path, name="real", rank=8, lr=1e-4, losses=loss_curve(0.8),
              model="swiss-ai/Apertus-8B-Instruct-2509", parameters_total=8_053_000_000)
    write_run(tmp_path, name="rnd", rank=8, lr=1e-3, losses=loss_curve(0.1))  # random:apertus-8b
    write_run(tmp_path, name="tiny", rank=8, lr=1e-3, losses=loss_curve(0.1), parameters_total=6_400_000,
              overrides={"model_args.arch_overrides": {"num_hidden_layers": 2}})
    groups = _groups(tmp_path)["groups"]
    assert sorted(groups) == ["6.4M-random", "8B", "8B-random"]
    assert groups["8B"]["best_lr"]["lora"] == {"8": 1e-4}


@pytest.mark.parametrize("status", ["failed", "interrupted", "running", "diverged"])
def test_only_completed_runs_enter_findings(tmp_path, status):
    write_run(tmp_path, name="ok", rank=8, lr=1e-4, losses=loss_curve(0.8),
              evals={"sjp-validation-loglik": {"accuracy": 0.6}})
    bad = write_run(tmp_path, name="bad", rank=8, lr=1e-3, losses=loss_curve(0.5), status="failed",
                    evals={"sjp-validation-loglik": {"accuracy": 0.9}})
    manifest = json.loads((bad / "manifest.json").read_text())  # `diverged` is a status newer than rundir here
    (bad / "manifest.json").write_text(json.dumps({**manifest, "status": status}))
    out = _groups(tmp_path)
    f = next(iter(out["groups"].values()))
    assert f["best_lr"]["lora"] == {"8": 1e-4} and bad.name not in f["runs"]
    assert f["recommended"]["run"] != bad.name
    # a `running` manifest without a live lock holder reads `dead` (runlock.effective_status)
    assert out["not_completed"] == {bad.name: "dead" if status == "running" else status}
    assert (bad.name in out["diverged"]) == (status == "diverged")


def test_a_nonfinite_flag_is_diverged_even_with_a_finite_loss(tmp_path):
    rows = [{}] * 30 + [{"nonfinite": ["grad_norm"]}] + [{}] * 29
    p = write_run(tmp_path, name="nf", rank=8, lr=1e-2, losses=loss_curve(0.1), metrics_rows=rows)
    write_run(tmp_path, name="ok", rank=8, lr=1e-4, losses=loss_curve(0.8))
    out = _groups(tmp_path)
    f = next(iter(out["groups"].values()))
    assert out["diverged"] == [p.name] and f["runs"][p.name]["divergence"] == "nonfinite"
    assert f["best_lr"]["lora"] == {"8": 1e-4}


def test_lexam_drop_only_against_a_base_scored_on_the_same_questions(tmp_path):
    settings = {"data": "LEXam-Benchmark/LEXam", "split": None, "limit": 40}
    ev = {"sjp-validation-loglik": {"accuracy": 0.7}, "lexam_mcq4-loglik": {"accuracy": 0.30, "settings": settings}}
    same = {"lexam_mcq4-loglik": {"accuracy": 0.40, "settings": settings}}
    other = {"lexam_mcq4-loglik": {"accuracy": 0.40, "settings": {**settings, "limit": None}}}
    a = write_run(tmp_path / "a", name="a", rank=8, lr=1e-4, losses=loss_curve(0.8), evals=ev, base_evals=same)
    b = write_run(tmp_path / "b", name="b", rank=8, lr=1e-4, losses=loss_curve(0.8), evals=ev, base_evals=other)
    fa = _one(a)
    assert fa["runs"][a.name]["lexam_drop_points"] == pytest.approx(10.0)
    fb = _one(b)
    assert "lexam_drop_points" not in fb["runs"][b.name]  # base on all questions, run on 40: no drop
    assert "retention was not checked" in fb["recommended"]["why"]


def test_selection_on_validation_reports_the_test_score_once(tmp_path):
    # "lucky" is best on test but not on validation: choosing on test would be optimistic
    write_run(tmp_path, name="lucky", rank=8, lr=1e-3, losses=loss_curve(0.7),
              evals={"sjp-validation-loglik": {"accuracy": 0.70}, "sjp-test-loglik": {"accuracy": 0.90}})
    p = write_run(tmp_path, name="sound", rank=8, lr=1e-4, losses=loss_curve(0.8),
                  evals={"sjp-validation-loglik": {"accuracy": 0.80}, "sjp-test-loglik": {"accuracy": 0.75}})
    out = _groups(tmp_path)
    f = next(iter(out["groups"].values()))
    rec = f["recommended"]
    assert rec["run"] == p.name and rec["selection_split"] == "validation"
    assert rec["task_metric_validation"] == 0.80 and rec["task_metric_test"] == 0.75
    assert f["retention"]["selection_key"] == "sjp-validation-loglik" and f["retention"]["report_key"] == "sjp-test-loglik"
    assert "validation" in out["splits"]["task_metric_validation"] and "test" in out["splits"]["task_metric_test"]


def test_without_a_validation_evaluation_no_selection_is_claimed(tmp_path):
    write_run(tmp_path, name="a", rank=8, lr=1e-3, losses=loss_curve(0.7), evals={"sjp-test-loglik": {"accuracy": 0.9}})
    write_run(tmp_path, name="b", rank=8, lr=1e-4, losses=loss_curve(0.8), evals={"sjp-test-loglik": {"accuracy": 0.8}})
    rec = _one(tmp_path)["recommended"]
    assert rec["run"] is None and rec["criterion"] == "no_validation_split" and "validation" in rec["why"]
    assert rec["best_on_test"]["run"].startswith("a-") and rec["best_on_test"]["split"] == "test"


def test_fp8_scores_are_never_selected_on_or_pooled_with_bf16_ones(tmp_path):
    """`lexfine eval --fp8` writes sjp-validation-loglik-fp8: approximate scores, which selection ignores even where
    they would change the choice."""
    p = write_run(tmp_path, name="a", rank=8, lr=1e-3, losses=loss_curve(0.7),
                  evals={"sjp-validation-loglik": {"accuracy": 0.80}, "sjp-validation-loglik-fp8": {"accuracy": 0.60}})
    write_run(tmp_path, name="b", rank=8, lr=1e-4, losses=loss_curve(0.8),
              evals={"sjp-validation-loglik": {"accuracy": 0.75}, "sjp-validation-loglik-fp8": {"accuracy": 0.95}})
    f = _one(tmp_path)
    assert f["retention"]["selection_key"] == "sjp-validation-loglik"
    assert f["recommended"]["run"] == p.name and f["recommended"]["task_metric_validation"] == 0.80
    # FP8 scores alone: no selection claimed from them
    only = tmp_path / "only"
    write_run(only, name="c", rank=8, lr=1e-3, losses=loss_curve(0.7),
              evals={"sjp-validation-loglik-fp8": {"accuracy": 0.9}})
    assert _one(only)["retention"]["selection_key"] is None


def test_a_zero_loss_does_not_divide(tmp_path):
    """`findings` divided by the best LoRA loss and by the smallest loss above the saturation rank."""
    zero = [0.0] * 30
    write_run(tmp_path, name="z8", rank=8, lr=1e-3, losses=zero)
    write_run(tmp_path, name="z16", rank=16, lr=1e-3, losses=zero)
    write_run(tmp_path, name="f", method="full", lr=1e-5, losses=zero)
    f = _one(tmp_path)
    assert f["loss_gap_full_vs_best_lora"] is None and f["rank_saturation"]["spread_at_or_above"] is None
    assert json.loads(to_json(_groups(tmp_path)))["diverged"] == []


def test_group_hash_leaves_out_only_the_seed():
    from lexfine.config import RunConfig

    a = RunConfig(train={"seed": 1})
    assert a.group_hash() == RunConfig(train={"seed": 2}).group_hash() and a.run_hash() != RunConfig().run_hash()
    assert a.group_hash() != RunConfig(train={"seed": 1}, data={"loss_on": "all"}).group_hash()
    assert a.group_hash() != RunConfig(train={"seed": 1}, lora={"alpha": 64}).group_hash()


def test_cli_report_lists_diverged_run_ids_and_never_ranks_them(tmp_path):
    from typer.testing import CliRunner

    from lexfine.cli import app

    runs = tmp_path / "runs"
    ok = write_run(runs, name="ok", rank=8, lr=1e-4, losses=loss_curve(0.8),
                   evals={"sjp-validation-loglik": {"accuracy": 0.6}})
    # a NaN step logged as null by a trainer that still ended "completed", with the best validation score
    nan = write_run(runs, name="nan", rank=8, lr=1e-2, losses=loss_curve(0.1)[:40] + [float("nan")] * 20,
                    evals={"sjp-validation-loglik": {"accuracy": 0.9}})
    failed = write_run(runs, name="failed", rank=8, lr=3e-3, losses=loss_curve(0.2), status="failed")
    res = CliRunner().invoke(app, ["report", str(runs), "--out", str(tmp_path / "out"), "--no-figures"])
    assert res.exit_code == 0, res.output
    f = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert f["diverged"] == [nan.name] and f["not_completed"] == {failed.name: "failed"}
    (g,) = f["groups"].values()
    assert g["best_lr"]["lora"] == {"8": 1e-4} and g["recommended"]["run"] == ok.name
    only_failed = CliRunner().invoke(app, ["report", str(failed), "--out", str(tmp_path / "o2"), "--no-figures"])
    assert only_failed.exit_code == 0, only_failed.output
    assert json.loads((tmp_path / "o2" / "findings.json").read_text())["groups"] == {}
