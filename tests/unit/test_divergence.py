"""Non-finite steps: metrics rows say so (never loss 0.0), the callback stops after N consecutive ones, a
non-finite step is never checkpointed, and a diverged run keeps its last finite checkpoint."""

from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl

from lexfine.errors import EXIT_DIVERGED
from lexfine.rundir import RunDir
from lexfine.train.callbacks import MetricsCallback
from lexfine.train.divergence import DivergenceCallback, TrainingDiverged, nonfinite_fields, record_divergence
from tests.unit.test_checkpoints import make_ckpt

NAN, INF = float("nan"), float("inf")


def state(step, max_steps=100):
    return SimpleNamespace(global_step=step, max_steps=max_steps, epoch=step / 10, is_world_process_zero=True)


def log_steps(cb, values, start=1, every=1, save=False):
    """Feed (loss, grad_norm) logs to the callback as the Trainer would; returns the controls."""
    controls = []
    for i, (loss, gn) in enumerate(values):
        step = start + i * every
        control = TrainerControl(should_save=save)
        cb.on_step_end(None, state(step), control)
        cb.on_log(None, state(step), control, logs={"loss": loss, "grad_norm": gn, "learning_rate": 1e-3})
        controls.append(control)
    return controls


def test_nonfinite_fields():
    assert nonfinite_fields({"loss": NAN, "grad_norm": INF}) == ["loss", "grad_norm"]
    assert nonfinite_fields({"loss": 1.5, "grad_norm": -INF}) == ["grad_norm"]
    assert nonfinite_fields({"loss": 0.0, "grad_norm": None, "learning_rate": NAN}) == []


def test_stops_after_n_consecutive_nonfinite_steps():
    cb = DivergenceCallback(3)
    controls = log_steps(cb, [(2.0, 1.0), (NAN, 1.0), (1.9, INF), (1.8, 1.0), (NAN, None), (INF, NAN), (NAN, NAN),
                              (1.0, 1.0)])
    stops = [c.should_training_stop for c in controls]
    assert stops == [False] * 6 + [True, False]  # steps 2-3 non-finite, step 4 finite: the count starts again
    assert cb.diverged_at == 7 and cb.last_finite_step == 8 and cb.consecutive == 0


def test_a_logged_row_counts_for_every_step_it_averages():
    cb = DivergenceCallback(3)
    controls = log_steps(cb, [(2.0, 1.0), (NAN, 1.0)], start=5, every=5)  # logging_steps 5: steps 6-10 in one row
    assert controls[-1].should_training_stop and cb.diverged_at == 10 and cb.last_finite_step == 5


def test_a_nonfinite_step_is_never_checkpointed():
    cb = DivergenceCallback(10)
    controls = log_steps(cb, [(2.0, 1.0), (NAN, 1.0), (2.0, INF)], save=True)
    assert [c.should_save for c in controls] == [True, False, False]
    # a save step is always logged first, so the decision is made on that step's own loss
    control = TrainerControl(should_save=True)
    cb.on_step_end(None, state(7), control)
    assert control.should_log


def test_training_that_ends_on_a_nonfinite_step_diverged_but_a_preemption_stop_did_not():
    cb = DivergenceCallback(3)
    log_steps(cb, [(2.0, 1.0), (NAN, NAN)], start=9)
    cb.on_train_end(None, state(10, max_steps=20), TrainerControl())
    assert cb.diverged_at is None  # stopped early (preemption): its save was cancelled, the resume replays
    cb.on_train_end(None, state(10, max_steps=10), TrainerControl())
    assert cb.diverged_at == 10


def test_the_trainers_loss_accumulator_is_reset_after_a_nan():
    # transformers resets it with `tr_loss -= tr_loss`: NaN - NaN stays NaN and every later row would be NaN
    cb = DivergenceCallback(3)
    cb.attach(SimpleNamespace(_tr_loss=torch.tensor(NAN)))
    log_steps(cb, [(NAN, 1.0)])
    assert cb.trainer._tr_loss.item() == 0.0


def test_metrics_rows_flag_nonfinite_values_and_never_log_zero(tmp_path):
    rd = RunDir(tmp_path)
    cb = MetricsCallback(rd)
    cb.on_train_begin(None, state(0), None)
    for step, (loss, gn) in enumerate([(2.0, 1.0), (NAN, NAN), (INF, 3.0), (1.5, -INF)], start=1):
        cb.on_log(None, state(step), None, logs={"loss": loss, "grad_norm": gn, "learning_rate": 1e-3})
    rows = rd.metrics()  # valid JSON: no NaN literals
    assert [r["loss"] for r in rows] == [2.0, None, None, 1.5]
    assert [r["grad_norm"] for r in rows] == [1.0, None, 3.0, None]
    assert [r.get("nonfinite") for r in rows] == [None, ["loss", "grad_norm"], ["loss"], ["grad_norm"]]
    assert "NaN" not in rd.metrics_path.read_text() and "Infinity" not in rd.metrics_path.read_text()


def test_record_divergence_keeps_the_last_finite_checkpoint(tmp_path):
    rd = RunDir(tmp_path)
    rd.create("name: x\n", "x-1")
    for s in (2, 4, 6):
        make_ckpt(rd.checkpoints, s)  # complete checkpoints: resume only takes those (lexfine.checkpoints)
    cb = DivergenceCallback(2)
    log_steps(cb, [(2.0, 1.0), (NAN, NAN), (NAN, NAN)], start=4)
    err = record_divergence(rd, cb, main=True)
    assert isinstance(err, TrainingDiverged) and err.exit_code == EXIT_DIVERGED == 65
    assert "step 6" in str(err) and "checkpoint-4" in str(err) and "\n" not in str(err)
    m = rd.manifest()
    assert (m["status"], m["diverged_at_step"], m["last_finite_step"]) == ("diverged", 6, 4)
    assert m["last_finite_checkpoint"] == "checkpoints/checkpoint-4"
    assert sorted(p.name for p in rd.checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert rd.latest_checkpoint().name == "checkpoint-4"


def test_build_args_logs_nonfinite_losses_as_they_are(tmp_path):
    from lexfine.config import build_config
    from lexfine.train.sft import build_args

    cfg = build_config({}, [f"output_dir={tmp_path}"])
    assert build_args(cfg, RunDir(cfg.run_dir())).logging_nan_inf_filter is False


def test_max_nonfinite_steps_is_documented_and_not_part_of_the_run_id():
    from lexfine.config import ConfigError, build_config

    a, b = build_config({}, ["train.max_nonfinite_steps=1"]), build_config({}, [])
    assert b.train.max_nonfinite_steps == 3 and a.run_id() == b.run_id()
    with pytest.raises(ConfigError, match="max_nonfinite_steps"):
        build_config({}, ["train.max_nonfinite_steps=0"])
