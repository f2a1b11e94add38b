"""The evaluation prompt is the training prompt, token for token; answer labels tokenize as expected."""

import pytest

from lexfine.config import DataArgs
from lexfine.data import sjp
from lexfine.data.lexam import choice_labels
from lexfine.data.masking import answer_ids, encode, end_of_turn_ids, prompt_ids
from lexfine.eval.runner import build_prompt, candidate_ids, make_plan
from lexfine.eval.tasks import get_task, load_cases


@pytest.fixture(scope="module")
def sjp_cases():
    cases, _ = load_cases(get_task("sjp"), "loglik", "bundled:sjp_fr_heldout", DataArgs(), limit=6)
    return cases


@pytest.mark.parametrize("tok_name", ["smollm_tokenizer", "apertus_tokenizer"])
def test_eval_prompt_equals_training_prompt(request, tok_name, sjp_cases):
    tok = request.getfixturevalue(tok_name)
    plan = make_plan(tok, get_task("sjp"), "loglik", 8192)
    for case in sjp_cases:
        ids, truncated = build_prompt(tok, case.example, plan, "middle")
        assert not truncated
        assert ids == prompt_ids(tok, case.example)
        # and it is the prefix of the training sequence, followed by exactly the gold candidate
        enc = encode(tok, case.example, 8192)
        gold = plan.candidates[get_task("sjp").labels.index(case.gold)]
        assert enc.input_ids == ids + gold


def test_truncated_eval_prompt_equals_training_prompt(smollm_tokenizer, sjp_cases):
    tok = smollm_tokenizer
    plan = make_plan(tok, get_task("sjp"), "loglik", 400)
    eot = end_of_turn_ids(tok)
    longest = max(len(answer_ids(tok, lab, eot)) for lab in sjp.LABELS)
    for case in sjp_cases:
        ids, truncated = build_prompt(tok, case.example, plan, "middle")
        assert truncated and len(ids) <= 400 - longest
        # training cuts the same way for an answer as long as the longest candidate
        enc = encode(tok, case.example.__class__(**{**case.example.__dict__, "answer": "dismissal"}), 400, eot=eot)
        if len(answer_ids(tok, "dismissal", eot)) == longest:
            assert enc.input_ids[: enc.prompt_len] == ids


def test_system_prompt_is_explicit(smollm_tokenizer, sjp_cases):
    text = smollm_tokenizer.decode(prompt_ids(smollm_tokenizer, sjp_cases[0].example))
    assert "You are an expert in Swiss case law." in text


@pytest.mark.parametrize("tok_name", ["smollm_tokenizer", "apertus_tokenizer"])
@pytest.mark.parametrize("n", [4, 8, 16])
def test_letters_are_single_distinct_tokens(request, tok_name, n):
    tok = request.getfixturevalue(tok_name)
    cands, scoring = candidate_ids(tok, get_task(f"lexam_mcq{n}"), end_of_turn_ids(tok))
    assert scoring == "first_token"
    assert [tok.decode(c) for c in cands] == choice_labels(n)
    assert len({c[0] for c in cands}) == n


@pytest.mark.parametrize("tok_name", ["smollm_tokenizer", "apertus_tokenizer"])
def test_32_choices_are_numbers_scored_as_sequences(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    eot = end_of_turn_ids(tok)
    cands, scoring = candidate_ids(tok, get_task("lexam_mcq32"), eot)
    assert choice_labels(32)[:3] == ["1", "2", "3"] and len(cands) == 32
    if scoring == "sequence_with_eot":  # "1" must not win just by being a prefix of "10"
        assert all(c[-1] == eot[-1] for c in cands)
    assert len({tuple(c) for c in cands}) == 32


def test_sjp_candidates_are_training_targets(apertus_tokenizer):
    tok = apertus_tokenizer
    eot = end_of_turn_ids(tok)
    cands, scoring = candidate_ids(tok, get_task("sjp"), eot)
    assert scoring == "sequence_with_eot"
    assert cands == [answer_ids(tok, "dismissal", eot), answer_ids(tok, "approval", eot)]
    assert any(len(c) > 2 for c in cands)  # multi-token labels do occur with this vocabulary


def test_no_chat_template_is_a_one_line_error(smollm_tokenizer):
    import copy

    from lexfine.errors import ModelError

    tok = copy.deepcopy(smollm_tokenizer)
    tok.chat_template = None
    with pytest.raises(ModelError, match="chat template"):
        make_plan(tok, get_task("sjp"), "loglik", 512)


def test_prompts_built_by_forked_workers_are_the_serial_ones_in_order(smollm_tokenizer, monkeypatch):
    from lexfine.data import prepare
    from lexfine.eval.runner import build_prompts

    cases, _ = load_cases(get_task("sjp"), "loglik", "bundled:sjp_fr_heldout", DataArgs(), limit=40)
    plan = make_plan(smollm_tokenizer, get_task("sjp"), "loglik", 600)  # some cases cut, some not
    serial = [build_prompt(smollm_tokenizer, c.example, plan, "middle") for c in cases]
    assert 0 < sum(cut for _, cut in serial) < len(serial)
    monkeypatch.setattr(prepare, "CHUNK", 3)  # many ranges, so that their order matters
    monkeypatch.setenv("LEXFINE_TOKENIZE_WORKERS", "2")
    forks = []
    real_fork = prepare.forked_chunks

    def spy(fn, n, workers=1, bar=None):
        forks.append(workers)
        return real_fork(fn, n, workers, bar)

    monkeypatch.setattr(prepare, "forked_chunks", spy)
    ids, cut = build_prompts(smollm_tokenizer, [c.example for c in cases], plan, "middle")
    assert forks == [2]
    assert ids == [i for i, _ in serial] and cut == [c for _, c in serial]
