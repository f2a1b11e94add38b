"""Speed levers shared by training and evaluation: compiling the decoder layers in place, and undoing it.

They change how a forward is computed, never what it computes. Training-only levers (selective and adaptive
checkpointing, applying the levers a run config asks for) live in lexfine.train.speed; evaluation's compiled
scoring (lexfine.eval.loglik) uses these, so evaluation does not depend on training.
"""

from __future__ import annotations

import torch


def decoder_layers(model) -> list:
    """The repeated blocks that transformers checkpoints (one per decoder layer), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_decoder_layers(model, backend: str = "inductor") -> int:
    """torch.compile every decoder layer in place (lazily: the first call traces it, after PEFT has injected its
    adapters). Returns the number of layers compiled."""
    import torch._dynamo

    layers = decoder_layers(model)
    # Layers differ in constants Dynamo may guard on (layer_idx, sliding windows): allow one entry per layer and a
    # few shape variants (checkpointed or not, where the checkpoint runs inside the compiled call), instead of
    # falling back to eager after the default limit of 8.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 8 * len(layers) + 8))
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


def uncompile_decoder_layers(model) -> None:
    """Back to eager layers (evaluation after training runs cached decoding, which the compiled training graphs
    were not built for)."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None
