"""Distributed strategies as TrainingArguments fields.

The strategy lives in the run config, not in the launcher: `accelerate launch`, `torchrun` or `srun` only start
processes, and the Trainer builds DeepSpeed / FSDP2 from these fields. One place decides how a run is sharded,
so a sweep, a SLURM job and a local run of the same config train the same way.
"""

from __future__ import annotations

from typing import Any

# "auto" values are filled in by transformers from the TrainingArguments (batch size, lr, clipping, bf16 ...).
_ZERO_COMMON: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
}


def zero_autocast(strategy: str, method: str, bf16: bool) -> bool:
    """Full fine-tuning in bf16 under ZeRO-2/3 computes through DeepSpeed's `torch_autocast`, not its `bf16` mode.

    Under its bf16 mode DeepSpeed casts the model to bf16, keeps an fp32 copy in its optimizer and saves bf16 weights.
    There full fine-tuning trained another trajectory than the same config on one GPU, DDP or FSDP2
    (docs/performance.md, "Multi-GPU correctness": a 0.9B Apertus at lr 1e-5 on 2 H200s, loss 8.26 at step 3 against
    3.42; reproduced with 2 CPU processes), with the same gradient norms: the updates barely reached the computation.
    `torch_autocast` keeps the fp32 weights and runs the forward pass under torch.autocast, as one GPU and DDP do,
    and ZeRO then gives the one-process losses (tests/integration/test_distributed_cpu.py). LoRA keeps DeepSpeed's
    bf16 mode: its frozen base is bf16 anyway, and its runs agreed with one GPU's within 4e-4 in the same
    measurement."""
    return bf16 and method == "full" and strategy in ("zero2", "zero3")


def deepspeed_config(stage: int, autocast: bool = False) -> dict[str, Any]:
    """A ZeRO config; `autocast`: bf16 compute through torch.autocast on fp32 weights (zero_autocast)."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 3:
        # Without it, saving through accelerate raises or writes an empty adapter (verified 2026-11).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_prefetch_bucket_size"] = "auto"
        zero["stage3_param_persistence_threshold"] = "auto"
        zero["reduce_bucket_size"] = "auto"
    config = {**_ZERO_COMMON, "zero_optimization": zero}
    if autocast:  # the TrainingArguments' bf16 is off then (build_args), so "auto" resolves to off as well
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


def autocast_by_deepspeed(args) -> bool:
    """Whether these TrainingArguments leave bf16 autocast to DeepSpeed (zero_autocast): the Trainer's accelerator
    then casts nothing, and code that runs the model outside DeepSpeed's forward (eval_during) must cast itself."""
    ds = getattr(args, "deepspeed", None)
    return isinstance(ds, dict) and bool(ds.get("torch_autocast", {}).get("enabled"))


def precision(args) -> str:
    """How TrainingArguments make a run compute, for its manifest: runs that compute differently are not the same
    experiment."""
    if autocast_by_deepspeed(args):
        return "bf16 autocast (DeepSpeed torch_autocast)"
    if args.bf16:
        return "bf16 (DeepSpeed bf16 mode: bf16 weights)" if args.deepspeed else "bf16 autocast"
    return "fp32"


def fsdp2_fields() -> dict[str, Any]:
    """FSDP2 (one shard per decoder layer, full state dict on save). Activation checkpointing is transformers' own
    (train.gradient_checkpointing, inside each layer's call), never FSDP's `activation_checkpointing`: that one wraps
    every layer in a CheckpointWrapper, whose `_checkpoint_wrapped_module.` names PEFT 0.21 (which finds the adapter
    keys from the module names) cannot match against the unwrapped full state dict, so every LoRA adapter was saved
    empty (reproduced with 2 gloo processes, tests/integration/test_distributed_cpu.py)."""
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
            "cpu_ram_efficient_loading": False,
            "activation_checkpointing": False,
        },
    }


def require_strategy(strategy: str) -> None:
    """One-line error when the strategy's library is missing (checked before any process starts)."""
    import importlib.util

    if strategy in ("zero2", "zero3") and importlib.util.find_spec("deepspeed") is None:
        from lexfine.errors import ConfigError

        raise ConfigError(f"launch.strategy={strategy} needs DeepSpeed: pip install 'lexfine[deepspeed]' "
                          "(or use launch.strategy=ddp or fsdp2)")


def training_fields(strategy: str, gradient_checkpointing: bool, autocast: bool = False) -> dict[str, Any]:
    """TrainingArguments fields for a strategy (none, ddp, zero2, zero3, fsdp2); `autocast`: see zero_autocast."""
    require_strategy(strategy)
    if strategy in ("none", "ddp"):
        return {"ddp_find_unused_parameters": False}
    if strategy == "zero2":
        return {"deepspeed": deepspeed_config(2, autocast)}
    if strategy == "zero3":
        return {"deepspeed": deepspeed_config(3, autocast)}
    if strategy == "fsdp2":
        return fsdp2_fields()  # train.gradient_checkpointing stays transformers' own (see fsdp2_fields)
    raise ValueError(strategy)
