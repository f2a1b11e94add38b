"""GPU tests: skipped without CUDA (see tests/conftest.py). Run on a GPU machine with `python -m pytest tests/gpu`."""

import os

import pytest
import torch

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


@pytest.mark.gpu
def test_mask_free_attention_keeps_the_loss_trajectory_on_cuda(tiny_config, tmp_path):
    """Mask-free attention (SDPA's flash kernel, is_causal) against the padding mask (memory-efficient kernel), both
    through inductor-compiled layers: same bf16 training, same losses within bf16 tolerance."""
    common = dict(model_args={"arch_overrides": tiny_arch(), "dtype": "bfloat16", **_tok_args()},
                  train__max_steps=6, train__batch_size=4, train__compile_layers=True,
                  train__gradient_checkpointing=True, train__checkpoint_fraction=0.5)
    free = run(validate(tiny_config(output_dir=str(tmp_path / "free"), **common)))
    masked = run(validate(tiny_config(output_dir=str(tmp_path / "masked"), train__mask_free_attention=False,
                                      **common)))
    assert free.manifest()["speed"]["mask_free_attention"] is True
    assert masked.manifest()["speed"]["mask_free_attention"] is False
    assert free.manifest()["speed"]["cudnn_attention"] is False  # mask-free batches train with the flash kernel
    assert free.manifest()["speed"]["compile_cache"] == os.environ["TORCHINDUCTOR_CACHE_DIR"]  # inductor's folder
    a = [r["loss"] for r in free.metrics()]
    b = [r["loss"] for r in masked.metrics()]
    assert a == pytest.approx(b, rel=3e-2)


@pytest.mark.gpu
def test_a_random_architecture_trains_quantized_on_cuda(tiny_config):
    """model=random:<arch> lora.quantize=nf4 on a GPU: the layers are built and quantized on the device (what makes
    the 70B fit one GPU), and a few steps train a non-zero adapter with finite losses."""
    pytest.importorskip("bitsandbytes")
    import json

    import bitsandbytes as bnb

    from lexfine import models
    from lexfine.quantize import build_random_quantized

    tok = models.load_tokenizer("random:apertus-8b", models.ModelArgs(**_tok_args()))
    cfg = validate(tiny_config(model="random:apertus-8b", model_args={"arch_overrides": tiny_arch(), **_tok_args()},
                               lora={"r": 4, "alpha": 8, "dropout": 0.0, "quantize": "nf4"}, eval=[],
                               train__max_steps=3, train__compile_layers=False))
    arch = models.architecture_config(models.resolve("random:apertus-8b"), cfg.model_args, len(tok))
    m = build_random_quantized(arch, "nf4", "cuda:0")
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.device.type == "cuda" and q.weight.bnb_quantized
    rd = run(cfg)
    man = rd.manifest()
    assert man["status"] == "completed" and man["adapter_check"]["lora_B_nonzero"] > 0
    losses = [r["loss"] for r in map(json.loads, rd.metrics_path.read_text().splitlines()) if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.gpu
def test_fp8_scores_are_close_to_bf16_on_cuda(tmp_path):
    """`lexfine eval --fp8` on a GPU with FP8 matmuls (compute capability >= 8.9, torchao installed): the decoder's
    linear layers really are FP8 tensors, and the candidates' log-likelihoods stay near the bf16 ones."""
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 matmuls on this GPU")
    from lexfine.config import ModelArgs
    from lexfine.eval import fp8
    from lexfine.eval.runner import evaluate
    from lexfine.eval.target import load, resolve_target

    arch = {**tiny_arch(), "hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
    tgt = resolve_target("random:apertus-8b", model_args=ModelArgs(arch_overrides=arch, dtype="bfloat16",
                                                                    **_tok_args()))
    model, _ = load(tgt, device="cuda")
    model, n = fp8.convert(model)
    assert n == 2 * 6 and "Float8" in type(model.model.layers[0].self_attn.q_proj.weight).__name__
    common = dict(data="bundled:sjp_fr_heldout", limit=24, use_cache=False, progress=False)
    ref = evaluate(tgt, "sjp", out=tmp_path / "bf16", **common)
    low = evaluate(tgt, "sjp", out=tmp_path / "fp8", fp8=True, **common)
    assert low["settings"]["fp8"]["linear_layers"] == 12 and ref["settings"]["fp8"] is None
    assert low["summary_path"].endswith("sjp-loglik-fp8/summary.json")
    import json
    from pathlib import Path

    rows = [[json.loads(x) for x in (Path(s["summary_path"]).parent / "predictions.jsonl").read_text().splitlines()]
            for s in (ref, low)]
    a = [v for r in rows[0] for v in r["scores"].values()]
    b = [v for r in rows[1] for v in r["scores"].values()]
    assert len(a) == len(b) == 48
    mean_abs = sum(map(abs, a)) / len(a)
    assert None not in b  # null is how a non-finite score is stored
    assert sum(abs(x - y) for x, y in zip(a, b)) / len(a) < 0.01 * mean_abs
