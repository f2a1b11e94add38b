"""The evaluation tasks: what data, which labels, which prompt, which groups to break results down by."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from lexfine.config import DataArgs
from lexfine.data.example import Example
from lexfine.errors import ConfigError

MODES = ("loglik", "generate")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # sjp | lexam
    n_choices: int
    groups: tuple[str, ...]  # case fields that summary.json breaks results down by (by_<field>)
    max_new_tokens: int  # generate mode default: a label word for SJP, a chain of thought for LEXam

    @property
    def labels(self) -> list[str]:
        if self.kind == "sjp":
            from lexfine.data.sjp import LABELS

            return list(LABELS)
        from lexfine.data.lexam import choice_labels

        return choice_labels(self.n_choices)

    @property
    def chance_level(self) -> float:
        return 1.0 / self.n_choices

    def default_data(self) -> str:
        if self.kind == "sjp":
            from lexfine.data.sjp import HUB_ID

            return HUB_ID
        from lexfine.data.lexam import default_source

        return default_source(self.n_choices)


TASKS: dict[str, Task] = {
    "sjp": Task("sjp", "sjp", 2, ("language", "legal_area", "year"), 16),
    **{f"lexam_mcq{n}": Task(f"lexam_mcq{n}", "lexam", n, ("language", "area"), 1024) for n in (4, 8, 16, 32)},
}


def get_task(name: str) -> Task:
    task = TASKS.get(name)
    if task is None:
        raise ConfigError(f"unknown task {name!r}; use one of: {', '.join(TASKS)}")
    return task


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown eval mode {mode!r}; use loglik (score the answers) or generate (decode and parse)")
    return mode


SPLITS = ("train", "validation", "test", "all")


def parse_task_spec(spec: str) -> tuple[Task, str | None]:
    """`sjp` -> (sjp, None); `sjp@validation` -> (sjp, "validation"): SJP on one year split, written to its own
    eval folder (eval/sjp-validation-<mode>) so that a validation and a test evaluation of one run coexist."""
    name, at, split = spec.partition("@")
    task = get_task(name)
    if at:
        if task.kind != "sjp":
            raise ConfigError(f"task {spec!r}: a @split applies to sjp (sjp@validation, sjp@test); {name} has one split, "
                              f"give it without @")
        if split not in SPLITS:
            raise ConfigError(f"task {spec!r}: unknown split {split!r}; use sjp@validation (2015-2016) or sjp@test "
                              "(2017-2020)")
    return task, split or None


def eval_key(spec: str, mode: str) -> str:
    """The eval folder / manifest key: `sjp-loglik`, `sjp-validation-loglik`, `lexam_mcq4-generate`."""
    task, split = parse_task_spec(spec)
    return f"{task.name}-{split}-{mode}" if split else f"{task.name}-{mode}"


def split_entry(entry: str, default_mode: str) -> tuple[str, str]:
    """`sjp`, `sjp:generate` or `sjp@validation[:generate]` (the forms cfg.eval accepts) -> (task spec, mode)."""
    spec, _, mode = entry.partition(":")
    task, split = parse_task_spec(spec)
    return (f"{task.name}@{split}" if split else task.name), check_mode(mode or default_mode)


@dataclass
class EvalCase:
    id: str
    example: Example  # the prompt (its `answer` is the gold label)
    gold: str
    groups: dict = field(default_factory=dict)


def _is_hub(source: str) -> bool:
    from pathlib import Path

    return (not source.startswith("bundled:") and source.count("/") == 1 and not source.startswith((".", "/", "~"))
            and not Path(source).expanduser().exists())


def default_split(task: Task, source: str) -> str:
    """Hub SJP: the official test split. Local SJP files: all rows (a held-out file is already a split)."""
    if task.kind == "sjp":
        return "test" if _is_hub(source) else "all"
    return "test"


def load_cases(task: Task, mode: str, data: str | None, data_args: DataArgs, split: str | None = None,
               limit: int | None = None, seed: int = 0) -> tuple[list[EvalCase], dict]:
    """Cases (prompt Examples + gold + group fields) and a description of the data that produced them."""
    source = data or task.default_data()
    split = split or default_split(task, source)
    if task.kind == "sjp":
        from lexfine.data import sjp

        if split not in ("train", "validation", "test", "all"):
            raise ConfigError(f"unknown SJP split {split!r}; use train, validation, test or all")
        rows = sjp.load_rows(source, split, data_args.hub_config, data_args.languages, data_args.years,
                             data_args.legal_areas, limit, seed)
        examples = sjp.to_examples(rows, data_args)
    else:
        from lexfine.data import lexam

        # The training data's language filter (SJP: de/fr/it) does not apply to LEXam (de/en).
        rows = lexam.load_rows(source, task.n_choices, split if _is_hub(source) else None, None, None, limit, seed)
        make = lexam.direct_example if mode == "loglik" else lexam.cot_example
        examples = [make(r, data_args.system_prompt) for r in rows]
    cases = [EvalCase(ex.id, ex, ex.meta["label"], {g: ex.meta.get(g) for g in task.groups}) for ex in examples]
    info = {"data": source, "split": split, "limit": limit, "seed": seed, "fingerprint": fingerprint(cases)}
    return cases, info


def fingerprint(cases: list[EvalCase]) -> str:
    """Hash of exactly what is evaluated (ids, gold labels, prompt texts): the data part of the base-score cache key."""
    h = hashlib.sha256()
    for c in cases:
        ex = c.example
        h.update(json.dumps([c.id, c.gold, ex.system, ex.context, ex.before, ex.facts, ex.after],
                            ensure_ascii=False).encode())
    return h.hexdigest()[:16]
