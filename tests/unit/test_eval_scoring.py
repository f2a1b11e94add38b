"""Loglik scoring variants: the summed log-prob (headline) and the mean per answer token, with the real SmolLM2
tokenizer, whose SJP answers have different token counts ("dismissal" + end-of-turn 5, "approval" + end-of-turn 3)."""

import pytest

from lexfine.eval.loglik import predict
from lexfine.eval.runner import build_summary, make_plan
from lexfine.eval.scoring import per_token
from lexfine.eval.tasks import get_task

SJP = get_task("sjp")


def _tokens(tok, task):
    plan = make_plan(tok, task, "loglik", 512)
    return plan, {lab: len(c) for lab, c in zip(task.labels, plan.candidates)}


def test_sjp_answers_differ_in_length_and_normalised_scores_divide_by_it(smollm_tokenizer):
    plan, n = _tokens(smollm_tokenizer, SJP)
    assert plan.scoring == "sequence_with_eot" and n == {"dismissal": 5, "approval": 3}
    summed = [-5.0, -4.5]  # dismissal, approval
    norm = per_token(summed, plan.candidates)
    assert norm == [summed[0] / 5, summed[1] / 3]  # exactly the per-candidate token counts
    # the sum prefers the shorter answer, the mean per token the longer one
    assert predict(summed, SJP.labels) == "approval" and predict(norm, SJP.labels) == "dismissal"


def _row(gold, summed, cands):
    norm = per_token(summed, cands)
    return {"gold": gold, "prediction": predict(summed, SJP.labels), "scores": dict(zip(SJP.labels, summed)),
            "prediction_length_normalized": predict(norm, SJP.labels), "language": "fr"}


def test_summary_reports_both_variants_and_names_the_headline(smollm_tokenizer):
    plan, n = _tokens(smollm_tokenizer, SJP)
    rows = [_row("dismissal", [-5.0, -4.5], plan.candidates),   # sum: approval (wrong), mean: dismissal (right)
            _row("dismissal", [-3.0, -6.0], plan.candidates),   # both right
            _row("approval", [-8.0, -2.0], plan.candidates),    # both right
            _row("approval", [-6.0, -4.2], plan.candidates)]    # sum: approval (right), mean: dismissal (wrong)
    s = build_summary(SJP, "loglik", rows, n)
    assert s["headline_scoring"] == "sum"
    assert s["accuracy"] == pytest.approx(0.75)
    ln = s["length_normalized"]
    assert ln["scoring"] == "mean log-prob per answer token" and ln["identical_to_sum"] is False
    assert ln["accuracy"] == pytest.approx(0.75) and ln["agreement_with_sum"] == pytest.approx(0.5)
    assert ln["prediction_counts"] == {"dismissal": 3, "approval": 1, "none": 0}
    assert s["prediction_counts"] == {"dismissal": 1, "approval": 3, "none": 0}
    assert len(ln["accuracy_ci95"]) == 2 and len(ln["macro_f1_ci95"]) == 2 and "macro_f1" in ln


def test_lexam_letters_are_single_tokens_so_both_variants_coincide(smollm_tokenizer):
    task = get_task("lexam_mcq4")
    plan, n = _tokens(smollm_tokenizer, task)
    assert plan.scoring == "first_token" and set(n.values()) == {1}
    summed = [-1.5, -0.5, -2.0, -3.0]
    assert per_token(summed, plan.candidates) == summed
    rows = [{"gold": "B", "prediction": "B", "prediction_length_normalized": "B", "language": "de", "area": "x"}]
    s = build_summary(task, "loglik", rows, n)
    assert s["length_normalized"]["identical_to_sum"] is True
    assert s["length_normalized"]["accuracy"] == s["accuracy"]


def test_generate_mode_has_no_scoring_variants():
    s = build_summary(SJP, "generate", [{"gold": "approval", "prediction": None, "language": "fr"}])
    assert "length_normalized" not in s and "headline_scoring" not in s


def test_manifest_headline_and_cli_line_carry_the_length_normalised_numbers(smollm_tokenizer):
    from lexfine.eval.cli import _line
    from lexfine.eval.runner import headline

    plan, n = _tokens(smollm_tokenizer, SJP)
    rows = [_row("dismissal", [-5.0, -4.5], plan.candidates), _row("approval", [-8.0, -2.0], plan.candidates)]
    s = build_summary(SJP, "loglik", rows, n)
    h = headline(s)
    assert h["headline_scoring"] == "sum" and h["accuracy"] == 0.5
    assert h["length_normalized"] == {"accuracy": 1.0, "macro_f1": 1.0}
    assert "(per token: accuracy=1.0000 macro_f1=1.0000)" in _line(s)
