"""Selective activation checkpointing: which layers recompute, checked by counting real forward calls."""

import pytest
import torch

from lexfine.speed import decoder_layers
from lexfine.train.speed import SelectiveCheckpointing, layers_to_checkpoint, spread


@pytest.mark.parametrize("n,fraction,expected", [
    (4, 1.0, {0, 1, 2, 3}), (4, 0.5, {0, 2}), (4, 0.0, set()), (32, 0.25, {0, 4, 8, 12, 16, 20, 24, 28}),
    (3, 0.34, {0}), (5, 0.6, {0, 1, 3}),
])
def test_checkpointed_indices(n, fraction, expected):
    assert spread(n, round(fraction * n)) == expected  # the layers a fraction checkpoints


@pytest.mark.parametrize("tokens,expected", [
    (16384, 18), (20000, 18),  # a full batch (or more): the configured 18 of 32
    (8192, 4),                 # half the tokens: 14 kept layers may become 28
    (5000, 0),                 # short enough to keep every layer
    (12000, 13),               # 14 * 16384 // 12000 = 19 kept
])
def test_layers_to_checkpoint_keeps_activations_within_a_full_batch(tokens, expected):
    k = layers_to_checkpoint(32, 18, tokens, 16384)
    assert k == expected
    assert (32 - k) * tokens <= (32 - 18) * 16384 or tokens >= 16384


def forward_calls_per_layer(fraction: float | None, full_batch_tokens: int | None = None) -> list[int]:
    from transformers import ApertusConfig, ApertusForCausalLM

    cfg = ApertusConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, vocab_size=128)
    torch.manual_seed(0)
    model = ApertusForCausalLM(cfg).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if fraction is not None:
        SelectiveCheckpointing(fraction, full_batch_tokens).on_train_begin(None, None, None, model=model)
    calls = [0] * 4
    for i, layer in enumerate(decoder_layers(model)):
        def counted(x, i=i, forward=layer.mlp.forward):  # (module hooks do not fire on the recompute)
            calls[i] += 1
            return forward(x)

        layer.mlp.forward = counted
    ids = torch.randint(0, 128, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    return calls


def test_only_the_chosen_layers_recompute():
    assert forward_calls_per_layer(None) == [2, 2, 2, 2]  # all checkpointed: forward + recompute
    assert forward_calls_per_layer(0.5) == [2, 1, 2, 1]
    assert forward_calls_per_layer(0.0) == [1, 1, 1, 1]


def test_adaptive_checkpointing_recomputes_fewer_layers_on_shorter_batches():
    # the batch has 2 x 10 = 20 tokens; 2 of 4 layers recompute at a full batch
    assert forward_calls_per_layer(0.5, full_batch_tokens=20) == [2, 1, 2, 1]  # a full batch
    assert forward_calls_per_layer(0.5, full_batch_tokens=30) == [2, 1, 1, 1]  # 2/3 of one: 3 layers may keep
    assert forward_calls_per_layer(0.5, full_batch_tokens=40) == [1, 1, 1, 1]  # half of one: all 4 may keep


@pytest.mark.parametrize("strategy,adaptive", [("none", True), ("ddp", True), ("zero2", True), ("zero3", False)])
def test_adaptive_checkpointing_is_off_where_zero3_traces_the_module_order(strategy, adaptive):
    from transformers import ApertusConfig, ApertusForCausalLM

    from lexfine.config import build_config
    from lexfine.train.speed import apply_speed_levers

    cfg = build_config({}, ["model=smollm2-135m", "train.checkpoint_fraction=0.5", "train.compile_layers=false",
                            f"launch.strategy={strategy}"])
    model = ApertusForCausalLM(ApertusConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128))
    callbacks, applied = apply_speed_levers(cfg, model)
    assert applied["adaptive_checkpointing"] is adaptive
    assert [c.full_batch_tokens is not None for c in callbacks] == [adaptive]


def test_adaptive_checkpointing_finds_a_stack_not_named_layers_and_removes_its_hook():
    """GPT-2 keeps its blocks in `transformer.h`; the pre-hook goes on the module holding them, and training's end
    removes it (a second train() must not stack hooks)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=128, n_positions=64)).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert len(decoder_layers(model)) == 4
    cb = SelectiveCheckpointing(0.5, full_batch_tokens=40)
    for _ in range(2):
        cb.on_train_begin(None, None, None, model=model)
        assert len(model.transformer._forward_pre_hooks) == 1
        ids = torch.randint(0, 128, (2, 10))  # half a full batch: every layer may keep its activations
        model(input_ids=ids, labels=ids).loss.backward()
        assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [False] * 4
        assert cb.counted == [1, 0]
        cb.on_train_end(None, None, None)
        assert not model.transformer._forward_pre_hooks


def test_compiled_layers_checkpoint_at_least_one_layer_on_the_first_batch():
    """Compiled layers have a graph for checkpointed layers and one for the others: both are compiled in step 1, even
    when the first batch is short enough for adaptive checkpointing to checkpoint none (a later long batch would
    otherwise compile the other graph in the middle of training)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=128, n_positions=64)).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for compiled, first in ((False, 0), (True, 1)):
        cb = SelectiveCheckpointing(0.5, full_batch_tokens=40, compiled=compiled)
        cb.on_train_begin(None, None, None, model=model)
        checkpointed = []
        for _ in range(2):
            ids = torch.randint(0, 128, (2, 10))  # half a full batch: every layer may keep its activations
            model(input_ids=ids, labels=ids).loss.backward()
            checkpointed.append(sum(layer.gradient_checkpointing for layer in decoder_layers(model)))
        cb.on_train_end(None, None, None)
        assert checkpointed == [first, 0]


def tiny_apertus(attn="sdpa"):
    from transformers import ApertusConfig, ApertusForCausalLM

    cfg = ApertusConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, vocab_size=128, attn_implementation=attn)
    torch.manual_seed(0)
    return ApertusForCausalLM(cfg)


def test_a_batch_without_padding_gets_the_causal_mask_a_padded_batch_would():
    from lexfine.speed import CausalMasks

    model = tiny_apertus()
    hidden = torch.zeros(3, 5, 32)
    mask = CausalMasks(model.config).causal(hidden, None)
    assert mask.dtype == torch.bool and mask.shape == (3, 1, 5, 5)
    assert torch.equal(mask[:, 0], torch.ones(5, 5, dtype=torch.bool).tril().expand(3, 5, 5))
    assert CausalMasks(model.config).causal(hidden, None) is not None
    assert CausalMasks(tiny_apertus("eager").config).causal(hidden, None) is None  # sdpa only


def test_compiled_layers_share_a_graph_with_and_without_padding_and_learn_the_same():
    """Padded and unpadded batches, and a length equal to the hidden size (32), go through one graph per layer input
    kind; the losses are those of the eager model."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from lexfine.speed import compile_decoder_layers, uncompile_decoder_layers

    model = tiny_apertus().train()
    batches = []
    for lengths in ([32, 32, 32], [20, 17, 9], [12, 12, 12], [30, 8, 8]):
        ids = torch.randint(0, 128, (3, max(lengths)))
        att = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            att[i, :n] = 1
        batches.append(dict(input_ids=ids, attention_mask=att, labels=ids.masked_fill(att == 0, -100)))
    eager = [model(**b, use_cache=False).loss.item() for b in batches]
    torch._dynamo.reset()
    counters.clear()
    compile_decoder_layers(model, backend="eager")
    try:
        compiled = [model(**b, use_cache=False).loss.item() for b in batches]
    finally:
        uncompile_decoder_layers(model)
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert counters["frames"]["total"] == 1  # both layers, every batch (before: 3, duck sizing and the None mask)


def right_padded(lengths, total=None, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = total or max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), total), generator=g)
    att = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        att[i, :n] = 1
    return dict(input_ids=ids, attention_mask=att, labels=ids.masked_fill(att == 0, -100))


def test_mask_free_attention_learns_what_the_padding_mask_learns(monkeypatch):
    """Right-padded batches without their padding mask: SDPA runs causal with no mask, and the loss and every
    gradient are those of the masked batch (pads come after every real token, so causality alone keeps them out)."""
    import torch.nn.functional as F

    from lexfine.train.speed import install_mask_free_attention

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask") is None, kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny_apertus().train()
    batches = [right_padded(n, seed=i) for i, n in enumerate(([12, 7, 3], [9, 9, 9], [16, 15, 1]))]

    def loss_and_grads():
        out = []
        for b in batches:
            model.zero_grad()
            loss = model(**b, use_cache=False).loss
            loss.backward()
            out.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        return out

    masked = loss_and_grads()
    assert seen and not any(no_mask for no_mask, _ in seen[:2])  # padded: transformers passes a mask
    seen.clear()
    hook = install_mask_free_attention(model)
    try:
        free = loss_and_grads()
        assert seen and all(no_mask and causal for no_mask, causal in seen)
        with torch.no_grad():  # evaluation keeps its mask
            seen.clear()
            model(**batches[0], use_cache=False)
            assert not seen[0][0]
    finally:
        hook.remove()
    for (l1, g1), (l2, g2) in zip(masked, free):
        assert l2 == pytest.approx(l1, rel=1e-6)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_right_padded_collator_refuses_a_left_padded_batch():
    from lexfine.errors import DataError
    from lexfine.train.speed import RightPadded

    right = right_padded([5, 3])
    assert RightPadded(lambda f: right)([]) is right
    left = dict(right, attention_mask=right["attention_mask"].flip(1))
    with pytest.raises(DataError, match="not right-padded"):
        RightPadded(lambda f: left)([])


@pytest.mark.parametrize("attn, setting, padding_free, expected", [
    ("sdpa", None, False, True), ("sdpa", False, False, False), ("eager", None, False, False),
    ("eager", True, False, False), ("sdpa", None, True, False)])
def test_mask_free_attention_applies_only_where_it_is_exact(attn, setting, padding_free, expected):
    from types import SimpleNamespace

    from lexfine.train.speed import mask_free_attention

    cfg = SimpleNamespace(train=SimpleNamespace(mask_free_attention=setting, padding_free=padding_free))
    assert mask_free_attention(cfg, tiny_apertus(attn)) is expected
    sliding = tiny_apertus()
    sliding.config.sliding_window = 4
    assert mask_free_attention(cfg, sliding) is False


def test_compiled_layers_keep_one_graph_without_masks():
    """With mask-free attention every training batch reaches the layers with no mask: padded, unpadded and a length
    equal to the hidden size share one graph, and the losses are the eager masked model's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from lexfine.speed import compile_decoder_layers, uncompile_decoder_layers
    from lexfine.train.speed import install_mask_free_attention

    model = tiny_apertus().train()
    batches = [right_padded(n, seed=i) for i, n in enumerate(([32, 32, 32], [20, 17, 9], [12, 12, 12], [30, 8, 8]))]
    eager = [model(**b, use_cache=False).loss.item() for b in batches]
    torch._dynamo.reset()
    counters.clear()
    hook = install_mask_free_attention(model)
    compile_decoder_layers(model, backend="eager", causal_mask_for_unpadded=False)
    try:
        compiled = [model(**b, use_cache=False).loss.item() for b in batches]
    finally:
        uncompile_decoder_layers(model)
        hook.remove()
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert counters["frames"]["total"] == 1


@pytest.mark.parametrize("setting, mask_free, expected", [
    (None, True, False), (None, False, None), (True, True, True), (False, False, False)])
def test_cudnn_attention_is_off_by_default_only_where_batches_are_mask_free(setting, mask_free, expected):
    from types import SimpleNamespace

    from lexfine.train.speed import cudnn_attention

    assert cudnn_attention(SimpleNamespace(train=SimpleNamespace(cudnn_attention=setting)), mask_free) is expected


def test_a_cuda_run_trains_without_cudnn_attention_and_restores_it_for_evaluation(monkeypatch):
    from lexfine.config import build_config
    from lexfine.train.speed import apply_speed_levers, attention_kernels

    def levers(*extra):
        cfg = build_config({}, ["model=smollm2-135m", "train.compile_layers=false", "train.fused_activation=false",
                                *extra])
        return apply_speed_levers(cfg, tiny_apertus())[1]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        applied = levers()
        assert applied["mask_free_attention"] is True and applied["cudnn_attention"] is False
        assert torch.backends.cuda.cudnn_sdp_enabled() is True  # deciding changes nothing yet
        tag = torch.compiler.config.cache_key_tag
        with attention_kernels(applied):
            assert torch.backends.cuda.cudnn_sdp_enabled() is False  # training: flash
            # compile caches on disk keep layers compiled with cuDNN's kernel apart
            assert torch.compiler.config.cache_key_tag == f"{tag}|lexfine-cudnn-sdpa=0"
        assert torch.backends.cuda.cudnn_sdp_enabled() is True  # evaluation after training: as before
        assert torch.compiler.config.cache_key_tag == tag
        with pytest.raises(RuntimeError), attention_kernels(applied):
            raise RuntimeError("a failed step")
        assert torch.backends.cuda.cudnn_sdp_enabled() is True
        masked = levers("train.mask_free_attention=false")
        assert masked["cudnn_attention"] is True  # a masked batch cannot use flash: PyTorch chooses
        with attention_kernels(masked):
            assert torch.backends.cuda.cudnn_sdp_enabled() is True
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
