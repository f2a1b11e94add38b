"""QLoRA: the frozen base model loaded in 4-bit (nf4/fp4) or 8-bit (int8) by bitsandbytes, LoRA adapters on top.

Where each check happens, so that a run that cannot work stops before any data is read:
  config_problem   at config validation (method, launch.strategy): no run directory is made
  check_runtime    at the top of `lexfine train` (bitsandbytes installed, a device it supports)
  load_quantized   while loading the model: from_pretrained with a BitsAndBytesConfig, then PEFT's k-bit preparation

Saving is unchanged: PEFT saves only the adapter weights and an adapter_config.json without quantization settings,
so the adapter loads onto the bf16 base; `lexfine export` and `lexfine eval` load the base unquantized.
"""

from __future__ import annotations

import importlib.util
import os

from lexfine.errors import ModelError

FOUR_BIT = ("nf4", "fp4")


def config_problem(cfg) -> str | None:
    """Why `cfg` cannot be quantized (one line naming the option and the fix), or None."""
    q = cfg.lora.quantize
    if q == "none":
        return None
    if cfg.method != "lora":
        return (f"lora.quantize={q} needs method=lora (a quantized base cannot be trained itself); "
                "set method=lora or lora.quantize=none")
    if cfg.launch.strategy in ("zero3", "fsdp2"):
        # Sharding 4-bit weights needs bnb_4bit_quant_storage matching the sharded dtype and a different
        # save path; none of it is built or tested here, so refuse rather than train something unverified.
        return (f"lora.quantize={q} is not supported with launch.strategy={cfg.launch.strategy} (sharding quantized "
                "weights needs bnb_4bit_quant_storage, not built); use launch.strategy=none, ddp or zero2 — a 4-bit "
                "base is small enough to be replicated")
    if cfg.model.startswith("random:") and cfg.eval:
        # evaluation scores the adapter on the unquantized base, and random:<arch> in bf16 has other weights than
        # the ones build_random_quantized drew: the scores would belong to no model
        return (f"lora.quantize={q} with model={cfg.model!r} is for speed and memory measurements: its random 4-bit "
                "weights are not those of the bf16 random model that evaluation would score the adapter on; "
                "set eval=[]")
    return None


def bnb_config(quantize: str):
    """The transformers BitsAndBytesConfig for lora.quantize (None for none)."""
    if quantize == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if quantize in FOUR_BIT:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(quantize)


def quantize_device() -> str:
    """The device the quantized base goes to: this process's GPU, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def check_runtime(cfg) -> None:
    """One-line ModelError when this machine cannot train `cfg` quantized: bitsandbytes missing, or it does not
    support the device (it trains 4-bit and 8-bit on CUDA; on a CPU too in recent versions, 0.50 verified)."""
    q = cfg.lora.quantize
    if q == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"lora.quantize={q} needs bitsandbytes: pip install bitsandbytes "
                         "(or set lora.quantize=none)")
    device = quantize_device().split(":")[0]
    supported = bnb_devices(f"lora.quantize={q}")
    if device not in supported:
        raise ModelError(f"lora.quantize={q} needs a CUDA GPU: the installed bitsandbytes does not support {device!r} "
                         f"(supports: {', '.join(sorted(supported)) or 'none'}); run on a GPU or set lora.quantize=none")


def bnb_devices(option: str = "lora.quantize") -> set[str]:
    try:
        import bitsandbytes as bnb
    except Exception as e:  # a broken install (a CUDA library mismatch) fails here, not at find_spec
        raise ModelError(f"{option} needs a working bitsandbytes, but importing it failed: "
                         f"{' '.join(str(e).split())[:200]}; reinstall it (pip install -U bitsandbytes)") from None

    # Older bitsandbytes had no CPU backend and no `supported_torch_devices`: CUDA only.
    return set(getattr(bnb, "supported_torch_devices", None) or {"cuda"})


def load_quantized(spec, cfg, tokenizer):
    """Load the base quantized on this process's device and prepare it for k-bit training (frozen base, norms and
    embeddings in fp32). The caller wraps it with LoRA (TRL's SFTTrainer does, given a peft_config)."""
    import torch
    from peft import prepare_model_for_kbit_training

    from lexfine import models

    check_runtime(cfg)
    spec = models.resolve(spec) if isinstance(spec, str) else spec
    if spec.is_random:  # built quantized, one decoder layer at a time: never whole in bf16
        config = models.architecture_config(spec, cfg.model_args, len(tokenizer) if tokenizer is not None else None)
        model = build_random_quantized(config, cfg.lora.quantize, quantize_device(), cfg.model_args.attn_implementation)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # The weights arrive in bf16 and are quantized on the device; what stays unquantized is upcast to fp32 below.
    dtype = torch.bfloat16 if cfg.model_args.dtype == "auto" else None
    model = models.load_model(spec, cfg.model_args, tokenizer=tokenizer, dtype=dtype,
                              quantization_config=bnb_config(cfg.lora.quantize), device_map={"": quantize_device()})
    # TRL 1.16 does not call prepare_model_for_kbit_training itself (it only casts the adapters to bf16 for a
    # quantized model and enables input gradients under checkpointing). Checkpointing is left to the Trainer
    # (SFTConfig.gradient_checkpointing, use_reentrant=False): enabling it here too would do it twice.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def build_random_quantized(config, quantize: str, device: str, attn_implementation: str | None = None):
    """A `random:` architecture with its decoder layers' linear weights quantized as lora.quantize says, built one
    layer at a time on `device`: a layer is made in bf16, its nn.Linear weights are drawn from N(0,
    initializer_range) with a generator seeded by models.RANDOM_INIT_SEED and quantized (bitsandbytes), and only
    then is the next layer made. So the 70B (140 GB in bf16) never exists unquantized: peak memory is the 4-bit
    layers so far + one bf16 layer (~1.7 GB) + embeddings and lm_head. The embeddings, norms and lm_head stay bf16,
    as in a checkpoint quantized by transformers (lm_head is not converted there either).

    These weights are not those of the unquantized `random:<arch>` (other draws): a run trained on them is for speed
    and memory measurements; its adapter scored on the bf16 random model measures nothing."""
    import copy
    import importlib

    import bitsandbytes as bnb
    import torch
    from torch import nn

    from lexfine import models

    n_layers = config.num_hidden_layers
    shell = copy.deepcopy(config)
    shell.num_hidden_layers = 0  # embeddings, final norm, rotary embedding and lm_head only
    model = models._build_random(shell, torch.bfloat16, device, attn_implementation)
    model.config.num_hidden_layers = n_layers  # the layers below are built from the model's own config
    layer_name = next(n for n in sorted(model._no_split_modules) if n.endswith("DecoderLayer"))
    layer_cls = getattr(importlib.import_module(type(model).__module__), layer_name)
    gen = torch.Generator(device=device).manual_seed(models.RANDOM_INIT_SEED)
    std = getattr(config, "initializer_range", 0.02)
    for i in range(n_layers):
        with torch.device(device):
            layer = layer_cls(model.config, i).to(torch.bfloat16)
        for name, lin in [(n, m) for n, m in layer.named_modules() if type(m) is nn.Linear]:
            weight = torch.empty(lin.out_features, lin.in_features, dtype=torch.bfloat16, device=device)
            weight.normal_(0.0, std, generator=gen)
            layer.set_submodule(name, _quantized_linear(bnb, lin, weight, quantize, device))
            del weight
        model.model.layers.append(layer)
    setattr(model, "is_loaded_in_8bit" if quantize == "int8" else "is_loaded_in_4bit", True)
    model.config.quantization_config = bnb_config(quantize).to_dict()
    model.config._name_or_path = ""  # as for any random: model: no base path to record
    return model


def _quantized_linear(bnb, lin, weight, quantize: str, device: str):
    import torch
    from torch import nn

    bias = lin.bias is not None
    if quantize in FOUR_BIT:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type=quantize, device="meta")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type=quantize,
                                     module=q).to(device)  # .to() quantizes
    else:
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False, threshold=6.0,
                                device="meta")
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
    if bias:
        q.bias = nn.Parameter(lin.bias.detach().to(device), requires_grad=False)
    return q


def release_trainer_model(trainer) -> None:
    """Drop the trainer's references to the quantized model and its optimizer so that evaluation can load the bf16
    base in the memory they held."""
    import gc

    import torch

    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
