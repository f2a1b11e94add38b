"""Tokenize an Example into input_ids + labels: the loss mask and the truncation are decided here, once.

    input_ids = chat_template(system, context, user, add_generation_prompt) + tokens(answer) + [end-of-turn]
    labels    = -100 on the prompt, the ids on answer + end-of-turn   (loss_on="answer")
              = input_ids                                             (loss_on="all")

The end-of-turn token is part of the loss so that greedy generation stops right after the label. It is found
from the template itself (the first special token after an assistant turn that is followed by another turn),
which also covers templates such as Apertus's that do not close the *last* assistant turn.

Too long: the facts are cut (middle or tail) until prompt + answer fit; instruction and answer always survive.
Evaluation builds prompts with the same function, so train and test prompts cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from lexfine.data.example import Example
from lexfine.errors import DataError, ModelError

IGNORE = -100
_PROBE = "LEXFINE_PROBE_ANSWER"
ELISION = "\n[...]\n"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    truncated: bool
    facts_tokens_cut: int = 0


def _ids(out) -> list[int]:
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
            "set model_args.chat_template=chatml (or apertus, or a .jinja path)"
        )


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token(s) that close an assistant turn in this tokenizer's chat template."""
    require_chat_template(tokenizer)
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": _PROBE},
        {"role": "user", "content": "b"},
    ]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    suffix = text[text.index(_PROBE) + len(_PROBE) :]
    specials = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})),
                      key=len, reverse=True)
    best = None
    for tok in specials:
        pos = suffix.find(tok)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, tok)
    if best is not None and best[0] <= 2:  # allow e.g. a space before the marker
        return [tokenizer.convert_tokens_to_ids(best[1])]
    if tokenizer.eos_token_id is None:
        raise ModelError("cannot find the end-of-turn token of this chat template and the tokenizer has no eos")
    return [tokenizer.eos_token_id]


def prompt_ids(tokenizer, example: Example, facts: str | None = None) -> list[int]:
    msgs = example.messages(facts)
    return _ids(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))


def answer_ids(tokenizer, answer: str, eot: list[int]) -> list[int]:
    return _ids(tokenizer(answer, add_special_tokens=False)["input_ids"]) + list(eot)


def cut_facts(tokenizer, facts: str, keep_tokens: int, mode: str, ids: list[int] | None = None) -> str:
    """`facts` cut to `keep_tokens` tokens (`ids`: the facts already tokenized, to save tokenizing them again)."""
    ids = _ids(tokenizer(facts, add_special_tokens=False)["input_ids"]) if ids is None else ids
    if keep_tokens >= len(ids):
        return facts
    if keep_tokens <= 0:
        return ELISION.strip("\n")
    if mode == "tail":
        return tokenizer.decode(ids[:keep_tokens]) + ELISION.rstrip("\n")
    head = keep_tokens // 2
    tail = keep_tokens - head
    return tokenizer.decode(ids[:head]) + ELISION + tokenizer.decode(ids[len(ids) - tail :])


def fit_prompt(tokenizer, example: Example, budget: int, truncation: str = "middle") -> tuple[list[int], bool, int]:
    """Prompt ids of at most `budget` tokens, cutting only the facts. Returns (ids, truncated, facts tokens cut)."""
    ids = prompt_ids(tokenizer, example)
    if len(ids) <= budget:
        return ids, False, 0
    facts_ids = _ids(tokenizer(example.facts, add_special_tokens=False)["input_ids"])
    n_facts = len(facts_ids)
    slack = 0
    for _ in range(8):  # re-tokenization at the cut can differ by a few tokens: shrink until it fits
        keep = n_facts - (len(ids) - budget) - slack
        facts = cut_facts(tokenizer, example.facts, keep, truncation, facts_ids)
        new = prompt_ids(tokenizer, example, facts)
        if len(new) <= budget:
            return new, True, max(0, n_facts - max(keep, 0))
        slack += max(4, len(new) - budget)
        if keep <= 0:
            break
    minimum = len(prompt_ids(tokenizer, example, ""))
    raise DataError(
        f"example {example.id!r}: the instruction alone needs {minimum} tokens but only {budget} are left for it "
        "after the answer; raise train.max_length or shorten the prompt template"
    )


def encode(tokenizer, example: Example, max_length: int, loss_on: str = "answer", truncation: str = "middle",
           eot: list[int] | None = None) -> Encoded:
    eot = end_of_turn_ids(tokenizer) if eot is None else eot
    ans = answer_ids(tokenizer, example.answer, eot)
    budget = max_length - len(ans)
    if budget <= 0:
        raise DataError(
            f"example {example.id!r}: the answer alone has {len(ans)} tokens, more than train.max_length={max_length}; "
            "raise train.max_length"
        )
    prompt, truncated, cut = fit_prompt(tokenizer, example, budget, truncation)
    input_ids = prompt + ans
    if loss_on == "all":
        labels = list(input_ids)
    else:
        labels = [IGNORE] * len(prompt) + ans
    return Encoded(input_ids, labels, len(prompt), truncated, cut)


@dataclass
class EncodeStats:
    n: int = 0
    truncated: int = 0
    max_tokens_cut: int = 0
    total_tokens: int = 0
    loss_tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "examples": self.n,
            "truncated": self.truncated,
            "truncated_fraction": round(self.truncated / self.n, 4) if self.n else 0.0,
            "max_facts_tokens_cut": self.max_tokens_cut,
            "total_tokens": self.total_tokens,
            "loss_tokens": self.loss_tokens,
        }


def encode_all(tokenizer, examples: list[Example], max_length: int, loss_on: str = "answer",
               truncation: str = "middle", progress: bool = True) -> tuple[dict[str, list], EncodeStats]:
    from tqdm.auto import tqdm

    eot = end_of_turn_ids(tokenizer)
    stats = EncodeStats()
    cols: dict[str, list] = {"input_ids": [], "labels": []}
    for ex in tqdm(examples, desc="tokenizing", disable=not progress or len(examples) < 200, unit="ex"):
        enc = encode(tokenizer, ex, max_length, loss_on, truncation, eot)
        cols["input_ids"].append(enc.input_ids)
        cols["labels"].append(enc.labels)
        stats.n += 1
        stats.truncated += int(enc.truncated)
        stats.max_tokens_cut = max(stats.max_tokens_cut, enc.facts_tokens_cut)
        stats.total_tokens += len(enc.input_ids)
        stats.loss_tokens += sum(1 for x in enc.labels if x != IGNORE)
    return cols, stats
