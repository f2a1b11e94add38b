"""QLoRA through the real entry points: `lexfine train ... lora.quantize=nf4` on a machine that cannot run it stops
with one line before any run directory exists; `lexfine export` of a QLoRA run merges onto the unquantized base;
with bitsandbytes installed (importorskip), a tiny checkpoint trains quantized and its adapter loads onto the base."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lexfine.config import validate
from lexfine.train import run

REPO = Path(__file__).resolve().parents[2]


def test_cli_train_quantized_without_support_is_one_line_and_leaves_no_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    if importlib.util.find_spec("bitsandbytes") is not None:
        # Where bitsandbytes is installed, shadow it with a broken copy: the unsupported path is what is tested here.
        fake = tmp_path / "fake" / "bitsandbytes"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ImportError('no bitsandbytes backend here')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(fake.parent), env["PYTHONPATH"]])
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-c", "from lexfine.cli import main; main()", "train", str(REPO / "configs/exp/quickstart.yaml"),
         "lora.quantize=nf4", f"output_dir={runs}"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: lora.quantize=nf4 needs") and "bitsandbytes" in last
    assert not runs.exists()  # refused before a run directory (or any data) was made


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """The tiny Apertus from conftest saved as a model directory (quantization needs a checkpoint to load)."""
    from tests.conftest import tiny_arch

    from lexfine import models
    from lexfine.config import ModelArgs

    tok = models.load_tokenizer("random:apertus-8b")
    model = models.load_model("random:apertus-8b", ModelArgs(arch_overrides=tiny_arch(), dtype="float32"), tok)
    path = tmp_path / "tiny-apertus"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_export_of_a_qlora_run_merges_onto_the_unquantized_base(tiny_config, tiny_checkpoint, tmp_path):
    """The adapter is trained unquantized here (no bitsandbytes needed); what is tested is that export reads a
    config with lora.quantize=nf4 and still loads and merges onto plain weights."""
    from lexfine.export import export_run

    rd = run(validate(tiny_config(model=str(tiny_checkpoint), model_args={"dtype": "float32"}, data={"limit": 8},
                                  train__max_steps=2)))
    adapter_cfg = json.loads((rd.adapter_dir / "adapter_config.json").read_text())
    tree = yaml.safe_load(rd.config_path.read_text())
    tree["lora"]["quantize"] = "nf4"
    rd.config_path.write_text(yaml.safe_dump(tree))

    out = export_run(rd.path, tmp_path / "merged")
    merged_cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in merged_cfg
    assert not any("quant" in k for k in adapter_cfg)  # nothing in the adapter ties it to a quantized base

    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert not any("lora_" in k or "absmax" in k or "quant_state" in k for k in keys)
        w = f.get_tensor(next(k for k in keys if k.endswith("q_proj.weight")))
    assert w.dtype.is_floating_point and w.dim() == 2  # a plain weight matrix, not packed 4-bit bytes


def test_qlora_trains_and_its_adapter_loads_onto_the_bf16_base(tiny_config, tiny_checkpoint):
    pytest.importorskip("bitsandbytes")
    from lexfine.quantize import bnb_devices, quantize_device

    if quantize_device().split(":")[0] not in bnb_devices():
        pytest.skip("the installed bitsandbytes does not support this device")
    import torch
    from peft import PeftModel

    from lexfine import models

    from lexfine.eval import evaluate

    cfg = validate(tiny_config(model=str(tiny_checkpoint), model_args={"dtype": "float32"},
                               lora={"r": 4, "alpha": 8, "dropout": 0.0, "quantize": "nf4"}, eval=["sjp"],
                               eval_options={"limit": 4, "max_length": 256, "batch_size": 4},
                               train__gradient_checkpointing=True))  # enabled by the Trainer, not by k-bit preparation
    rd = run(cfg)
    # the evaluation after training scored the saved adapter on the unquantized base, like `lexfine eval RUN`
    after = [json.loads(x) for x in (rd.eval_dir("sjp", "loglik") / "predictions.jsonl").read_text().splitlines()]
    evaluate(rd.path, "sjp", limit=4, max_length=256, batch_size=4, out=rd.path / "re", use_cache=False)
    again = [json.loads(x) for x in (rd.path / "re" / "eval" / "sjp-loglik" / "predictions.jsonl").read_text().splitlines()]
    for a, b in zip(after, again, strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    m = rd.manifest()
    assert m["status"] == "completed" and m["adapter_check"]["lora_B_nonzero"] > 0
    unquantized = models.count_parameters(models.load_model(str(tiny_checkpoint), cfg.model_args))
    assert m["parameters"]["total"] == unquantized["total"] + m["parameters"]["trainable"]  # 4-bit counted unpacked
    assert "quant" not in (rd.adapter_dir / "adapter_config.json").read_text()
    base = models.load_model(str(tiny_checkpoint), cfg.model_args, dtype=torch.bfloat16)
    peft = PeftModel.from_pretrained(base, str(rd.adapter_dir))
    q = peft.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q.base_layer).__name__ == "Linear" and q.base_layer.weight.dtype == torch.bfloat16
    assert q.lora_B["default"].weight.abs().sum() > 0


def test_a_random_architecture_trains_quantized_without_being_built_in_bf16(tiny_config):
    """model=random:<arch> with lora.quantize=nf4: the decoder layers are built one at a time and quantized at once
    (the 70B case: 140 GB in bf16 never exists); every decoder linear is 4-bit, the same seed gives the same 4-bit
    weights, and the run trains and saves a normal adapter."""
    pytest.importorskip("bitsandbytes")
    from lexfine.quantize import bnb_devices, build_random_quantized, quantize_device

    if quantize_device().split(":")[0] not in bnb_devices():
        pytest.skip("the installed bitsandbytes does not support this device")
    import bitsandbytes as bnb
    import torch

    from lexfine import models
    from tests.conftest import tiny_arch

    tok = models.load_tokenizer("random:apertus-8b")
    cfg = validate(tiny_config(model="random:apertus-8b", model_args={"arch_overrides": tiny_arch()},
                               lora={"r": 4, "alpha": 8, "dropout": 0.0, "quantize": "nf4"}, eval=[],
                               train__max_steps=2))
    arch = models.architecture_config(models.resolve("random:apertus-8b"), cfg.model_args, len(tok))
    a, b = (build_random_quantized(arch, "nf4", "cpu") for _ in range(2))
    linears = [m for m in a.model.layers.modules() if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit))]
    assert len(a.model.layers) == tiny_arch()["num_hidden_layers"] and linears
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in linears)  # nothing left unquantized in the layers
    assert torch.equal(a.model.layers[-1].mlp.down_proj.weight.data, b.model.layers[-1].mlp.down_proj.weight.data)
    assert a.is_loaded_in_4bit and a.config.num_hidden_layers == tiny_arch()["num_hidden_layers"]

    rd = run(cfg)
    m = rd.manifest()
    assert m["status"] == "completed" and m["adapter_check"]["lora_B_nonzero"] > 0
    losses = [r["loss"] for r in map(json.loads, rd.metrics_path.read_text().splitlines()) if "loss" in r]
    assert losses and all(x == x for x in losses)  # finite, not NaN
    assert "quant" not in (rd.adapter_dir / "adapter_config.json").read_text()
