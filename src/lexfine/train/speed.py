"""Speed levers that change how a step is computed, never what it computes.

- fused xIELU (Apertus's activation, lexfine.kernels.xielu);
- selective activation checkpointing: only a fraction of the decoder layers recompute their activations, and a batch
  with fewer tokens than a full one recomputes proportionally fewer (adaptive checkpointing);
- compiled decoder layers: each layer's forward (and, through AOTAutograd, its backward) goes through torch.compile
  (lexfine.speed, shared with evaluation);
- mask-free attention: a right-padded training batch reaches SDPA without a padding mask. Causal attention alone
  already keeps every real token from seeing the padding after it, so the real tokens' outputs and the loss are
  those of the masked batch, while SDPA can run its flash kernel (upper triangle skipped, K/V heads shared instead
  of repeated) instead of the memory-efficient kernel over a materialised [B, 1, T, T] mask. Evaluation's default
  scoring does the same (lexfine.eval.loglik, "cached");
- flash attention instead of cuDNN's (train.cudnn_attention): the same exact attention with far less host time per
  call, which is what a LoRA step on one GPU waits for.

Each is measured (benchmarks/train_throughput.py, or `lexfine train` itself: docs/performance.md) and tested for
an unchanged loss trajectory.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from transformers import TrainerCallback

from lexfine import compile_cache
from lexfine.errors import DataError
from lexfine.speed import causal_sdpa, compile_decoder_layers, decoder_layers

log = logging.getLogger("lexfine.train")


def apply_speed_levers(cfg, model) -> tuple[list, dict]:
    """Apply the levers `cfg.train` asks for to `model` (before PEFT wraps it); returns the Trainer callbacks they
    need and what was applied (recorded in the run's manifest)."""
    t = cfg.train
    cuda = torch.cuda.is_available()
    backend = "inductor" if cuda else "aot_eager"
    fused = 0
    if t.fused_activation:
        from lexfine.kernels.xielu import patch_xielu

        fused = patch_xielu(model, backend=backend)
    compile_layers = compiles_layers(cfg)
    mask_free = mask_free_attention(cfg, model)
    cudnn = cudnn_attention(cfg, mask_free)
    if mask_free:
        install_mask_free_attention(model)
    if compile_layers:
        log.info("compiling %d decoder layers with torch.compile",
                 compile_decoder_layers(model, backend=backend, causal_mask_for_unpadded=not mask_free))
    fraction = t.checkpoint_fraction if t.gradient_checkpointing else 0.0
    # ZeRO-3 prefetches parameters in the module order it traced; checkpointing other layers from step to step
    # would change that order every step (and invalidate the trace), so there the same layers recompute each step.
    adaptive = t.adaptive_checkpointing and 0 < fraction < 1 and cfg.launch.strategy in ("none", "ddp", "zero2")
    callbacks = []
    if t.gradient_checkpointing and fraction < 1:
        if cfg.launch.strategy == "fsdp2":  # a fraction is not measured under FSDP2 (memory of sharded runs)
            log.warning("train.checkpoint_fraction is ignored under FSDP2: every layer is checkpointed")
            fraction = 1.0
        else:
            callbacks.append(SelectiveCheckpointing(fraction, full_batch_tokens=t.batch_size * t.max_length
                                                    if adaptive else None, compiled=bool(compile_layers)))
    applied = {"fused_activation": fused > 0, "compiled_layers": bool(compile_layers), "checkpointed_fraction": fraction,
               "adaptive_checkpointing": adaptive, "pad_to_multiple_of": pad_to_multiple_of(cfg),
               "mask_free_attention": mask_free,
               "cudnn_attention": (torch.backends.cuda.cudnn_sdp_enabled() if cudnn is None else cudnn) if cuda else None,
               "compile_cache": compile_cache.in_use() if cuda and (compile_layers or fused) else None}  # inductor's
    return callbacks, applied


@contextmanager
def attention_kernels(applied: dict):
    """Training's SDPA kernel choice (`applied["cudnn_attention"]` from apply_speed_levers), then PyTorch's setting as
    it was: evaluation after training scores with the kernels `lexfine eval` uses. Entered before the first forward,
    since compiled layers hold the kernel chosen when they were traced. Evaluation during training runs inside it.

    The choice is also written into torch.compile's cache key tag: the compile caches on disk (inductor's FX graph
    and AOTAutograd caches, which outlive a run) key a layer by its traced graph, where the kernel is chosen only
    later, so a layer compiled with the other choice could otherwise be loaded."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    choice = applied.get("cudnn_attention")
    cconfig = getattr(torch.compiler, "config", None)
    tag_before = getattr(cconfig, "cache_key_tag", None)
    if choice is not None:
        torch.backends.cuda.enable_cudnn_sdp(bool(choice))
        if tag_before is not None:
            cconfig.cache_key_tag = f"{tag_before}|lexfine-cudnn-sdpa={int(bool(choice))}"
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
        if tag_before is not None:
            cconfig.cache_key_tag = tag_before


def cudnn_attention(cfg, mask_free: bool) -> bool | None:
    """Whether SDPA may pick its cuDNN kernels in training: train.cudnn_attention, or (null) not where batches reach
    attention mask-free. There the flash kernel runs instead: cuDNN's costs ~2 ms of host time per call as lengths
    change (the profile in docs/performance.md), a third of a steady step on an H200. None: PyTorch's choice."""
    if cfg.train.cudnn_attention is not None:
        return cfg.train.cudnn_attention
    return False if mask_free else None


def mask_free_attention(cfg, model) -> bool:
    """Whether training batches reach attention without their padding mask: train.mask_free_attention, or (null)
    wherever it is exact: SDPA, causal over the whole sequence (lexfine.speed.causal_sdpa), padded batches (not
    padding_free, whose packed rows need their position ids and a varlen kernel)."""
    t = cfg.train
    applies = not t.padding_free and causal_sdpa(getattr(model, "config", None)) \
        and decoder_stack(model, (decoder_layers(model) or [None])[0]) is not None
    if t.mask_free_attention and not applies:
        log.warning("train.mask_free_attention is on but does not apply to this model (it needs SDPA attention, "
                    "causal over the whole sequence, and padded batches): the padding mask is kept")
    return applies if t.mask_free_attention is None else bool(t.mask_free_attention) and applies


def install_mask_free_attention(model):
    """A forward pre-hook on the decoder stack that, in training, drops the batch's 2D padding mask, so transformers
    builds no mask and SDPA runs with is_causal. Exact only for right padding (pads after every real token), which
    `RightPadded` checks on each collated batch. The model's inputs keep the mask: the Trainer and TRL count real
    tokens with it. Evaluation (model.eval() or no grad) and cached decoding keep their masks. Returns the hook."""
    stack = decoder_stack(model, decoder_layers(model)[0])
    return stack.register_forward_pre_hook(_drop_padding_mask, with_kwargs=True)


def _drop_padding_mask(module, args, kwargs):
    mask = kwargs.get("attention_mask")
    if not (module.training and torch.is_grad_enabled() and isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return None
    if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
        return None
    return args, {**kwargs, "attention_mask": None}


class RightPadded:
    """The Trainer's data collator, checked: every row of the padding mask is ones then zeros (TRL's collator pads
    on the right). A batch padded any other way stops the run with a DataError instead of training on a batch
    that mask-free attention would get wrong."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch.get("attention_mask") if hasattr(batch, "get") else None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] > 1 \
                and bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise DataError("a training batch is not right-padded (a real token after padding); set "
                            "train.mask_free_attention=false to train with the padding mask")
        return batch


def compiles_layers(cfg) -> bool:
    """Whether the run compiles its decoder layers: train.compile_layers, or (null) with a CUDA GPU under
    launch.strategy none/ddp."""
    t = cfg.train
    if t.compile_layers is not None:
        return t.compile_layers
    return torch.cuda.is_available() and cfg.launch.strategy in ("none", "ddp")


def pad_to_multiple_of(cfg) -> int | None:
    """TRL's pad_to_multiple_of for the run (None: pad to the longest of the batch). train.pad_to_multiple_of, or
    (null) 8 with compiled layers; never with padding_free (one packed row, no padding to align)."""
    t = cfg.train
    if t.padding_free:
        return None
    m = t.pad_to_multiple_of if t.pad_to_multiple_of is not None else (8 if compiles_layers(cfg) else 1)
    return m if m > 1 else None


def decoder_stack(model, first_layer):
    """The module whose ModuleList child holds the decoder layers (`model.layers`, GPT-2's `transformer.h`, ...):
    it is called once per forward with the batch's input ids or embeddings. None if there is none."""
    for m in model.modules():
        for child in m.children():
            if isinstance(child, torch.nn.ModuleList) and any(x is first_layer for x in child):
                return m
    return None


def spread(n_layers: int, k: int) -> set[int]:
    """k of n_layers layer indices, spread evenly over the stack (0 included when k > 0)."""
    return {i * n_layers // k for i in range(k)} if k else set()


def layers_to_checkpoint(n_layers: int, at_full_batch: int, tokens: int, full_batch_tokens: int) -> int:
    """How many layers a batch of `tokens` (batch x padded length) checkpoints so that the activations it keeps stay
    within those of a full batch with `at_full_batch` layers checkpointed.

    A layer that keeps its activations stores about `a` bytes per token, a checkpointed one only its input (a small
    fraction of `a`, left out here, which errs on the side of checkpointing more). A full batch keeps
    (n - k0) * a * T_full; a batch of T tokens may keep floor((n - k0) * T_full / T) layers."""
    if tokens >= full_batch_tokens:
        return at_full_batch
    kept = min(n_layers, (n_layers - at_full_batch) * full_batch_tokens // max(tokens, 1))
    return n_layers - kept


class SelectiveCheckpointing(TrainerCallback):
    """The Trainer switches checkpointing on for every layer before `on_train_begin`; this keeps it on for a
    fraction of them. Works with any transformers 5.x (newer ones also offer `every_n_layers`).

    With `full_batch_tokens` (adaptive): `fraction` holds for a full batch (batch_size x max_length tokens); a
    forward pre-hook on the decoder stack reads each training batch's size and checkpoints fewer layers for a
    shorter batch (layers_to_checkpoint), so the peak stays that of a full batch while most steps recompute less.
    """

    def __init__(self, fraction: float, full_batch_tokens: int | None = None, compiled: bool = False):
        self.fraction = fraction
        self.full_batch_tokens = full_batch_tokens
        # Compiled layers have one graph for checkpointed layers and one for the others. A short first batch would
        # checkpoint none and leave the first long batch, any step later, to compile the other one: the first batch
        # checkpoints at least one layer (only compute: checkpointing more never raises the peak).
        self.compiled = compiled
        self.layers: list = []
        self.at_full_batch = 0
        self.counted = [0, 0]  # batches, checkpointed layers over them
        self.hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.layers = [m for m in decoder_layers(model) if getattr(m, "gradient_checkpointing", False)]
        self.at_full_batch = round(self.fraction * len(self.layers))
        self.checkpoint(self.at_full_batch)
        self.counted = [0, 0]
        stack = decoder_stack(model, self.layers[0]) if self.full_batch_tokens and self.layers else None
        if self.full_batch_tokens and stack is None:
            log.warning("adaptive checkpointing off: no module holds the decoder layers in a ModuleList")
            self.full_batch_tokens = None
        if stack is not None:
            self.hook = stack.register_forward_pre_hook(self.per_batch, with_kwargs=True)
        log.info("activation checkpointing on %d of %d decoder layers%s", self.at_full_batch, len(self.layers),
                 " at a full batch, fewer on shorter batches" if self.full_batch_tokens else "")

    def checkpoint(self, k: int) -> None:
        keep = spread(len(self.layers), k)
        for i, layer in enumerate(self.layers):
            layer.gradient_checkpointing = i in keep

    def per_batch(self, module, args, kwargs):
        if not module.training:
            return
        x = next((v for v in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]) if v is not None), None)
        if x is None:
            return
        k = layers_to_checkpoint(len(self.layers), self.at_full_batch, x.shape[0] * x.shape[1], self.full_batch_tokens)
        if self.compiled and self.counted[0] == 0 and self.at_full_batch > 0:
            k = max(k, 1)
        self.checkpoint(k)
        self.counted[0] += 1
        self.counted[1] += k

    def on_train_end(self, args, state, control, **kwargs):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        for layer in self.layers:  # as the Trainer left them: a later train() starts from the same state
            layer.gradient_checkpointing = True
        if self.full_batch_tokens and self.counted[0]:
            log.info("adaptive checkpointing: %.1f of %d layers checkpointed per batch on average",
                     self.counted[1] / self.counted[0], len(self.layers))
