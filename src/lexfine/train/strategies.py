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


def deepspeed_config(stage: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 3:
        # Without it, saving through accelerate raises or writes an empty adapter (verified 2026-11).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_prefetch_bucket_size"] = "auto"
        zero["stage3_param_persistence_threshold"] = "auto"
        zero["reduce_bucket_size"] = "auto"
    return {**_ZERO_COMMON, "zero_optimization": zero}


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


def training_fields(strategy: str, gradient_checkpointing: bool) -> dict[str, Any]:
    """TrainingArguments fields for a strategy (none, ddp, zero2, zero3, fsdp2)."""
    require_strategy(strategy)
    if strategy in ("none", "ddp"):
        return {"ddp_find_unused_parameters": False}
    if strategy == "zero2":
        return {"deepspeed": deepspeed_config(2)}
    if strategy == "zero3":
        return {"deepspeed": deepspeed_config(3)}
    if strategy == "fsdp2":
        return fsdp2_fields()  # train.gradient_checkpointing stays transformers' own (see fsdp2_fields)
    raise ValueError(strategy)
