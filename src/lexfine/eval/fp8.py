"""FP8 scoring (`lexfine eval --fp8`): the decoder layers' linear layers run as FP8 matmuls (torchao).

Recipe: torchao's Float8DynamicActivationFloat8WeightConfig with per-row scales (one scale per output row of a
weight, one per token of an activation, both e4m3, computed on the fly). A LoRA adapter is merged into the bf16 base
first (`merge_and_unload`), so the adapter's delta is quantized with the weight it is added to: the deployed model,
in FP8. Embeddings, norms, attention and the LM head stay bf16 (the head scores only the answer positions).

Scores are approximations of the bf16 ones, never the same numbers: results go to their own folder and keys
(`eval/<task>-<mode>-fp8/`, `evals` / `base_evals` keys ending in `-fp8`) and into the score cache under a key of
their own, so `lexfine report` never pools them with bf16 scores. Use it for fast looks at large sets; the
accuracy it costs was measured on a trained model (docs/evaluation.md, "FP8 scoring").

Needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell) and torchao (`pip install torchao`, the
release built for the installed torch: 0.17 for torch 2.11); loglik mode only (generation decodes eagerly, where
per-call activation quantization is not what limits speed and the accuracy was not measured).
"""

from __future__ import annotations

import importlib.util

from lexfine.errors import ConfigError

SUFFIX = "-fp8"
ACTIVATION_FLOOR = 1e-12
RECIPE = "torchao float8 dynamic activation + weight, per-row scales, e4m3; LoRA merged first; LM head bf16"


def check(mode: str, device) -> None:
    """One-line ConfigError when `--fp8` cannot run here: another mode, no torchao, or no GPU with FP8 matmuls."""
    if mode != "loglik":
        raise ConfigError(f"--fp8 applies to loglik scoring, not mode={mode}; drop --fp8 or use --mode loglik")
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("--fp8 needs torchao: pip install torchao (the release built for your torch: "
                          "0.17 for torch 2.11), or drop --fp8")
    import torch

    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        raise ConfigError(f"--fp8 needs a CUDA GPU with FP8 matmuls (compute capability >= 8.9); this process scores "
                          f"on {dev or 'the CPU'}; drop --fp8")
    cap = torch.cuda.get_device_capability(dev)
    if cap < (8, 9):
        raise ConfigError(f"--fp8 needs compute capability >= 8.9 (Ada, Hopper or newer); "
                          f"{torch.cuda.get_device_name(dev)} has {cap[0]}.{cap[1]}; drop --fp8")


def eligible(module, name: str = "") -> bool:
    """A linear layer FP8 matmuls can take: no LoRA part (merged away before), both dimensions multiples of 16 (what
    the FP8 GEMMs need). `convert` asks only inside decoder layers, so the LM head stays bf16."""
    import torch

    return (isinstance(module, torch.nn.Linear) and "lora_" not in name
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert(model):
    """The model with its decoder layers' linear layers in FP8 (a PeftModel is merged first). Returns (model, n)."""
    from lexfine.speed import decoder_layers

    if hasattr(model, "merge_and_unload"):  # a PEFT model: the adapter goes into the weights it is quantized with
        model = model.merge_and_unload()
    n = sum(to_fp8(layer) for layer in decoder_layers(model))
    if n == 0:
        raise ConfigError("--fp8 found no linear layer to convert in this model's decoder layers; drop --fp8")
    return model, n


def to_fp8(layer) -> int:
    """Convert one decoder layer's eligible linear layers in place; returns how many."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    n = sum(eligible(m, name) for name, m in layer.named_modules())
    # activation_value_lb: a row of zeros (attention's output at a fully masked padding position) would get the scale
    # 0 and turn into NaN, which attention then spreads to the real tokens (0 weight x NaN value); 1e-12 is the
    # floor torchao's FP8 training uses.
    # set_inductor_config=False: torchao's recommended inductor settings turn on coordinate-descent tuning, minutes
    # of extra compilation for each graph; the FP8 GEMMs are cuBLAS/CUTLASS kernels either way
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), activation_value_lb=ACTIVATION_FLOOR,
                                                       set_inductor_config=False)
    quantize_(layer, config, filter_fn=eligible)
    return n


def info(n_layers: int) -> dict:
    import torchao

    return {"linear_layers": n_layers, "recipe": RECIPE, "torchao": torchao.__version__}
