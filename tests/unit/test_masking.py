"""Which token ids carry loss, with real tokenizers and the real chat templates."""

import pytest

from lexfine.config import DataArgs
from lexfine.data import load_examples
from lexfine.data.example import Example
from lexfine.data.masking import IGNORE, encode, end_of_turn_ids, prompt_ids


def _example(facts="Le recourant conteste la décision. " * 5, answer="dismissal"):
    return Example(id="x", before="Predict.\nFacts:\n", facts=facts, after="\nAnswer.", answer=answer,
                   system="You are an expert in Swiss case law.")


def loss_ids(enc):
    return [t for t in enc.labels if t != IGNORE]


def test_chatml_loss_is_answer_plus_im_end(smollm_tokenizer):
    tok = smollm_tokenizer
    enc = encode(tok, _example(), max_length=512)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tok) == [im_end]
    assert loss_ids(enc) == tok("dismissal", add_special_tokens=False)["input_ids"] + [im_end]
    # the masked part is exactly the prompt, and the prompt ends with the assistant header
    assert enc.labels[: enc.prompt_len] == [IGNORE] * enc.prompt_len
    assert tok.decode(enc.input_ids[: enc.prompt_len]).endswith("<|im_start|>assistant\n")
    # the training sequence is what the chat template renders for the whole conversation
    full = tok.apply_chat_template(_example().messages(with_answer=True), tokenize=True)["input_ids"]
    assert full[: len(enc.input_ids)] == enc.input_ids


def test_apertus_loss_closes_with_assistant_end(apertus_tokenizer):
    tok = apertus_tokenizer
    enc = encode(tok, _example(answer="approval"), max_length=512)
    end = tok.convert_tokens_to_ids("<|assistant_end|>")
    # the stock template leaves the last assistant turn open: the eot must come from the template's earlier turns
    assert end_of_turn_ids(tok) == [end]
    assert loss_ids(enc) == tok("approval", add_special_tokens=False)["input_ids"] + [end]
    assert tok.decode(enc.input_ids[: enc.prompt_len]).endswith("<|assistant_start|>")


def test_apertus_prompt_does_not_depend_on_the_date(apertus_tokenizer):
    text = apertus_tokenizer.decode(prompt_ids(apertus_tokenizer, _example()))
    assert "You are an expert in Swiss case law." in text
    assert "Knowledge cutoff" not in text and "Current date" not in text and "2026" not in text


def test_loss_on_all_trains_every_token(smollm_tokenizer):
    enc = encode(smollm_tokenizer, _example(), max_length=512, loss_on="all")
    assert enc.labels == enc.input_ids


@pytest.mark.parametrize("mode", ["middle", "tail"])
def test_truncation_keeps_instruction_and_answer(smollm_tokenizer, mode):
    tok = smollm_tokenizer
    long = " ".join(f"fait{i}" for i in range(3000)) + " FINALFACT"
    ex = _example(facts="FIRSTFACT " + long)
    enc = encode(tok, ex, max_length=200, truncation=mode)
    assert len(enc.input_ids) <= 200 and enc.truncated and enc.facts_tokens_cut > 0
    text = tok.decode(enc.input_ids)
    assert "Predict." in text and "Answer." in text and "FIRSTFACT" in text
    assert ("FINALFACT" in text) == (mode == "middle")
    assert tok.decode(loss_ids(enc)) == "dismissal<|im_end|>"


def test_short_example_is_not_truncated(smollm_tokenizer):
    enc = encode(smollm_tokenizer, _example(facts="court."), max_length=512)
    assert not enc.truncated and enc.facts_tokens_cut == 0


def test_bundled_sjp_answers_are_labels(smollm_tokenizer):
    examples = load_examples(DataArgs(limit=30))
    assert {e.answer for e in examples} <= {"approval", "dismissal"}
    for e in examples[:5]:
        enc = encode(smollm_tokenizer, e, max_length=256)
        assert smollm_tokenizer.decode(loss_ids(enc)) == f"{e.answer}<|im_end|>"


def test_collated_batch_masks_prompt_and_padding(smollm_tokenizer, tiny_config):
    """Assert on the batch the trainer actually sees, not on the dataset (TRL can silently ignore masks)."""
    import torch
    from trl import SFTTrainer

    from lexfine import models
    from lexfine.config import validate
    from lexfine.rundir import RunDir
    from lexfine.train.sft import build_args, load_dataset

    cfg = validate(tiny_config(train__batch_size=4))
    tok = smollm_tokenizer
    dataset, _ = load_dataset(cfg, tok)
    model = models.load_model(cfg.model, cfg.model_args, tokenizer=tok)
    args = build_args(cfg, RunDir(cfg.run_dir()))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"], batch["labels"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = {tuple(tok(a, add_special_tokens=False)["input_ids"] + [im_end]) for a in ("approval", "dismissal")}
    for row_ids, row_labels, mask in zip(ids, labels, batch["attention_mask"]):
        kept = row_labels[row_labels != IGNORE].tolist()
        assert tuple(kept) in answers
        # loss positions are the last real tokens; padding never carries loss
        n = int(mask.sum())
        assert row_labels[n:].eq(IGNORE).all()
        assert torch.equal(row_ids[n - len(kept): n], torch.tensor(kept))
