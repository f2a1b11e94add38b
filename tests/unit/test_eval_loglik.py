"""Candidate scoring: one forward pass per case equals the naive per-candidate full-sequence log-softmax."""

import pytest
import torch

from lexfine.config import ModelArgs
from lexfine.eval.loglik import Case, build_batch, predict, score_cases
from tests.conftest import tiny_arch


def _tiny(attn="sdpa", dtype="float32"):
    from lexfine import models

    return models.load_model("random:apertus-8b",
                             ModelArgs(arch_overrides=tiny_arch(), dtype=dtype, attn_implementation=attn)).eval()


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def naive(model, case: Case) -> list[float]:
    """Each candidate appended to the prompt, the whole sequence through the model, log-softmax by hand."""
    out = []
    with torch.no_grad():
        for cand in case.candidates:
            ids = torch.tensor([case.prompt + cand])
            logits = model(ids).logits[0].float()
            logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            out.append(sum(float(logp[len(case.prompt) - 1 + j, t]) for j, t in enumerate(cand)))
    return out


def _cases():
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(5, 40000, (n,), generator=g).tolist()  # noqa: E731
    multi = [rand(3), rand(5)]  # like "approval"+eot vs "dismissal"+eot: different lengths
    return [Case(rand(7), multi), Case(rand(19), multi), Case(rand(2), multi), Case(rand(11), [rand(1), rand(4)])]


def test_two_example_batch_equals_hand_computed_log_softmax(tiny):
    cases = _cases()[:2]
    got = score_cases(tiny, cases, batch_size=2, progress=False)
    for case, row in zip(cases, got):
        assert row == pytest.approx(naive(tiny, case), abs=1e-4)


def test_batched_equals_one_by_one_and_keeps_input_order(tiny):
    cases = _cases()
    batched = score_cases(tiny, cases, batch_size=4, progress=False)
    single = [score_cases(tiny, [c], batch_size=1, progress=False)[0] for c in cases]
    for a, b, case in zip(batched, single, cases):
        assert a == pytest.approx(b, abs=1e-4)
        assert a == pytest.approx(naive(tiny, case), abs=1e-4)


def test_single_token_candidates_need_no_block(tiny):
    letters = [[65], [66], [67], [68]]
    cases = [Case(list(range(100, 100 + n)), letters) for n in (3, 9, 5)]
    ids, pos, mask, width, _ = build_batch(cases, 0, "cpu")
    assert width == 0 and mask.dim() == 2  # a plain padding mask: any attention kernel works
    got = score_cases(tiny, cases, batch_size=3, progress=False)
    for case, row in zip(cases, got):
        assert row == pytest.approx(naive(tiny, case), abs=1e-4)


def test_block_layout_and_mask():
    cases = [Case([1, 2, 3], [[7, 8, 9], [5]]), Case([4], [[7, 8, 9], [5]])]
    ids, pos, mask, width, s = build_batch(cases, 0, "cpu")
    assert width == 2 and s == 2  # block = [7, 8] (a candidate's last token is never an input)
    assert ids.tolist() == [[1, 2, 3, 7, 8], [0, 0, 4, 7, 8]]
    assert pos.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    m = mask[1, 0].int().tolist()
    assert m[2] == [0, 0, 1, 0, 0]  # prompt token does not see the left padding
    assert m[4] == [0, 0, 1, 1, 1]  # candidate token sees the prompt and its own earlier token
    assert m[0] == [1, 0, 0, 0, 0]  # padding attends to itself only


def test_candidates_do_not_see_each_other(tiny):
    # the same candidate scores the same whether or not other candidates share its block
    base = Case(list(range(200, 212)), [[300, 301, 302]])
    crowded = Case(base.prompt, [[400, 401, 402, 403], [300, 301, 302], [500, 501]])
    a = score_cases(tiny, [base], progress=False)[0][0]
    b = score_cases(tiny, [crowded], progress=False)[0][1]
    assert a == pytest.approx(b, abs=1e-4)


def test_eager_attention_gets_an_additive_mask():
    model = _tiny(attn="eager")
    cases = _cases()
    got = score_cases(model, cases, batch_size=4, progress=False)
    for case, row in zip(cases, got):
        assert row == pytest.approx(naive(model, case), abs=1e-4)


def test_expanded_fallback_equals_packed(tiny):
    from lexfine.eval.loglik import _score_batch, _score_expanded

    cases = _cases()
    with torch.no_grad():
        a = _score_batch(tiny, cases, 0, torch.device("cpu")).tolist()  # one score per (case, candidate)
        b = _score_expanded(tiny, cases, 0, torch.device("cpu")).tolist()
    assert len(a) == len(b) == sum(len(c.candidates) for c in cases)
    assert a == pytest.approx(b, abs=1e-4)


def test_bf16_batched_close_to_fp32():
    model = _tiny(dtype="bfloat16")
    ref = _tiny()
    cases = _cases()
    got = score_cases(model, cases, batch_size=4, progress=False)
    single = [score_cases(model, [c], batch_size=1, progress=False)[0] for c in cases]
    exact = score_cases(ref, cases, batch_size=4, progress=False)
    for a, b, c in zip(got, single, exact):
        assert a == pytest.approx(b, rel=2e-2, abs=0.1)  # bf16: batched vs one by one
        assert a == pytest.approx(c, rel=2e-2, abs=0.3)


def test_predict_picks_highest_first_on_ties():
    assert predict([-3.0, -1.0, -2.0], ["A", "B", "C"]) == "B"
    assert predict([-1.0, -1.0], ["dismissal", "approval"]) == "dismissal"


def test_padding_the_loop_for_data_parallel_keeps_results(tiny):
    cases = _cases()
    a = score_cases(tiny, cases, batch_size=2, progress=False)
    b = score_cases(tiny, cases, batch_size=2, progress=False, n_batches_min=5)
    assert a == b


@pytest.mark.parametrize("strategy", ["cached", "packed", "expanded"])
def test_reading_scores_batches_later_changes_nothing(tiny, strategy):
    """Scores are read `lookahead` batches after their batch was queued (the GPU keeps working meanwhile): every
    case still gets its own scores, in input order, also with repeated (data-parallel) and padded (min_rows)
    batches, and with fewer batches than the lookahead."""
    cases = _cases() + [Case(list(range(300, 300 + n)), [[65], [66, 67]]) for n in (4, 13, 6)]
    ref = [naive(tiny, c) for c in cases]
    for lookahead in (0, 1, 3, 50):
        for kw in ({}, {"n_batches_min": 9}, {"min_rows": 2}):
            got = score_cases(tiny, cases, batch_size=2, progress=False, strategy=strategy, lookahead=lookahead, **kw)
            assert len(got) == len(cases)
            for row, want in zip(got, ref):
                assert row == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("strategy", ["cached", "expanded"])
def test_other_strategies_equal_naive(attn, strategy):
    model = _tiny(attn=attn)
    cases = _cases() + [Case(list(range(300, 309)), [[65], [66], [67], [68]])]
    got = score_cases(model, cases[:4], batch_size=4, progress=False, strategy=strategy)
    got += score_cases(model, cases[4:], batch_size=4, progress=False, strategy=strategy)
    for case, row in zip(cases, got):
        assert row == pytest.approx(naive(model, case), abs=1e-4)


def test_prompt_pass_keeps_its_key_value_states_without_a_copy(tiny):
    """The cache's first update per layer keeps the states it is given (no copy of the prompt's keys and values);
    the candidate pass's update appends to them as DynamicCache does."""
    from lexfine.eval.loglik import CacheUpdatedOutsideGraphs

    cache = CacheUpdatedOutsideGraphs(tiny.config)
    k, v = torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    keys, values = cache.update(k, v, 0)
    assert keys is k and values is v and cache.get_seq_length(0) == 7
    k2, v2 = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16)
    keys, values = cache.update(k2, v2, 0)
    assert torch.equal(keys, torch.cat([k, k2], dim=-2)) and torch.equal(values, torch.cat([v, v2], dim=-2))
    assert cache.get_seq_length(0) == 10


def test_token_budget_batches():
    from lexfine.eval.loglik import length_batches

    lengths = [100, 900, 50, 1000, 60, 70]
    assert length_batches(lengths, 8) == [[3, 1, 0, 5, 4, 2]]
    # at most 2000 padded tokens: the two long ones together, the short ones in a larger batch
    assert length_batches(lengths, 8, max_tokens=2000) == [[3, 1], [0, 5, 4, 2]]
    assert length_batches(lengths, 3, max_tokens=2000) == [[3, 1], [0, 5, 4], [2]]


@pytest.mark.parametrize("strategy", ["auto", "packed", "cached"])
def test_attention_without_4d_masks_scores_one_row_per_candidate(tiny, monkeypatch, strategy):
    """flash-attention ignores a custom 4D mask (candidates would see each other): such models fall back to one row
    per candidate, which needs no 4D mask. Simulated by reporting flash_attention_2 for the tiny sdpa model."""
    import lexfine.eval.loglik as ll

    used = []
    real = ll._score_expanded
    monkeypatch.setattr(ll, "_attn_impl", lambda model: "flash_attention_2")
    monkeypatch.setattr(ll, "_score_expanded", lambda *a: used.append(1) or real(*a))
    cases = _cases()
    got = score_cases(tiny, cases, batch_size=4, progress=False, strategy=strategy)
    assert used
    for case, row in zip(cases, got):
        assert row == pytest.approx(naive(tiny, case), abs=1e-4)


@pytest.mark.parametrize("strategy", ["cached", "packed"])
def test_compiled_layers_share_their_graphs_however_deep_the_model(strategy):
    """Compiled scoring builds the same few graphs for 2 and for 6 decoder layers (the KV-cache update would
    otherwise compile per layer: minutes for an 8B), keeps the eager scores, and leaves the model as it was."""
    from lexfine import models
    from lexfine.eval.loglik import compiled_layers

    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(5, 40000, (n,), generator=g).tolist()  # noqa: E731
    cands = [rand(3), rand(5)]
    cases = [Case(rand(int(n)), cands) for n in torch.randint(5, 60, (9,), generator=g)]  # last batch: one row
    graphs = {}
    for depth in (2, 6):
        model = models.load_model("random:apertus-8b", ModelArgs(arch_overrides={**tiny_arch(),
                                                                                  "num_hidden_layers": depth})).eval()
        eager = score_cases(model, cases, batch_size=4, progress=False, strategy=strategy)
        built = []

        def counting(gm, example_inputs):
            built.append(gm)
            return gm.forward

        with compiled_layers(model, backend=counting) as n:
            got = score_cases(model, cases, batch_size=4, progress=False, strategy=strategy, min_rows=2)
        assert n == depth and built
        graphs[depth] = len(built)
        for e, c in zip(eager, got):
            assert c == pytest.approx(e, abs=1e-4)
        assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(depth))
        assert all(layer._compiled_call_impl is None for layer in model.model.layers)
    assert graphs[2] == graphs[6]


def test_scoring_compiles_by_default_only_on_a_gpu_and_for_large_sets(monkeypatch, tiny):
    from lexfine.eval import runner

    big = runner.AUTO_COMPILE_TOKENS
    assert not runner.compile_scoring(None, "loglik", tiny, 10 * big)  # a CPU: never by default
    assert runner.compile_scoring(True, "loglik", tiny, 1) and not runner.compile_scoring(False, "loglik", tiny, big)
    assert not runner.compile_scoring(True, "generate", tiny, big)
    monkeypatch.setattr(runner, "model_device", lambda model: torch.device("cuda"))
    assert runner.compile_scoring(None, "loglik", tiny, big)
    assert not runner.compile_scoring(None, "loglik", tiny, big - 1)
    assert not runner.compile_scoring(False, "loglik", tiny, 10 * big)


def test_eval_profile_window_records_the_batches_it_names_and_scores_the_same(tiny, monkeypatch, tmp_path):
    import json

    from lexfine.errors import LexfineError

    cases = _cases()
    plain = score_cases(tiny, cases, batch_size=1, progress=False)
    monkeypatch.setenv("LEXFINE_EVAL_PROFILE", "2-3")
    monkeypatch.setenv("LEXFINE_EVAL_PROFILE_DIR", str(tmp_path))
    assert score_cases(tiny, cases, batch_size=1, progress=False, desc="sjp test") == plain
    s = json.loads((tmp_path / "sjp_test" / "summary.json").read_text())
    from lexfine.eval.loglik import _block

    longest_first = sorted((len(c.prompt) + len(_block(c.candidates)[0]) for c in cases), reverse=True)
    assert s["steps"] == 2 and s["real_tokens"] == sum(longest_first[1:3])
    monkeypatch.setenv("LEXFINE_EVAL_PROFILE", "3")
    with pytest.raises(LexfineError, match="FIRST-LAST"):
        score_cases(tiny, cases, batch_size=1, progress=False)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_folded_grouped_attention_equals_transformers_sdpa(mask_kind):
    """A few masked query rows folded onto the grouped key/value heads give transformers' SDPA attention (which
    repeats the keys and values to every query head)."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lexfine.eval.grouped_attention import grouped_sdpa

    g = torch.Generator().manual_seed(5)
    b, h, hk, q_len, k_len, d = 3, 8, 2, 5, 23, 16
    module = SimpleNamespace(num_key_value_groups=h // hk, is_causal=True, training=False)
    query, key, value = (torch.randn(b, n, t, d, generator=g) for n, t in ((h, q_len), (hk, k_len), (hk, k_len)))
    mask = torch.rand(b, 1, q_len, k_len, generator=g) > 0.4
    mask[..., 0] = True  # every query row sees a key
    if mask_kind == "additive":
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=d ** -0.5)
    got, _ = grouped_sdpa(module, query, key, value, mask, scaling=d ** -0.5)
    assert got.shape == want.shape == (b, q_len, h, d)
    assert torch.allclose(got, want, atol=1e-5)


def test_candidate_pass_never_copies_the_cache_into_every_query_head(tiny, monkeypatch):
    """`cached` scoring of multi-token candidates: the candidate pass reads the grouped keys and values as they are
    (transformers' repeat_kv is never called); the scores stay the naive ones and the model keeps SDPA."""
    import transformers.integrations.sdpa_attention as sdpa

    from lexfine.eval import grouped_attention

    repeats, folded = [], []
    real_repeat, real_fold = sdpa.repeat_kv, grouped_attention.grouped_sdpa

    def counting_repeat(x, n_rep):
        repeats.append(x.shape)
        return real_repeat(x, n_rep)

    def counting_fold(module, query, key, value, attention_mask, **kw):
        folded.append(attention_mask is not None and query.shape[1] != key.shape[1])
        return real_fold(module, query, key, value, attention_mask, **kw)

    from transformers import AttentionInterface

    monkeypatch.setattr(sdpa, "repeat_kv", counting_repeat)
    monkeypatch.setitem(AttentionInterface._global_mapping, grouped_attention.NAME, counting_fold)
    cases = _cases()
    got = score_cases(tiny, cases, batch_size=4, progress=False, strategy="cached")
    assert any(folded) and not repeats
    assert tiny.config._attn_implementation == "sdpa"
    for case, row in zip(cases, got):
        assert row == pytest.approx(naive(tiny, case), abs=1e-4)
    # the same scoring with the fold switched off copies the cache (so the check above can fail)
    monkeypatch.setattr(grouped_attention, "MAX_FOLDED_ROWS", 0)
    score_cases(tiny, cases, batch_size=4, progress=False, strategy="cached")
    assert repeats
