"""Loading runs: lexfine run directories, sweep folders, W&B exports, and one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lexfine.errors import LexfineError
from lexfine.report.collect import collect, runs_table, size_from_name, size_from_params
from lexfine.report.synthetic import loss_curve, write_run, write_sweep_jsonl


@pytest.mark.parametrize("name, size", [
    ("random:apertus-8b", "8B"), ("random:apertus-70b", "70B"), ("smollm2-135m", "135M"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "135M"), ("swiss-ai/Apertus-70B-Instruct-2509", "70B"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "0.5B"), ("/scratch/u4b/my-model", None), ("gpt2", None), (None, None),
    ("meta-llama/Llama-3.1-8B", "8B"), ("apertus8B-sft", "8B"),
])
def test_size_from_name(name, size):
    assert size_from_name(name) == size


def test_size_from_params():
    assert size_from_params(70.6e9) == "71B"
    assert size_from_params(8.0e9) == "8B"
    assert size_from_params(135e6) == "135M"
    assert size_from_params(None) is None


def test_run_dir_fields(tmp_path):
    losses = loss_curve(0.7)
    losses[5] = float("nan")
    p = write_run(tmp_path, name="one", rank=32, lr=3e-4, losses=losses, world_size=8, num_nodes=2, gpu="H100",
                  evals={"sjp-loglik": {"accuracy": 0.8, "macro_f1": 0.7}},
                  base_evals={"lexam_mcq4-loglik": {"accuracy": 0.41}}, tokens_per_step=1000, seconds_per_step=0.5)
    # an evaluation run later and not (yet) in the manifest: summary.json is the source of truth
    (p / "eval" / "lexam_mcq4-loglik").mkdir(parents=True)
    (p / "eval" / "lexam_mcq4-loglik" / "summary.json").write_text(json.dumps({"n": 9, "accuracy": 0.39}))
    rs = collect([p])
    (run,) = rs.runs
    assert (run.name, run.method, run.rank, run.lr, run.size) == (p.name, "lora", 32, 3e-4, "8B")
    assert math.isnan(run.curve["loss"][5]) and len(run.curve) == len(losses)  # null in metrics.jsonl -> NaN
    assert run.evals["sjp-loglik"]["macro_f1"] == 0.7 and run.evals["lexam_mcq4-loglik"]["accuracy"] == 0.39
    assert rs.base_evals == {"8B": {"lexam_mcq4-loglik": {"accuracy": 0.41}}}
    assert (run.world_size, run.num_nodes, run.gpu, run.tokens_per_s) == (8, 2, "H100", 2000.0)
    assert runs_table(rs).loc[0, "sjp-loglik/macro_f1"] == 0.7


def test_full_run_has_no_rank_and_size_from_parameters(tmp_path):
    model_dir = tmp_path / "models" / "my-model"
    model_dir.mkdir(parents=True)
    p = write_run(tmp_path / "runs", name="f", method="full", lr=1e-5, losses=loss_curve(0.6),
                  model="random:apertus-8b", parameters_total=135_000_000)
    cfg = (p / "config.yaml").read_text().replace("random:apertus-8b", str(model_dir))
    (p / "config.yaml").write_text(cfg)
    (run,) = collect([p]).runs
    assert run.rank is None and run.method == "full" and run.size == "135M"


def test_sweep_folders_nested_and_via_sweep_jsonl(tmp_path):
    a = write_run(tmp_path / "sweep" / "runs", name="a", lr=1e-4, losses=loss_curve(0.8))
    b = write_run(tmp_path / "elsewhere", name="b", lr=1e-3, losses=loss_curve(0.7))
    write_sweep_jsonl(tmp_path / "sweep", [b])
    # a planned run (no metrics yet) is left out with a note, not an error
    planned = write_run(tmp_path / "sweep" / "runs", name="c", lr=1e-5, losses=[], status="planned")
    rs = collect([tmp_path / "sweep", a])  # `a` reached twice: counted once
    assert sorted(r.name for r in rs.runs) == sorted([a.name, b.name])
    assert any(planned.name in n for n in rs.notes)


def _wandb_csv(path: Path, losses, lr, extra_cols=None, timestamp=1000.0):
    cols = ["train/global_step", "train/loss", "train/learning_rate", "train/num_tokens", "_runtime", "_timestamp",
            "_step"]
    lines = [",".join(cols)]
    for i, lo in enumerate(losses, start=1):
        lines.append(f"{i},{lo},{lr},{i * 100},{10 + i},{timestamp + i},{i - 1}")
    lines.append(f"{len(losses)},,,,{20 + len(losses)},{timestamp + 99},{len(losses)}")  # summary row: no loss
    path.write_text("\n".join(lines) + "\n")


def test_wandb_export_layout(tmp_path):
    exp = tmp_path / "export"
    (exp / "history").mkdir(parents=True)
    (exp / "history_other").mkdir()
    _wandb_csv(exp / "history" / "lr1e-3_r8_lora_8B.csv", loss_curve(0.7, steps=30), 1e-3)
    _wandb_csv(exp / "history" / "lr1e-4_r1_full_8B.csv", loss_curve(0.6, steps=30), 1e-4)
    # a logged "nan" loss must survive (diverged), unlike an empty cell (nothing logged)
    _wandb_csv(exp / "history" / "lr1e-2_r8_lora_8B.csv", [1.0, 0.9, "nan", 0.8], 1e-2)
    _wandb_csv(exp / "history_other" / "lr1e-3_r8_nnodes2_zero3_lora_8B.csv", loss_curve(0.7, steps=30), 1e-3)
    # evaluation exports: an intermediate checkpoint (ignored), the final one, and a newer batch evaluation
    (exp / "history" / "lr1e-3_r8_lora_8B_checkpoint-10_2025-01-01.csv").write_text(
        "_timestamp,mcq_4_choices/accuracy,mcq_4_choices/total\n5000,0.01,100\n")
    (exp / "history" / "lr1e-3_r8_lora_8B_checkpoint-30_2025-01-02.csv").write_text(
        "_timestamp,mcq_4_choices/accuracy\n6000,0.20\n")
    (exp / "history_other" / "grid_8B_lora_checkpoint-30_2025-01-03.csv").write_text(
        "_timestamp,lr1e-3_r8_lora_8B/mcq_4_choices/accuracy,lr1e-4_r1_full_8B/mcq_4_choices/accuracy\n"
        "7000,0.22,0.05\n")
    (exp / "history_other" / "Apertus-8B-Instruct_2025-01-01.csv").write_text(
        "_timestamp,mcq_4_choices/accuracy,mcq_8_choices/accuracy\n4000,0.27,0.17\n")
    (exp / "history_other" / "gallant-plant-6.csv").write_text("train/loss,_step\n1.0,0\n")
    (exp / "swiss_judgment_eval_results.csv").write_text(
        "name,lr,rank,model_size,method,eval_accuracy,train_loss\nlr1e-3_r8_lora_8B,0.001,8,8B,lora,0.81,0.7\n")
    (exp / "all_runs_parsed.csv").write_text("name,state\nlr1e-2_r8_lora_8B,crashed\nlr1e-3_r8_lora_8B,finished\n")

    rs = collect([exp])
    runs = {r.name: r for r in rs.runs}
    assert sorted(runs) == ["lr1e-2_r8_lora_8B", "lr1e-3_r8_lora_8B", "lr1e-3_r8_nnodes2_zero3_lora_8B",
                            "lr1e-4_r1_full_8B"]  # no checkpoint file became a training run
    r = runs["lr1e-3_r8_lora_8B"]
    assert len(r.curve) == 30 and r.status == "completed"
    assert r.evals == {"lexam_mcq4-generate": {"accuracy": 0.22}, "sjp-generate": {"accuracy": 0.81}}
    assert runs["lr1e-4_r1_full_8B"].rank is None
    bad = runs["lr1e-2_r8_lora_8B"]
    assert len(bad.curve) == 4 and math.isnan(bad.curve["loss"][2]) and bad.status == "failed"
    scaled = runs["lr1e-3_r8_nnodes2_zero3_lora_8B"]
    assert (scaled.num_nodes, scaled.strategy, scaled.config_key) == (2, "zero3", r.config_key)
    assert scaled.tokens_per_s == pytest.approx(100.0)  # 100 tokens per 1 s between first and last step
    assert rs.base_evals["8B"]["lexam_mcq4-generate"]["accuracy"] == 0.27
    assert any("gallant-plant-6" in n for n in rs.notes)


def test_mixed_inputs(tmp_path):
    exp = tmp_path / "export"
    exp.mkdir()
    _wandb_csv(exp / "lr1e-3_r8_lora_8B.csv", loss_curve(0.7, steps=30), 1e-3)  # a bare history folder
    p = write_run(tmp_path / "runs", name="mine", rank=8, lr=1e-4, losses=loss_curve(0.8))
    rs = collect([exp, tmp_path / "runs"])
    assert sorted((r.source, r.lr) for r in rs.runs) == [("lexfine", 1e-4), ("wandb", 1e-3)]
    assert p.name in {r.name for r in rs.runs}


def test_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(LexfineError, match="input not found: '.*nope'"):
        collect([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LexfineError, match="no runs found in") as e:
        collect([tmp_path / "empty"])
    assert "\n" not in str(e.value)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(LexfineError, match="is a file"):
        collect([f])
    with pytest.raises(LexfineError, match="no inputs"):
        collect([])

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "iterdir", denied)  # chmod does not stop root, so simulate the unreadable folder
    with pytest.raises(LexfineError, match="cannot read folder .*permission denied"):
        collect([tmp_path / "empty"])


def test_wandb_resumed_segment_continues_the_run(tmp_path):
    exp = tmp_path / "export"
    (exp / "history").mkdir(parents=True)
    _wandb_csv(exp / "history" / "lr1e-3_r8_lora_70B.csv", [1.0] * 30, 1e-3)
    # resumed from checkpoint 20 after a crash: steps 21..40 continue the run (the first export's 21..30 are stale)
    seg = exp / "history" / "lr1e-3_r8_lora_70B_checkpoint-20_2025-01-02.csv"
    _wandb_csv(seg, [0.5] * 40, 1e-3)
    (run,) = collect([exp]).runs
    assert run.size == "70B" and len(run.curve) == 40
    assert run.curve["loss"].tolist() == [1.0] * 20 + [0.5] * 20
