"""One training/evaluation example, before tokenization.

The last user message is split around a *truncatable* span (`facts`), so that a too-long example can lose
part of its facts while keeping its instruction (`before`, `after`) and its answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    id: str
    before: str  # user text before the facts (instruction, metadata)
    facts: str  # the span that truncation may cut
    after: str  # user text after the facts
    answer: str  # the assistant's reply that carries the loss
    system: str | None = None
    context: list[dict] = field(default_factory=list)  # earlier turns of a multi-turn chat
    meta: dict = field(default_factory=dict)  # label, language, year, legal area, ... (evaluation groups)

    def messages(self, facts: str | None = None, with_answer: bool = False) -> list[dict]:
        msgs: list[dict] = []
        if self.system is not None:
            msgs.append({"role": "system", "content": self.system})
        msgs.extend(self.context)
        user = self.before + (self.facts if facts is None else facts) + self.after
        msgs.append({"role": "user", "content": user})
        if with_answer:
            msgs.append({"role": "assistant", "content": self.answer})
        return msgs
