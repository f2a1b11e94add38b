"""Parsing generated answers: SJP label words, LEXam's last ###X###."""

import pytest

from lexfine.eval.generate import parse_hash_answer, parse_sjp

LETTERS = ["A", "B", "C", "D"]


@pytest.mark.parametrize("text,expected", [
    ("dismissal", "dismissal"),
    ("Approval.", "approval"),
    ("The appeal: DISMISSAL", "dismissal"),
    ("approval, not dismissal", "approval"),
    ("dismissal rather than approval", "dismissal"),
    ("Le recours est rejeté.", None),
    ("", None),
    # whole words only: a label inside another word is not that label (the old substring search said "approval")
    ("disapproval", None),
    ("Disapproval of the appeal; dismissal.", "dismissal"),
    ("non-approval", None),
    ("approvals", None),
    ("dismissals are rare: approval", "approval"),
    ("**Approval**", "approval"),
    ('"DISMISSAL"', "dismissal"),
    ("Answer:approval", "approval"),
    ("(dismissal)\n", "dismissal"),
    ("<approval>", "approval"),
    ("Judgment: Dismissal. Approval would need new facts.", "dismissal"),
    # only the English label words the model is trained to write: verdicts in the case's language do not parse
    ("Der Rekurs wird abgewiesen.", None),
    ("Il ricorso è accolto.", None),
    ("Le recours est admis (approbation).", None),
])
def test_parse_sjp(text, expected):
    assert parse_sjp(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("Correct Answer: ###C###", "C"),
    ("First I thought ###A###, but on reflection\nCorrect Answer: ###D###", "D"),  # the last one wins
    ("###b###", "B"),
    ("### C ###", "C"),
    ("Correct Answer: ###E###", None),  # not a choice of a 4-choice question
    ("The answer is C.", None),
    ("##C##", None),
    ("###C### then ###X###", None),  # the last match decides, and it is invalid
])
def test_parse_hash_answer(text, expected):
    assert parse_hash_answer(text, LETTERS) == expected


def test_parse_hash_answer_numbers():
    labels = [str(i) for i in range(1, 33)]
    assert parse_hash_answer("Correct Answer: ###17###", labels) == "17"
    assert parse_hash_answer("###33###", labels) is None


def test_generate_hf_matches_one_by_one(smollm_tokenizer):
    """Left-padded, length-sorted batches give the same greedy text as one prompt at a time."""
    import torch

    from lexfine import models
    from lexfine.config import ModelArgs
    from lexfine.eval.generate import generate_hf

    from tests.conftest import tiny_arch

    model = models.load_model("random:apertus-8b", ModelArgs(arch_overrides=tiny_arch(), dtype="float32"),
                              tokenizer=smollm_tokenizer).eval()
    tok = smollm_tokenizer
    prompts = [tok(t)["input_ids"] for t in ["Bonjour", "Le recours est", "A much longer prompt than the others here"]]
    torch.manual_seed(0)
    batched = generate_hf(model, tok, prompts, 6, batch_size=3, eos_ids=[tok.eos_token_id], progress=False)
    single = [generate_hf(model, tok, [p], 6, batch_size=1, eos_ids=[tok.eos_token_id], progress=False)[0]
              for p in prompts]
    assert batched == single
