"""Evaluation during training on the tiny Apertus: rows in metrics.jsonl, the same numbers as `lexfine eval` on the
saved model, the same training with and without it, the best checkpoint under a retention rule, resume."""

import pytest

from lexfine.config import validate
from lexfine.rundir import RunDir
from lexfine.train import run

EVAL = {"every_steps": 2, "limit": 6}


def _eval_rows(rd: RunDir) -> list[dict]:
    return [r for r in rd.metrics() if any(k.startswith("eval/") for k in r)]


def test_rows_match_lexfine_eval_and_training_is_unchanged(tiny_config, tmp_path):
    from lexfine.eval import evaluate

    plain = run(validate(tiny_config(lora__dropout=0.1, output_dir=str(tmp_path / "a"))))
    cfg = validate(tiny_config(lora__dropout=0.1, output_dir=str(tmp_path / "b"), eval_during=EVAL))
    rd = run(cfg)
    assert cfg.run_id() == validate(tiny_config(lora__dropout=0.1)).run_id()  # not part of the run's identity
    # same weights updates: evaluation consumed no training randomness (LoRA dropout is on)
    assert [r["loss"] for r in rd.train_metrics()] == [r["loss"] for r in plain.train_metrics()]
    m = rd.manifest()
    assert m["status"] == "completed" and m["final_loss"] == plain.manifest()["final_loss"]
    rows = _eval_rows(rd)
    assert [r["step"] for r in rows] == [0, 2, 4]  # base model, every 2 steps, the end (= step 4)
    keys = {"eval/sjp/validation/accuracy", "eval/sjp/validation/macro_f1", "eval/lexam_mcq4/accuracy"}
    assert keys <= set(rows[0]) and "loss" not in rows[0]
    assert rows[0]["eval/sjp/validation/n"] == 6 and rows[0]["eval/lexam_mcq4/n"] == 6
    assert m["eval_during"]["evaluations"] == 3 and m["eval_during"]["seconds"] > 0
    assert m["eval_during"]["data"]["eval/sjp/validation"]["data"] == "bundled:sjp_fr_heldout"
    # the interface contract: the final row is what `lexfine eval` gives for the saved model on the same cases
    sjp = evaluate(rd.path, "sjp", data="bundled:sjp_fr_heldout", split="validation", limit=6, write=False,
                   progress=False)
    lexam = evaluate(rd.path, "lexam_mcq4", limit=6, write=False, progress=False)
    last = rows[-1]
    assert last["eval/sjp/validation/accuracy"] == pytest.approx(sjp["accuracy"], abs=1e-4)
    assert last["eval/sjp/validation/macro_f1"] == pytest.approx(sjp["macro_f1"], abs=1e-4)
    assert last["eval/lexam_mcq4/accuracy"] == pytest.approx(lexam["accuracy"], abs=1e-4)


def test_select_keeps_the_best_step_within_the_retention_budget(tiny_config, tmp_path):
    from lexfine.eval import evaluate

    cfg = validate(tiny_config(train__max_steps=3, output_dir=str(tmp_path / "s"), eval_during={
        "every_steps": 1, "limit": 6, "select": {"metric": "eval/sjp/validation/accuracy", "max_lexam_drop": 1.0}}))
    rd = run(cfg)
    rows = {r["step"]: r for r in _eval_rows(rd)}
    sel = rd.manifest()["selected_checkpoint"]
    best = max((s for s in rows if s > 0), key=lambda s: (rows[s]["eval/sjp/validation/accuracy"], -s))
    assert sel["step"] == best and sel["metrics"] == {k: v for k, v in rows[best].items() if k.startswith("eval/")}
    assert sel["rule"]["metric"] == "eval/sjp/validation/accuracy" and sel["rule"]["max_lexam_drop"] == 1.0
    assert (rd.path / "best" / "adapter_config.json").is_file() and not (rd.path / "best.tmp").exists()
    out = evaluate(f"{rd.path}@best", "sjp", data="bundled:sjp_fr_heldout", split="validation", limit=6,
                   write=False, progress=False)
    assert out["accuracy"] == pytest.approx(rows[best]["eval/sjp/validation/accuracy"], abs=1e-4)


def test_early_stop_when_retention_collapses(tiny_config, tmp_path):
    # a negative drop budget is refused by the config; a LR of 0.5 wrecks the tiny model's LEXam letters quickly,
    # but to be deterministic the budget is the smallest allowed and the check is on what was recorded
    cfg = validate(tiny_config(train__max_steps=6, train__lr=0.5, output_dir=str(tmp_path / "e"),
                               eval_during={"every_steps": 1, "limit": 6, "stop_lexam_drop": 1e-9}))
    rd = run(cfg)
    m = rd.manifest()
    rows = _eval_rows(rd)
    base = rows[0]["eval/lexam_mcq4/accuracy"]
    dropped = [r["step"] for r in rows[1:] if base - r["eval/lexam_mcq4/accuracy"] > 1e-9]
    if not dropped:
        pytest.skip("LEXam accuracy never fell on this tiny run")
    assert m["status"] == "completed" and m["stopped_early"]["step"] == dropped[0] == m["steps"]
