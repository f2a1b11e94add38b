"""Swiss Judgment Prediction: rows from the hub (`rcds/swiss_judgment_prediction`) or local files.

Columns as on the hub: id, year, text (facts), label (0/1 or "dismissal"/"approval"), language, region,
canton, `legal area` (with a space), source_language. The official split is by year; a year filter (split or
data.years) refuses data with rows that have no year (check_years), split=all takes every row.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from lexfine.config import DataArgs
from lexfine.data.example import Example
from lexfine.data.prompts import load_template
from lexfine.data.sources import read_rows
from lexfine.errors import DataError

HUB_ID = "rcds/swiss_judgment_prediction"
LABELS = ("dismissal", "approval")  # index = the hub's integer label
SPLIT_YEARS = {
    "train": range(2000, 2015),
    "validation": range(2015, 2017),
    "test": range(2017, 2021),
}
REQUIRED = ("text", "label")


def normalize_label(value) -> str:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return LABELS[int(value)]
    if isinstance(value, str):
        v = value.strip().lower()
        if v in LABELS:
            return v
        if v in ("0", "1"):
            return LABELS[int(v)]
    if isinstance(value, (list, tuple)) and len(value) == 1:  # e.g. judgment: ["dismissal"]
        return normalize_label(value[0])
    raise DataError(f"unknown SJP label {value!r}; expected 0/1 or 'dismissal'/'approval'")


def normalize_row(row: dict, index: int) -> dict:
    missing = [c for c in REQUIRED if c not in row]
    if missing:
        raise DataError(
            f"SJP row {index} has no {missing[0]!r} column (columns: {sorted(row)}); "
            "SJP data needs text and label (+ optional year, language, legal area)"
        )
    text = row["text"]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"SJP row {index} (id {row.get('id')!r}) has empty text; remove it or fix the file")
    area = row.get("legal area", row.get("legal_area"))
    year = row.get("year")
    return {
        "id": str(row.get("id", index)),
        "text": text,
        "label": normalize_label(row["label"]),
        "year": int(year) if year not in (None, "") else None,
        "language": row.get("language"),
        "legal_area": area,
        "region": row.get("region"),
        "canton": row.get("canton"),
    }


# The hub repository is a loading script (which datasets >= 4 no longer runs) beside its data files: read the files.
HUB_FILES = {"train": "train.jsonl.xz", "validation": "val.jsonl.xz", "test": "test.jsonl.xz"}


def read_hub_files(split: str = "all", hub_config: str | None = None) -> list[dict]:
    from huggingface_hub import hf_hub_download

    from lexfine.data.sources import read_local_file

    if hub_config not in (None, "all", "de", "fr", "it"):
        raise DataError(f"unknown SJP hub config {hub_config!r}; use de, fr, it or all")
    rows: list[dict] = []
    for name in ([split] if split != "all" else list(HUB_FILES)):
        try:
            path = hf_hub_download(HUB_ID, HUB_FILES[name], repo_type="dataset")
        except Exception as e:  # offline, no access: the message says which
            raise DataError(f"cannot download {HUB_ID}/{HUB_FILES[name]}: {str(e).splitlines()[0]} "
                            "(offline? give a local copy with data.train=<path>)") from None
        rows.extend(read_local_file(Path(path)))
    if hub_config in ("de", "fr", "it"):
        rows = [r for r in rows if r.get("language") == hub_config]
    return rows


def load_rows(source: str, split: str = "all", hub_config: str | None = None, languages=None, years=None,
              legal_areas=None, limit: int | None = None, seed: int = 0) -> list[dict]:
    is_hub = not source.startswith("bundled:") and source.count("/") == 1 and not source.startswith((".", "/"))
    if source == HUB_ID:
        raw = read_hub_files(split, hub_config)
    else:
        raw = read_rows(source, split=split if is_hub else None, hub_config=hub_config)
    rows = [normalize_row(r, i) for i, r in enumerate(raw)]
    if years:
        keep_years = set(years)
    elif split != "all" and not is_hub:
        keep_years = set(SPLIT_YEARS[split])
    else:
        keep_years = None
    if keep_years is not None:
        check_years(rows, source, split, years)
        rows = [r for r in rows if r["year"] in keep_years]
    if languages:
        rows = [r for r in rows if r["language"] in set(languages)]
    if legal_areas:
        rows = [r for r in rows if r["legal_area"] in set(legal_areas)]
    if not rows:
        raise DataError(
            f"no SJP rows left in {source!r} after filters (split={split}, years={years}, languages={languages}, "
            f"legal_areas={legal_areas}); loosen the filters"
        )
    if limit and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
        rows.sort(key=lambda r: r["id"])
    return rows


def check_years(rows: list[dict], source: str, split: str, years) -> None:
    """A year filter (a split's years, or data.years) cannot place a row without a year: refuse rather than keep it
    in every split (it would be trained on and tested on) or drop it unseen."""
    missing = sum(r["year"] is None for r in rows)
    if missing:
        asked = f"data.years={list(years)}" if years else f"split={split}"
        raise DataError(
            f"{missing} of {len(rows)} SJP rows in {source!r} have no year, so {asked} cannot place them; "
            "add a year column, drop those rows, or use split=all (data.split=all: a file that is already a split)"
        )


def to_examples(rows: list[dict], args: DataArgs) -> list[Example]:
    template = load_template(args.prompt_template)
    out = []
    for r in rows:
        before, after = template.render(r)
        meta = {k: r[k] for k in ("label", "language", "year", "legal_area", "canton", "region")}
        out.append(Example(r["id"], before, r["text"], after, r["label"], args.system_prompt, [], meta))
    return out


def load_examples(args: DataArgs, seed: int = 0) -> list[Example]:
    rows = load_rows(args.train, args.split, args.hub_config, args.languages, args.years, args.legal_areas,
                     args.limit, seed)
    return to_examples(rows, args)


def label_counts(examples: list[Example]) -> dict[str, int]:
    return dict(Counter(e.meta.get("label") for e in examples))
