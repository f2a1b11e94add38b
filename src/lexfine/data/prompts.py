"""Prompt templates live in text files (bundled under data/templates/ or given as a path), not in code.

A template is plain text with `{facts}` and metadata fields `{legal_area}`, `{canton}`, `{region}`, `{year}`,
`{language}`, `{id}`. Literal braces are written `{{` and `}}`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from lexfine.errors import ConfigError

TEMPLATES = Path(__file__).parent / "templates"
FIELDS = {"facts", "legal_area", "canton", "region", "year", "language", "id"}


@dataclass(frozen=True)
class PromptTemplate:
    before: str  # format string before {facts}
    after: str  # format string after {facts}
    source: str

    def render(self, meta: dict) -> tuple[str, str]:
        values = {k: ("n/a" if meta.get(k) in (None, "") else meta.get(k)) for k in FIELDS - {"facts"}}
        return self.before.format_map(values), self.after.format_map(values)


def load_template(name_or_path: str) -> PromptTemplate:
    bundled = TEMPLATES / f"{name_or_path}.txt"
    path = bundled if bundled.is_file() else Path(name_or_path).expanduser()
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in TEMPLATES.glob("*.txt")))
        raise ConfigError(f"prompt template {name_or_path!r} not found; use one of [{available}] or a file path")
    text = path.read_text(encoding="utf-8")
    if text.endswith("\n"):
        text = text[:-1]  # the file's final newline is an editor artefact, not part of the prompt
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ConfigError(f"prompt template {str(path)!r} is malformed: {e} (write literal braces as {{{{ }}}})") from None
    unknown = sorted(set(fields) - FIELDS)
    if unknown:
        raise ConfigError(f"prompt template {str(path)!r} uses unknown field {{{unknown[0]}}}; allowed: {sorted(FIELDS)}")
    if fields.count("facts") != 1:
        raise ConfigError(f"prompt template {str(path)!r} must contain {{facts}} exactly once")
    marker = "{facts}"
    idx = text.index(marker)
    return PromptTemplate(text[:idx], text[idx + len(marker) :], str(path))
