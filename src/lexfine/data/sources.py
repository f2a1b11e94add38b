"""Read rows from a local file or folder, a bundled sample, or a Hugging Face hub dataset: one code path after."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from lexfine.errors import DataError

BUNDLED_DIR = Path(__file__).parent / "bundled"
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz", ".jsonl.xz")


def bundled_names() -> list[str]:
    return sorted(p.name.split(".")[0] for p in BUNDLED_DIR.glob("*.jsonl.gz"))


def _suffix(p: Path) -> str:
    name = p.name.lower()
    for s in sorted(LOCAL_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return p.suffix.lower()


def read_local_file(path: Path) -> list[dict]:
    import pandas as pd

    suffix = _suffix(path)
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(path)
        elif suffix in (".jsonl", ".jsonl.gz", ".jsonl.xz"):
            import lzma

            opener = gzip.open if suffix.endswith(".gz") else lzma.open if suffix.endswith(".xz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        elif suffix in (".json", ".json.gz"):
            opener = gzip.open if suffix.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict):  # {"data": [...]} or {split: [...]}
                data = next((v for v in data.values() if isinstance(v, list)), None)
            if not isinstance(data, list):
                raise DataError(f"{path}: a .json file must hold a list of rows")
            return data
        elif suffix in (".csv", ".csv.gz"):
            df = pd.read_csv(path)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use parquet, jsonl, json or csv")
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    # pandas NaN -> None so that downstream checks see missing values as missing
    return [{k: (None if _is_nan(v) else v) for k, v in r.items()} for r in df.to_dict(orient="records")]


def _is_nan(v) -> bool:
    return isinstance(v, float) and v != v


def read_rows(source: str, split: str | None = None, hub_config: str | None = None) -> list[dict]:
    """Rows as dicts. `split` only selects a hub split; year-based splits are applied by the caller."""
    if source.startswith("bundled:"):
        name = source.split(":", 1)[1]
        path = BUNDLED_DIR / f"{name}.jsonl.gz"
        if not path.is_file():
            raise DataError(f"unknown bundled data {source!r}; available: {', '.join(bundled_names())}")
        return read_local_file(path)
    p = Path(source).expanduser()
    if p.is_file():
        return read_local_file(p)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _suffix(f) in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"folder {source!r} holds no parquet/jsonl/json/csv files")
        rows: list[dict] = []
        for f in files:
            rows.extend(read_local_file(f))
        return rows
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise DataError(f"data file not found: {source!r} (give an existing path, a hub id org/name or bundled:<name>)")
    return read_hub(source, split, hub_config)


def read_hub(repo_id: str, split: str | None, config: str | None) -> list[dict]:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise DataError("reading hub datasets needs the `datasets` package: pip install datasets") from None
    hub_split = None if split in (None, "all") else split
    try:
        ds = datasets.load_dataset(repo_id, config, split=hub_split)
    except Exception as e:  # network, missing config, missing split: the message says which
        raise DataError(f"cannot load hub dataset {repo_id!r} (config={config}, split={split}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(ds, datasets.DatasetDict):
        return [row for name in ds for row in ds[name]]
    return list(ds)
