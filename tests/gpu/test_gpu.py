"""GPU tests: skipped without CUDA (see tests/conftest.py). Run on a GPU machine with `python -m pytest tests/gpu`."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from lexfine.config import validate
from lexfine.train import run
from tests.conftest import tiny_arch

TOKENIZER = os.environ.get("LEXFINE_TEST_TOKENIZER")  # a tokenizer dir when the embedded model is not installed


def _tok_args():
    return {"tokenizer": TOKENIZER} if TOKENIZER else {}


@pytest.mark.gpu
def test_inductor_xielu_matches_reference_on_cuda():
    from transformers.activations import XIELUActivation

    from lexfine.kernels.xielu import compiled_xielu

    act = XIELUActivation(dtype=torch.bfloat16).cuda()
    x = (torch.randn(3, 1000, 512, device="cuda") * 3).to(torch.bfloat16).requires_grad_(True)
    ref = act._xielu_python(x)
    ref.float().sum().backward()
    gref = x.grad.clone()
    x.grad = None
    out = compiled_xielu("inductor")(x, act.alpha_p, act.alpha_n, act._beta_scalar, act._eps_scalar)
    out.float().sum().backward()
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.float(), gref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_optimizations_do_not_change_the_loss_trajectory(tiny_config, tmp_path):
    """Fused xIELU (inductor) on vs off: same bf16 training, same losses within bf16 tolerance."""
    common = dict(model_args={"arch_overrides": tiny_arch(),
                              "dtype": "bfloat16", **_tok_args()}, train__max_steps=6)
    on = run(validate(tiny_config(output_dir=str(tmp_path / "on"), train__fused_activation=True, **common)))
    off = run(validate(tiny_config(output_dir=str(tmp_path / "off"), train__fused_activation=False, **common)))
    a = [r["loss"] for r in on.metrics()]
    b = [r["loss"] for r in off.metrics()]
    assert a == pytest.approx(b, rel=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "full"])
def test_compiled_layers_and_selective_checkpointing_keep_the_loss_trajectory(tiny_config, tmp_path, method):
    """The GPU default (inductor-compiled decoder layers) and the shipped 8B setting (checkpointing on part of the
    layers) against the plain path: same bf16 training, same losses within bf16 tolerance."""
    common = dict(model_args={"arch_overrides": tiny_arch(),
                              "dtype": "bfloat16", **_tok_args()}, train__max_steps=6, method=method,
                  train__lr=1e-3 if method == "lora" else 1e-4, train__gradient_checkpointing=True)
    fast = run(validate(tiny_config(output_dir=str(tmp_path / "fast"), train__compile_layers=True,
                                    train__checkpoint_fraction=0.5, **common)))
    plain = run(validate(tiny_config(output_dir=str(tmp_path / "plain"), train__compile_layers=False, **common)))
    a = [r["loss"] for r in fast.metrics()]
    b = [r["loss"] for r in plain.metrics()]
    assert a == pytest.approx(b, rel=3e-2)


def _train_cli(cfg: dict, tmp_path, name: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
    res = subprocess.run([sys.executable, "-m", "lexfine.cli", "train", str(path)], capture_output=True, text=True,
                         env=env, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = res.stdout.strip().splitlines()[-1]
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if x.strip()]
    return run_dir, [r["loss"] for r in rows]


@pytest.mark.multigpu
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp2"])
def test_two_gpus_match_one_gpu_with_accumulation(tiny_config, tmp_path, strategy):
    base = tiny_config(model_args={"arch_overrides": tiny_arch(),
                                   "dtype": "float32", **_tok_args()},
                       train__group_by_length=False, train__max_steps=4)
    one = dict(base, name="one", train={**base["train"], "grad_accum": 2})
    two = dict(base, name=f"two-{strategy}", train={**base["train"], "grad_accum": 1},
               launch={"strategy": strategy, "num_processes": 2})
    _, ref = _train_cli(one, tmp_path, "one")
    run_dir, got = _train_cli(two, tmp_path, "two")
    assert got == pytest.approx(ref, rel=1e-2)
    assert os.path.isfile(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    assert manifest["adapter_check"]["modules"] == 12 and manifest["adapter_check"]["lora_B_nonzero"] == 12
