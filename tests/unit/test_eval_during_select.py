"""eval_during config, checkpoint selection rule, early stop, and the readers that must ignore eval/ rows."""

import pytest

from lexfine.config import EvalDuringArgs, SelectArgs, build_config
from lexfine.errors import ConfigError
from lexfine.rundir import RunDir
from lexfine.train.select import Selector

T, R = "eval/sjp/validation/macro_f1", "eval/lexam_mcq4/accuracy"


def test_config_defaults_and_run_id():
    cfg = build_config({})
    assert cfg.eval_during.every_steps == 0 and cfg.eval_during.tasks == ["sjp", "lexam_mcq4"]
    assert build_config({}, ["eval_during.every_steps=50", "eval_during.limit=500"]).run_id() == cfg.run_id()


def test_config_refuses_a_select_metric_of_another_task():
    with pytest.raises(ConfigError, match="eval/lexam_mcq8/accuracy.*eval_during.tasks"):
        build_config({"eval_during": {"select": {"metric": "eval/lexam_mcq8/accuracy"}}})
    with pytest.raises(ConfigError, match="lexam_mcq\\* task"):
        build_config({"eval_during": {"tasks": ["sjp"], "select": {"metric": T}}})
    with pytest.raises(ConfigError, match="'eval_during.select.foo'; allowed here: metric, max_lexam_drop"):
        build_config({}, ["eval_during.select.foo=1"])
    with pytest.raises(ConfigError, match="unknown task 'sjp:generate'"):
        build_config({}, ["eval_during.tasks=[sjp:generate]"])


def test_selector_keeps_the_best_within_the_retention_budget_and_stops_on_collapse():
    s = Selector(SelectArgs(metric=T, max_lexam_drop=0.05), "lexam_mcq4", stop_drop=0.2)
    assert not s.update(0, {T: 0.9, R: 0.50}).new_best  # the base model is the reference, not a candidate
    assert s.update(10, {T: 0.60, R: 0.48}).new_best
    assert not s.update(20, {T: 0.70, R: 0.40}).new_best  # better task metric, but 0.10 below the base's LEXam
    assert not s.update(30, {T: 0.55, R: 0.50}).new_best  # eligible, not better
    d = s.update(40, {T: 0.65, R: 0.46})
    assert d.new_best and d.stop is None and s.best["step"] == 40
    d = s.update(50, {T: 0.80, R: 0.25})
    assert not d.new_best and "0.2500 is 0.2500 below the base model's 0.5000" in d.stop
    assert s.rule()["base_retention"] == 0.5 and s.rule()["max_lexam_drop"] == 0.05


def test_selector_never_selects_a_checkpoint_that_answers_one_letter():
    """SmolLM2 on SJP at LR 1e-3 (docs/results/smollm2-sjp): LEXam 0.232 vs base 0.269 is within 5 points, but
    every question got 'D': that is a collapse, not retention."""
    share = "eval/lexam_mcq4/top_answer_share"
    s = Selector(SelectArgs(metric=T, max_lexam_drop=0.05), "lexam_mcq4", None)
    s.update(0, {T: 0.459, R: 0.269, share: 0.35})
    assert s.update(10, {T: 0.45, R: 0.26, share: 0.5}).new_best
    assert not s.update(20, {T: 0.58, R: 0.232, share: 0.998}).new_best
    assert s.best["step"] == 10 and s.rule()["max_top_answer_share"] == 0.9
    off = Selector(SelectArgs(metric=T, max_lexam_drop=0.05, max_top_answer_share=None), "lexam_mcq4", None)
    off.update(0, {T: 0.459, R: 0.269})
    assert off.update(20, {T: 0.58, R: 0.232, share: 0.998}).new_best  # the condition can be turned off


def test_selector_restore_drops_a_best_saved_after_the_checkpoint(tmp_path):
    rd = RunDir(tmp_path)
    rd.create("name: x\n", "x")
    (tmp_path / "best").mkdir()
    rd.update_manifest(selected_checkpoint={"step": 30})
    s = Selector(SelectArgs(metric=T, max_lexam_drop=None), "lexam_mcq4", None)
    s.restore([{"step": 0, T: 0.1, R: 0.5}, {"step": 10, T: 0.3, R: 0.5}, {"step": 20, T: 0.2, R: 0.5}], rd, True)
    assert s.base_retention == 0.5 and s.best["step"] == 10
    assert not (tmp_path / "best").exists() and rd.manifest()["selected_checkpoint"] is None
    assert s.update(40, {T: 0.25, R: 0.5}).new_best  # best/ must be written again


def test_eval_rows_do_not_disturb_training_readers(tmp_path):
    from lexfine.report.collect import load_run_dir

    rd = RunDir(tmp_path / "run")
    rd.create("name: run\nmodel: smollm2-135m\n", "run")
    rd.append_metrics({"step": 0, "epoch": 0.0, T: 0.5})
    rd.append_metrics({"step": 1, "loss": 2.0, "num_tokens": 10, "elapsed_s": 1.0})
    rd.append_metrics({"step": 1, T: 0.6})
    assert [r["step"] for r in rd.train_metrics()] == [1]
    run = load_run_dir(rd.path)
    assert run.curve["loss"].tolist() == [2.0]  # no NaN loss from eval rows (a NaN would read as diverged)
    rd.truncate_metrics_after(0)
    assert rd.metrics() == [{"step": 0, "epoch": 0.0, T: 0.5}]


def test_a_restart_without_checkpoint_drops_the_first_attempts_rows_step_0_included(tmp_path):
    """A run that failed before its first checkpoint (on an H200: an API error at step 1, after the step-0
    evaluation) started over with two step-0 evaluations in metrics.jsonl."""
    from lexfine.train.sft import _resume_state

    rd = RunDir(tmp_path / "run")
    rd.create("name: run\nmodel: smollm2-135m\n", "run")
    rd.append_metrics({"step": 0, "epoch": 0.0, T: 0.5})
    rd.append_metrics({"step": 1, "loss": 2.0, "num_tokens": 10, "elapsed_s": 1.0})
    assert _resume_state(rd, main=True) == (None, 0.0, 0)
    assert rd.metrics() == []


def test_best_target_needs_a_selected_checkpoint(tmp_path):
    from lexfine.errors import ModelError
    from lexfine.eval.target import resolve_target

    rd = RunDir(tmp_path / "run")
    rd.create("name: run\n", "run")
    with pytest.raises(ModelError, match="no selected checkpoint in best/"):
        resolve_target(f"{rd.path}@best")
    (rd.path / "best").mkdir()
    (rd.path / "best" / "adapter_config.json").write_text("{}")
    t = resolve_target(f"{rd.path}@best")
    assert t.weights == "adapter" and t.weights_dir == rd.path / "best" and t.out_dir == rd.path / "best"
    assert EvalDuringArgs().select is None


def test_export_takes_the_selected_checkpoint(tmp_path):
    from lexfine.errors import LexfineError
    from lexfine.export import export_run

    rd = RunDir(tmp_path / "run")
    rd.create("name: run\n", "run")
    rd.set_status("completed")
    (rd.path / "adapter").mkdir()
    (rd.path / "adapter" / "adapter_config.json").write_text('{"final": true}')
    with pytest.raises(LexfineError, match="has no best/"):
        export_run(f"{rd.path}@best", tmp_path / "o", merge=False)
    (rd.path / "best").mkdir()
    (rd.path / "best" / "adapter_config.json").write_text('{"best": true}')
    import torch
    from safetensors.torch import save_file

    # only best/ has weights: export checks the adapter it exports, not the run's final one
    save_file({"w": torch.ones(2)}, str(rd.path / "best" / "adapter_model.safetensors"))
    out = export_run(f"{rd.path}@best", tmp_path / "o", merge=False)
    assert (out / "adapter_config.json").read_text() == '{"best": true}'
