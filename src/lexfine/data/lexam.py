"""LEXam multiple-choice questions (Fan et al. 2025): rows from the hub (`LEXam-Benchmark/LEXam`, configs
`mcq_{4,8,16,32}_choices`, split test), a local folder of `mcq_N_choices_test.jsonl` files, one file, or the
bundled sample (`bundled:lexam_mcq4_sample`).

Columns: question, choices (a list, or on the hub a string holding a Python list literal), gold (0-based index, a
digit string or the answer letter), course, language (de/en), area, jurisdiction, year, id.

Two prompts, both built as an `Example` so that evaluation truncates them with the same code as training
(`masking.fit_prompt`): the question is the truncatable span, the instruction and the lettered choices survive.
  direct_example  knowledge probe for log-likelihood scoring: answer with the letter only
  cot_example     the benchmark's own chain-of-thought prompt (letters variant), answer parsed from `###X###`
"""

from __future__ import annotations

import ast
import random
import string
from pathlib import Path

from lexfine.data.example import Example
from lexfine.data.sources import LOCAL_SUFFIXES, read_local_file, read_rows
from lexfine.errors import DataError

HUB_ID = "LEXam-Benchmark/LEXam"
N_CHOICES = (4, 8, 16, 32)
BUNDLED = {4: "bundled:lexam_mcq4_sample"}
REQUIRED = ("question", "choices", "gold")

# The benchmark's MCQ prompt, letters variant (LEXam lighteval/community_tasks/lexam_mcq_evals.py, MCQ_PROMPT
# "letters"; the same text in litellm_eval.py). Kept verbatim, odd spaces included: this is the study-parity prompt.
COT_PREFIX = """You are an expert in {course_name} and address legal issues in a structured, exam-style manner.
You are given a multiple-choice question, where only one choice (e.g., {examples}, etc.) is correct.
Assume Swiss law applies unless specifically stated otherwise. If the context of the course justifies it, consider legal frameworks beyond Swiss law as well.

Please reason through the question step by step, using a chain-of-thought approach:
- Clarify the facts: Briefly restate or highlight the key facts in the question to anchor your reasoning.
- Issue Identification: What legal issue(s) arise from the facts?
- Rule Explanation: What legal rules or principles are relevant, and what are their sources (e.g., statutes, case law, doctrine)?
- Application and Reasoning: Apply the relevant rules to the facts, carefully weighing any ambiguities, exceptions, or competing interpretations.
- Eliminate Incorrect Answers: Briefly explain why each incorrect answer is wrong or less convincing.
- Conclusion: Clearly state the correct answer choice (e.g., {examples}, etc.) with a brief justification for why it best fits the legal analysis.

Format your final answer as follows:
 Correct Answer: ###{example}### 

Question:
 """
COT_SUFFIX = "\n\nAnswer:"

# The knowledge probe: no reasoning, the first answer token is the letter. Its score is read directly.
DIRECT_PREFIX = ("The following is a multiple-choice question from a law exam ({course_name}). "
                 "Exactly one choice is correct.\n\nQuestion:\n")
DIRECT_SUFFIX = "\n\nAnswer with the {kind} of the correct choice only."


def choice_labels(n: int) -> list[str]:
    """A, B, C, ... ; beyond 26 choices the benchmark's numbers variant (1, 2, ...) is used instead."""
    return list(string.ascii_uppercase[:n]) if n <= 26 else [str(i + 1) for i in range(n)]


def hub_config(n: int) -> str:
    return f"mcq_{n}_choices"


def parse_choices(value, where: str) -> list[str]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise DataError(f"{where}: `choices` is a string but not a Python list literal: {value[:60]!r}") from None
    if hasattr(value, "tolist"):  # numpy array from parquet
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: `choices` must be a non-empty list (or a string holding one), got {value!r:.60}")
    return [str(c) for c in value]


def parse_gold(value, labels: list[str], where: str) -> int:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        v = value.strip().strip("()").strip()
        if v.upper() in labels and not v.isdigit():
            return labels.index(v.upper())
        if v.isdigit():
            value = int(v)
    if isinstance(value, int) and 0 <= value < len(labels):
        return value
    raise DataError(f"{where}: gold {value!r} is neither a 0-based index below {len(labels)} nor a letter {labels[0]}..")


def normalize_row(row: dict, index: int, n_choices: int) -> dict:
    missing = [c for c in REQUIRED if c not in row]
    if missing:
        raise DataError(f"LEXam row {index} has no {missing[0]!r} column (columns: {sorted(row)}); "
                        "LEXam MCQ data needs question, choices and gold")
    where = f"LEXam row {index} (id {row.get('id')!r})"
    question = row["question"]
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where} has an empty question")
    choices = parse_choices(row["choices"], where)
    if len(choices) != n_choices:
        raise DataError(f"{where} has {len(choices)} choices but the task expects {n_choices}; "
                        f"use --task lexam_mcq{len(choices)} or the {hub_config(n_choices)} data")
    labels = choice_labels(n_choices)
    year = row.get("year")
    return {
        "id": str(row.get("id", index)),
        "question": question.strip(),
        "choices": choices,
        "gold": labels[parse_gold(row["gold"], labels, where)],
        "course": row.get("course") or "law",
        "language": row.get("language"),
        "area": row.get("area"),
        "jurisdiction": row.get("jurisdiction"),
        "year": int(year) if isinstance(year, (int, float)) or (isinstance(year, str) and year.isdigit()) else None,
    }


def default_source(n_choices: int) -> str:
    return BUNDLED.get(n_choices, HUB_ID)


def _local_file_for(folder: Path, n_choices: int, split: str | None) -> Path:
    pattern = hub_config(n_choices)
    files = sorted(f for f in folder.rglob(f"*{pattern}*") if f.is_file()
                   and any(f.name.lower().endswith(s) for s in LOCAL_SUFFIXES))
    if split and split != "all":
        files = [f for f in files if split in f.name] or files
    if not files:
        raise DataError(f"folder {str(folder)!r} has no {pattern}*.jsonl/parquet file for a {n_choices}-choice task")
    return files[0]


def read_raw(source: str | None, n_choices: int, split: str | None = None) -> list[dict]:
    source = source or default_source(n_choices)
    if source.startswith("bundled:"):
        return read_rows(source)
    p = Path(source).expanduser()
    if p.is_dir():
        return read_local_file(_local_file_for(p, n_choices, split))
    if p.is_file():
        return read_local_file(p)
    # A hub id (or a missing path, which read_rows reports in one line).
    return read_rows(source, split=split or "test", hub_config=hub_config(n_choices))


def load_rows(source: str | None, n_choices: int = 4, split: str | None = None, languages=None, areas=None,
              limit: int | None = None, seed: int = 0) -> list[dict]:
    raw = read_raw(source, n_choices, split)
    rows = [normalize_row(r, i, n_choices) for i, r in enumerate(raw)]
    if languages:
        rows = [r for r in rows if r["language"] in set(languages)]
    if areas:
        rows = [r for r in rows if r["area"] in set(areas)]
    if not rows:
        raise DataError(f"no LEXam rows in {source or default_source(n_choices)!r} "
                        f"(split={split}, languages={languages}, areas={areas}); check the data or loosen the filters")
    if limit and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
        rows.sort(key=lambda r: r["id"])
    return rows


def _choices_text(row: dict) -> str:
    return "".join(f"\n{label}. {choice}" for label, choice in zip(choice_labels(len(row["choices"])), row["choices"]))


def _meta(row: dict) -> dict:
    return {"label": row["gold"], **{k: row[k] for k in ("language", "area", "course", "jurisdiction", "year")}}


def direct_example(row: dict, system_prompt: str | None) -> Example:
    kind = "letter" if len(row["choices"]) <= 26 else "number"
    before = DIRECT_PREFIX.format(course_name=row["course"])
    after = _choices_text(row) + DIRECT_SUFFIX.format(kind=kind)
    return Example(row["id"], before, row["question"], after, row["gold"], system_prompt, [], _meta(row))


def cot_example(row: dict, system_prompt: str | None) -> Example:
    labels = choice_labels(len(row["choices"]))
    examples = ", ".join(labels[:3])
    before = COT_PREFIX.format(course_name=row["course"], examples=examples, example=labels[min(2, len(labels) - 1)])
    after = _choices_text(row) + COT_SUFFIX
    return Example(row["id"], before, row["question"], after, row["gold"], system_prompt, [], _meta(row))
