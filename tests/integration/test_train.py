"""Real training through TRL on a CPU: a tiny Apertus (real architecture code) and the embedded SmolLM2."""

import json
import os
import signal
import subprocess
import sys

import pytest

from lexfine.config import validate
from lexfine.rundir import RunDir
from lexfine.train import run


def losses(rd: RunDir) -> list[float]:
    return [r["loss"] for r in rd.metrics()]


def test_lora_run_directory_is_complete(tiny_config):
    rd = run(validate(tiny_config()))
    m = rd.manifest()
    assert m["status"] == "completed" and m["steps"] == 4
    assert m["data"]["examples"] == 24 and "truncated" in m["data"]
    assert m["parameters"]["trainable"] < m["parameters"]["total"]
    rows = rd.metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["num_tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[-1]["num_tokens"] > rows[0]["num_tokens"]
    assert (rd.adapter_dir / "adapter_model.safetensors").is_file()
    assert m["adapter_check"] == {"modules": 2 * 6, "lora_B_nonzero": 2 * 6}  # 2 layers x q,k,v,o,up,down
    assert (rd.adapter_dir / "tokenizer_config.json").is_file()
    assert not rd.checkpoints.exists()  # deleted after success unless train.keep_checkpoints
    cfg = json.loads(json.dumps(__import__("yaml").safe_load(rd.config_path.read_text())))
    assert cfg["data"]["loss_on"] == "answer"


def test_adapter_covers_all_linear_layers_and_is_trained(tiny_config):
    from safetensors.torch import load_file

    rd = run(validate(tiny_config()))
    tensors = load_file(rd.adapter_dir / "adapter_model.safetensors")
    modules = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"} <= modules
    # lora_B starts at zero: non-zero means it was trained and saved
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)


def test_completed_run_is_skipped(tiny_config):
    cfg = validate(tiny_config())
    rd = run(cfg)
    before = rd.metrics_path.read_text()
    run(cfg)
    assert rd.metrics_path.read_text() == before


def test_full_finetune_saves_weights(tiny_config):
    rd = run(validate(tiny_config(method="full", train__lr=1e-4)))
    assert rd.manifest()["status"] == "completed"
    assert (rd.model_dir / "config.json").is_file()
    assert list(rd.model_dir.glob("*.safetensors"))


def test_preempted_run_resumes_to_the_same_trajectory(tiny_config, monkeypatch, tmp_path):
    from lexfine.train import callbacks

    reference = run(validate(tiny_config(output_dir=str(tmp_path / "ref"))))

    cfg = validate(tiny_config(train__keep_checkpoints=True))
    original = callbacks.MetricsCallback.on_log

    def signal_at_step_2(self, args, state, control, logs=None, **kw):
        original(self, args, state, control, logs=logs, **kw)
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(callbacks.MetricsCallback, "on_log", signal_at_step_2)
    rd = run(cfg)
    assert rd.status == "interrupted"
    assert rd.latest_checkpoint().name == "checkpoint-3"
    assert not rd.adapter_dir.exists()
    m = rd.manifest()
    assert m["stopped_at_step"] == 3 and "peak_gpu_memory_gib" in m  # how far it got (no GPU here: null)

    monkeypatch.setattr(callbacks.MetricsCallback, "on_log", original)
    rd = run(cfg)
    assert rd.status == "completed" and rd.manifest()["resumed_from"] == "checkpoint-3"
    assert rd.manifest()["steps"] == 4 and rd.manifest()["stopped_at_step"] == 3
    assert [r["step"] for r in rd.metrics()] == [1, 2, 3, 4]
    assert losses(rd) == pytest.approx(losses(reference), rel=1e-4)
    assert [r["num_tokens"] for r in rd.metrics()] == [r["num_tokens"] for r in reference.metrics()]


def test_failure_marks_run_failed(tiny_config):
    cfg = validate(tiny_config(lora__target_modules=["q_prj"]))
    with pytest.raises(Exception, match="q_prj"):
        run(cfg)
    m = RunDir(cfg.run_dir()).manifest()
    assert m["status"] == "failed" and "q_prj" in m["error"]


def test_embedded_smollm2_lora_learns(tmp_path):
    """Two steps on the real model through the real CLI: the loss is that of a real LM, not of a random one."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "lexfine.cli", "train", "src/lexfine/configs/quickstart.yaml", "train.max_steps=2",
           "data.limit=8", "train.batch_size=2", "eval=[]", f"output_dir={out}"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(__file__) + "/../..", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rd = RunDir(res.stdout.strip().splitlines()[-1])
    assert rd.status == "completed"
    assert 0 < losses(rd)[0] < 5  # a random 49k-vocab model would start near ln(49152) = 10.8


def test_bad_config_is_one_line_error(tmp_path):
    cmd = [sys.executable, "-m", "lexfine.cli", "train", "src/lexfine/configs/quickstart.yaml", "lora.rr=8"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(__file__) + "/../..", timeout=120)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "lora.rr" in lines[0] and "Traceback" not in res.stderr


def test_failed_evaluation_leaves_the_run_completed(tiny_config, monkeypatch):
    import lexfine.eval

    def broken(*a, **kw):
        raise RuntimeError("scoring exploded")

    monkeypatch.setattr(lexfine.eval, "run_configured_evals", broken)
    cfg = validate(tiny_config(eval=["sjp"]))
    with pytest.raises(Exception, match="scoring exploded"):
        run(cfg)
    m = RunDir(cfg.run_dir()).manifest()
    assert m["status"] == "completed" and "scoring exploded" in m["eval_error"]


def test_fused_activation_keeps_the_loss_trajectory(tiny_config, tmp_path):
    """The fused xIELU is on by default; switching it off must not change what is learned."""
    on = run(validate(tiny_config(output_dir=str(tmp_path / "on"), train__fused_activation=True)))
    off = run(validate(tiny_config(output_dir=str(tmp_path / "off"), train__fused_activation=False)))
    assert losses(on) == pytest.approx(losses(off), rel=1e-4)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_activation_checkpointing_trains_the_same(tiny_config, tmp_path, method):
    """The default GPU path recomputes activations; it must learn exactly what the stored-activation path learns
    (with LoRA the inputs need requires_grad for checkpointed blocks to back-propagate at all)."""
    over = dict(method=method, train__lr=1e-3 if method == "lora" else 1e-4, train__max_steps=3)
    on = run(validate(tiny_config(output_dir=str(tmp_path / "on"), train__gradient_checkpointing=True, **over)))
    off = run(validate(tiny_config(output_dir=str(tmp_path / "off"), train__gradient_checkpointing=False, **over)))
    assert on.manifest()["status"] == "completed"
    assert losses(on) == pytest.approx(losses(off), rel=1e-4)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_speed_levers_keep_the_loss_trajectory(tiny_config, tmp_path, method):
    """Compiled decoder layers + checkpointing on half the layers learn what the plain path learns."""
    over = dict(method=method, train__lr=1e-3 if method == "lora" else 1e-4, train__max_steps=3)
    evals = dict(eval=["sjp"], eval_options={"limit": 6, "max_length": 256, "batch_size": 3})
    fast = run(validate(tiny_config(output_dir=str(tmp_path / "fast"), train__gradient_checkpointing=True,
                                    train__checkpoint_fraction=0.5, train__compile_layers=True, **over, **evals)))
    plain = run(validate(tiny_config(output_dir=str(tmp_path / "plain"), **over, **evals)))
    assert losses(fast) == pytest.approx(losses(plain), rel=1e-4)
    # the evaluation right after training (eager again, cached decoding) scores both models alike
    scores = [json.loads((rd.eval_dir("sjp", "loglik") / "summary.json").read_text()) for rd in (fast, plain)]
    assert scores[0]["n"] == 6 and scores[0]["accuracy"] == scores[1]["accuracy"]
    assert fast.manifest()["speed"] == {"fused_activation": True, "compiled_layers": True, "checkpointed_fraction": 0.5,
                                          "adaptive_checkpointing": True, "pad_to_multiple_of": 8,
                                          "mask_free_attention": True, "cudnn_attention": None,  # None: a CPU
                                          "compile_cache": None}  # aot_eager on a CPU: no inductor cache
    assert plain.manifest()["speed"]["compiled_layers"] is False  # CPU: auto = off
    assert plain.manifest()["speed"]["checkpointed_fraction"] == 0.0
    assert plain.manifest()["speed"]["pad_to_multiple_of"] is None  # not compiled: padded to the longest only


def test_mask_free_attention_keeps_the_loss_trajectory(tiny_config, tmp_path):
    """On by default (SDPA): training without the padding mask learns what training with it learns."""
    over = dict(train__max_steps=3, train__batch_size=3)
    free = run(validate(tiny_config(output_dir=str(tmp_path / "free"), **over)))
    masked = run(validate(tiny_config(output_dir=str(tmp_path / "masked"), train__mask_free_attention=False, **over)))
    assert free.manifest()["speed"]["mask_free_attention"] is True
    assert masked.manifest()["speed"]["mask_free_attention"] is False
    assert free.path.name == masked.path.name  # a speed knob: the same run id
    assert losses(free) == pytest.approx(losses(masked), rel=1e-5)


def test_peak_memory_of_a_resumed_run_is_the_highest_of_its_processes(tmp_path, monkeypatch):
    import torch

    from lexfine.train.sft import peak_gpu_gib

    rd = RunDir(tmp_path / "r")
    rd.create("name: r\n", "r")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 10 * 2**30)
    assert peak_gpu_gib(rd) == 10.0  # first process
    rd.update_manifest(peak_gpu_memory_gib=12.5)
    assert peak_gpu_gib(rd) == 12.5  # the stopped process peaked higher
    rd.update_manifest(peak_gpu_memory_gib=8.0)
    assert peak_gpu_gib(rd) == 10.0
