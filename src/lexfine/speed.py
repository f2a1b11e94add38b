"""Speed levers shared by training and evaluation: compiling the decoder layers in place, and undoing it.

They change how a forward is computed, never what it computes. Training-only levers (selective and adaptive
checkpointing, applying the levers a run config asks for) live in lexfine.train.speed; evaluation's compiled
scoring (lexfine.eval.loglik) uses these, so evaluation does not depend on training.

What keeps a compiled layer from recompiling while batch lengths vary (docs/performance.md, "Recompiles"):
- every size is dynamic (`dynamic=True`) and no two sizes are tied because they happen to be equal ("duck
  sizing" off): the first batch of a length-grouped run is the longest, padded to max_length, and at 4096 its
  length equals Apertus-8B's hidden size; tied to it, the length was compiled as the constant 4096 and the next
  batch recompiled;
- in training, a batch without padding gets the same explicit causal mask as a padded one (transformers passes
  None then, and `attention_mask is None` is a branch the graph is specialised on).
"""

from __future__ import annotations

import inspect

import torch


def decoder_layers(model) -> list:
    """The repeated blocks that transformers checkpoints (one per decoder layer), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_decoder_layers(model, backend: str = "inductor", causal_mask_for_unpadded: bool = True) -> int:
    """torch.compile every decoder layer in place (lazily: the first call traces it, after PEFT has injected its
    adapters). Returns the number of layers compiled. `causal_mask_for_unpadded=False` when training batches reach
    the layers without any mask (lexfine.train.speed.install_mask_free_attention): then every batch already shares the
    mask-free graph."""
    import torch._dynamo

    layers = decoder_layers(model)
    # Layers differ in constants Dynamo may guard on (layer_idx, sliding windows): allow one entry per layer and a
    # few shape variants (checkpointed or not, where the checkpoint runs inside the compiled call), instead of
    # falling back to eager after the default limit of 8.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 8 * len(layers) + 8))
    masks = CausalMasks(getattr(model, "config", None) if causal_mask_for_unpadded else None)
    for layer in layers:
        # what nn.Module.compile does (the layer calls _compiled_call_impl instead of _call_impl), with the call
        # wrapped as CompiledLayerCall says
        layer._compiled_call_impl = CompiledLayerCall(
            layer, torch.compile(layer._call_impl, backend=backend, dynamic=True), masks)
    return len(layers)


def uncompile_decoder_layers(model) -> None:
    """Back to eager layers (evaluation after training runs cached decoding, which the compiled training graphs
    were not built for)."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None


class CompiledLayerCall:
    """A compiled decoder layer's call: compiled without duck sizing (a size equal to another by chance, a batch of
    4096 tokens and a hidden size of 4096, stays its own symbol), and in training an explicit causal mask where
    transformers passed none (a batch without padding), so that padded and unpadded batches share one graph."""

    def __init__(self, layer, compiled, masks: CausalMasks):
        self.layer = layer
        self.compiled = compiled
        self.masks = masks

    def __call__(self, *args, **kwargs):
        import torch.fx.experimental._config as fx_config

        if kwargs.get("attention_mask", 0) is None and self.layer.training and torch.is_grad_enabled() \
                and kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            mask = self.masks.causal(hidden, kwargs.get("position_ids"))
            if mask is not None:
                kwargs["attention_mask"] = mask
        with fx_config.patch(use_duck_shape=False):
            return self.compiled(*args, **kwargs)


def cache_kwarg(fn) -> str:
    """The keyword under which transformers' `fn` (a model's forward, create_causal_mask) takes a KV cache: `cache`
    in newer transformers (`past_key_values` is deprecated there and warns on every call), `past_key_values` in
    5.17 and before."""
    try:
        return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def causal_sdpa(config) -> bool:
    """Whether the model attends through SDPA, causally, over the whole sequence (no sliding window, no
    bidirectional or chunked layers): then the causal mask is all the masking a right-padded row needs."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    return (c is not None and getattr(c, "_attn_implementation", None) == "sdpa" and getattr(c, "is_causal", True)
            and getattr(c, "sliding_window", None) is None
            and all(t == "full_attention" for t in (getattr(c, "layer_types", None) or ["full_attention"])))


class CausalMasks:
    """The mask transformers builds for a padded batch, built for a batch without padding (a plain causal mask, as
    `is_causal=True` computes it), for SDPA attention of a causal model without sliding windows; None otherwise.
    The last one is kept: every layer of a forward pass, and the next batch of the same shape, reuse it."""

    def __init__(self, config):
        self.config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.last = (None, None)

    def applies(self) -> bool:
        return causal_sdpa(self.config)

    def causal(self, hidden, position_ids):
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[1] < 2 or not self.applies():
            return None
        key = (hidden.shape[0], hidden.shape[1], hidden.device, None if position_ids is None else position_ids.shape)
        if self.last[0] != key:
            from transformers.masking_utils import create_causal_mask

            ones = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=ones,
                                      position_ids=position_ids, allow_is_causal_skip=False,
                                      **{cache_kwarg(create_causal_mask): None})
            self.last = (key, mask)
        return self.last[1]
