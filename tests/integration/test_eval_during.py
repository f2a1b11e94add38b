"""Evaluation during training on the tiny Apertus: rows in metrics.jsonl, the same numbers as `lexfine eval` on the
saved model, the same training with and without it, the best checkpoint under a retention rule, resume."""

import pytest

from lexfine.config import validate
from lexfine.rundir import RunDir
from lexfine.train import run

EVAL = {"every_steps": 2, "limit": 6}


def _eval_rows(rd: RunDir) -> list[dict]:
    return [r for r in rd.metrics() if any(k.startswith("eval/") for k in r)]


def test_rows_match_lexfine_eval_training_is_unchanged_and_best_is_selected(tiny_config, tmp_path):
    from lexfine.eval import evaluate

    plain = run(validate(tiny_config(lora__dropout=0.1, output_dir=str(tmp_path / "a"))))
    select = {"metric": "eval/sjp/validation/accuracy", "max_lexam_drop": 1.0}
    cfg = validate(tiny_config(lora__dropout=0.1, output_dir=str(tmp_path / "b"),
                               eval_during={**EVAL, "select": select}))
    rd = run(cfg)
    assert cfg.run_id() == validate(tiny_config(lora__dropout=0.1)).run_id()  # not part of the run's identity
    # same weight updates: evaluation consumed no training randomness (LoRA dropout is on) and every step is logged
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
    # selection: the best step after 0 (first on ties), saved to best/, named in the manifest, evaluable as <run>@best
    by_step = {r["step"]: r for r in rows}
    best = max((2, 4), key=lambda s: (by_step[s]["eval/sjp/validation/accuracy"], -s))
    sel = m["selected_checkpoint"]
    assert sel["step"] == best and sel["metrics"] == {k: v for k, v in by_step[best].items() if k.startswith("eval/")}
    assert sel["rule"]["metric"] == select["metric"] and sel["rule"]["max_lexam_drop"] == 1.0
    assert (rd.path / "best" / "adapter_config.json").is_file() and not (rd.path / "best.tmp").exists()
    if best == 2:  # the best/ adapter is step 2's, not the final one
        at_best = evaluate(f"{rd.path}@best", "lexam_mcq4", limit=6, write=False, progress=False)
        assert at_best["accuracy"] == pytest.approx(by_step[2]["eval/lexam_mcq4/accuracy"], abs=1e-4)


def test_preempted_run_resumes_without_repeating_evaluations(tiny_config, monkeypatch):
    import os
    import signal

    from lexfine.train import callbacks

    cfg = validate(tiny_config(train__keep_checkpoints=True, eval_during=EVAL))
    original = callbacks.MetricsCallback.on_log

    def signal_at_step_2(self, args, state, control, logs=None, **kw):
        original(self, args, state, control, logs=logs, **kw)
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(callbacks.MetricsCallback, "on_log", signal_at_step_2)
    rd = run(cfg)
    assert rd.status == "interrupted" and [r["step"] for r in _eval_rows(rd)] == [0, 2]  # no end-of-run scoring
    monkeypatch.setattr(callbacks.MetricsCallback, "on_log", original)
    rd = run(cfg)
    assert rd.status == "completed" and rd.manifest()["resumed_from"] == "checkpoint-3"
    assert [r["step"] for r in _eval_rows(rd)] == [0, 2, 4]  # the base model is not scored again
    assert [r["step"] for r in rd.train_metrics()] == [1, 2, 3, 4]
    assert rd.manifest()["eval_during"]["evaluations"] == 3


def test_early_stop_ends_training_completed(tiny_config, monkeypatch):
    from lexfine.train import select

    original = select.Selector.update

    def collapse_at_step_2(self, step, values):  # the rule itself: tests/unit/test_eval_during_select.py
        d = original(self, step, values)
        d.stop = "retention collapsed" if step == 2 else None
        return d

    monkeypatch.setattr(select.Selector, "update", collapse_at_step_2)
    rd = run(validate(tiny_config(eval_during={**EVAL, "every_steps": 1, "stop_lexam_drop": 0.1})))
    m = rd.manifest()
    assert m["status"] == "completed" and m["steps"] == 2
    assert m["stopped_early"] == {"step": 2, "reason": "retention collapsed"}
    assert [r["step"] for r in _eval_rows(rd)] == [0, 1, 2] and (rd.adapter_dir / "adapter_config.json").is_file()
