"""Speed levers that change how a step is computed, never what it computes.

- fused xIELU (Apertus's activation, lexfine.kernels.xielu);
- selective activation checkpointing: only a fraction of the decoder layers recompute their activations;
- compiled decoder layers: each layer's forward (and, through AOTAutograd, its backward) goes through torch.compile.

Each is measured in benchmarks/train_throughput.py and tested for an unchanged loss trajectory.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

log = logging.getLogger("lexfine.train")


def apply_speed_levers(cfg, model) -> tuple[list, dict]:
    """Apply the levers `cfg.train` asks for to `model` (before PEFT wraps it); returns the Trainer callbacks they
    need and what was applied (recorded in the run's manifest)."""
    import torch

    t = cfg.train
    cuda = torch.cuda.is_available()
    backend = "inductor" if cuda else "aot_eager"
    fused = 0
    if t.fused_activation:
        from lexfine.kernels.xielu import patch_xielu

        fused = patch_xielu(model, backend=backend)
    compile_layers = t.compile_layers if t.compile_layers is not None else cuda and cfg.launch.strategy in ("none", "ddp")
    if compile_layers:
        log.info("compiling %d decoder layers with torch.compile", compile_decoder_layers(model, backend=backend))
    fraction = t.checkpoint_fraction if t.gradient_checkpointing else 0.0
    callbacks = []
    if t.gradient_checkpointing and fraction < 1:
        if cfg.launch.strategy == "fsdp2":  # FSDP2's own activation checkpointing wraps every layer
            log.warning("train.checkpoint_fraction is ignored under FSDP2: every layer is checkpointed")
            fraction = 1.0
        else:
            callbacks.append(SelectiveCheckpointing(fraction))
    applied = {"fused_activation": fused > 0, "compiled_layers": bool(compile_layers), "checkpointed_fraction": fraction}
    return callbacks, applied


def decoder_layers(model) -> list:
    """The repeated blocks that transformers checkpoints (one per decoder layer), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpointed_indices(n_layers: int, fraction: float) -> set[int]:
    """round(fraction * n) layer indices, spread evenly over the stack (0 included when any)."""
    k = round(fraction * n_layers)
    return {i * n_layers // k for i in range(k)} if k else set()


class SelectiveCheckpointing(TrainerCallback):
    """The Trainer switches checkpointing on for every layer before `on_train_begin`; this keeps it on for a
    fraction of them. Works with any transformers 5.x (newer ones also offer `every_n_layers`)."""

    def __init__(self, fraction: float):
        self.fraction = fraction

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = decoder_layers(model)
        keep = checkpointed_indices(len(layers), self.fraction)
        for i, layer in enumerate(layers):
            if getattr(layer, "gradient_checkpointing", False) and i not in keep:
                layer.gradient_checkpointing = False
        log.info("activation checkpointing on %d of %d decoder layers", len(keep), len(layers))


def compile_decoder_layers(model, backend: str = "inductor") -> int:
    """torch.compile every decoder layer in place (lazily: the first call traces it, after PEFT has injected its
    adapters). Returns the number of layers compiled."""
    import torch._dynamo

    layers = decoder_layers(model)
    # Layers differ in constants Dynamo may guard on (layer_idx, sliding windows): allow one entry per layer and
    # a few shape variants, instead of falling back to eager after the default limit of 8.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 4 * len(layers) + 8))
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


def uncompile_decoder_layers(model) -> None:
    """Back to eager layers (evaluation after training runs cached decoding, which the compiled training graphs
    were not built for)."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None
