"""Generic chat data: `messages` rows (the last assistant turn is the answer) or prompt/completion rows."""

from __future__ import annotations

import random

from lexfine.config import DataArgs
from lexfine.data.example import Example
from lexfine.errors import DataError

ROLES = {"system", "user", "assistant", "tool"}


def _text(value, where: str) -> str:
    if isinstance(value, list):  # conversational prompt/completion: a list of messages
        raise DataError(f"{where}: use the `messages` format for multi-message prompts")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where} is empty; every example needs non-empty text")
    return value


def from_messages(row: dict, index: int, system_prompt: str | None) -> Example:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"row {index}: `messages` must be a non-empty list of {{role, content}}")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or "content" not in m:
            raise DataError(f"row {index}: bad message {m!r}; each needs role in {sorted(ROLES)} and content")
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2 or msgs[-2]["role"] != "user":
        raise DataError(f"row {index}: the conversation must end with a user turn followed by an assistant turn")
    answer = _text(msgs[-1]["content"], f"row {index} assistant answer")
    user = _text(msgs[-2]["content"], f"row {index} user turn")
    context = [dict(role=m["role"], content=m["content"]) for m in msgs[:-2]]
    system = system_prompt
    if context and context[0]["role"] == "system":
        system = context.pop(0)["content"]
    return Example(str(row.get("id", index)), "", user, "", answer, system, context, {"label": answer})


def from_prompt_completion(row: dict, index: int, system_prompt: str | None) -> Example:
    for col in ("prompt", "completion"):
        if col not in row:
            raise DataError(f"row {index} has no {col!r} column (columns: {sorted(row)}); "
                            "prompt/completion data needs both")
    prompt = _text(row["prompt"], f"row {index} prompt")
    completion = _text(row["completion"], f"row {index} completion")
    return Example(str(row.get("id", index)), "", prompt, "", completion, system_prompt, [], {"label": completion})


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row and "label" in row:
        return "sjp"
    raise DataError(
        f"cannot tell the data format from columns {sorted(row)}; expected `messages`, `prompt`+`completion` "
        "or SJP's text+label (or set data.format)"
    )


def to_examples(rows: list[dict], fmt: str, args: DataArgs, seed: int = 0) -> list[Example]:
    make = from_messages if fmt == "chat" else from_prompt_completion
    examples = [make(r, i, args.system_prompt) for i, r in enumerate(rows)]
    if args.limit and args.limit < len(examples):
        examples = random.Random(seed).sample(examples, args.limit)
    return examples
