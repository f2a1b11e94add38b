"""Read the reference study's Weights & Biases exports (../shared/data/seed_runs layout).

    <dir>/history/lr<lr>_r<rank>_<lora|full>_<size>.csv         per-step training history of one run
    <dir>/history*/lr<lr>_r<rank>_nnodes<N>[_zeroK]_<m>_<size>.csv  the same config run on N nodes (scaling)
    <dir>/history*/<run>_checkpoint-<step>_<date>.csv             an *evaluation* of that run's checkpoint
    <dir>/history*/<Model>-<size>-Instruct_<date>.csv             an evaluation of the base model
    <dir>/history*/grid_..._checkpoint-<step>_<date>.csv          a batch evaluation, columns <run>/mcq_N_choices/..
    <dir>/swiss_judgment_eval_results.csv                         name, eval_accuracy, ... (SJP, one row a run)
    <dir>/lexam_eval_results.csv                                  wide: one row per eval run, mcq_N_choices/...
    <dir>/all_runs_parsed.csv                                     name, state (finished/crashed/running)

Files are recognised by name and columns, not by folder, so a bare `history/` folder works too.

Decisions (docs/report.md explains them):
  * `_checkpoint-N` files are never training runs. They are evaluations of run checkpoint N; an evaluation of
    an intermediate checkpoint (N below the run's last logged step) is ignored, because the report compares
    final models. When several exports evaluate the same final model, the newest one wins (the study re-ran its
    grid evaluation as one batch; generation is not bit-reproducible, so older single evaluations differ by a
    few questions).
  * The study scored both SJP and LEXam by generating text and parsing it: its scores are filed under mode
    `generate` (sjp-generate, lexam_mcq4-generate, ...), never next to lexfine's loglik scores.
  * Histories whose names carry no lr/rank/method/size (early exploratory runs) are skipped with a note.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from pathlib import Path

import pandas as pd

from lexfine.report.runs import Run, make_curve, size_from_name, throughput_from_curve, to_float

_RUN = (r"lr(?P<lr>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)_r(?P<rank>\d+)(?:_nnodes(?P<nodes>\d+))?"
        r"(?:_(?P<strategy>zero\d|fsdp\d?|ddp))?_(?P<method>lora|full)_(?P<size>\d+(?:\.\d+)?[BbMm])")
RUN_FILE_RE = re.compile(rf"^(?:lr)?{_RUN[2:]}(?P<rest>.*)$")  # the leading "lr" is optional in a file name
RUN_IN_NAME_RE = re.compile(rf"(?<![A-Za-z0-9]){_RUN}(?![A-Za-z0-9])")
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
MCQ_COL_RE = re.compile(r"^(?:(?P<run>[^/]+)/)?mcq_(?P<n>\d+)_choices/(?P<metric>accuracy|correct|total)$")
STATES = {"finished": "completed", "crashed": "failed", "failed": "failed", "running": "running",
          "killed": "interrupted"}


def is_export_dir(p: Path, children: list[Path]) -> bool:
    if (p / "history").is_dir():
        return True
    return any(c.suffix == ".csv" and RUN_FILE_RE.match(c.stem) for c in children)


def _csv_files(d: Path) -> list[Path]:
    files = sorted(d.glob("*.csv"))
    for sub in sorted(d.iterdir()):
        if sub.is_dir() and sub.name.startswith("history"):
            files.extend(sorted(sub.glob("*.csv")))
    return files


def _read(path: Path) -> pd.DataFrame:
    # Read as text: an empty cell (nothing logged at that step) must stay distinct from a logged "nan" loss.
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _epoch(value: str | None) -> float:
    if not value:
        return 0.0
    f = to_float(value)
    if f is not None and math.isfinite(f):
        return f
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def canonical(m: re.Match) -> str:
    return f"lr{m.group('lr')}_r{m.group('rank')}" + (f"_nnodes{m.group('nodes')}" if m.group("nodes") else "") + (
        f"_{m.group('strategy')}" if m.group("strategy") else "") + f"_{m.group('method')}_{m.group('size')}"


class _Evals:
    """Evaluation records: (target, key) -> newest (timestamp, order, checkpoint, metrics)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[tuple[float, int, int | None, dict]]] = {}
        self._order = 0

    def add(self, target: str, key: str, metrics: dict, ts: float, checkpoint: int | None) -> None:
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if "accuracy" not in metrics:
            return
        self._order += 1
        self.records.setdefault((target, key), []).append((ts, self._order, checkpoint, metrics))

    def for_target(self, target: str, last_step: int | None = None) -> dict[str, dict[str, float]]:
        out = {}
        for (t, key), recs in sorted(self.records.items()):
            if t != target:
                continue
            usable = [r for r in recs if r[2] is None or last_step is None or r[2] >= last_step]
            if usable:
                out[key] = max(usable, key=lambda r: (r[0], r[1]))[3]
        return out


def _target_of(name: str) -> tuple[str | None, int | None]:
    """('run:<name>' | 'base:<size>' | None, checkpoint step) for the name of an eval export."""
    ckpt = CHECKPOINT_RE.search(name)
    step = int(ckpt.group(1)) if ckpt else None
    m = RUN_IN_NAME_RE.search(name) or RUN_FILE_RE.match(name)
    if m:
        return f"run:{canonical(m)}", step
    if "grid" in name.lower():
        return None, step  # a batch evaluation: its columns name the runs
    size = size_from_name(name.split("_")[0])
    return (f"base:{size}", step) if size else (None, step)


def _mcq_records(evals: _Evals, row: dict, row_name: str, ts: float) -> None:
    row_target, row_step = _target_of(row_name)
    found: dict[tuple[str | None, str], dict] = {}
    for col, val in row.items():
        m = MCQ_COL_RE.match(col)
        v = to_float(val)
        if not m or v is None:
            continue
        target = f"run:{m.group('run')}" if m.group("run") else row_target
        metrics = found.setdefault((target, f"lexam_mcq{m.group('n')}-generate"), {})
        metrics["n" if m.group("metric") == "total" else m.group("metric")] = v
    for (target, key), metrics in found.items():
        if target:
            evals.add(target, key, metrics, ts, row_step)


def _logged(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that logged a training loss (W&B also writes eval and end-of-run summary rows without one)."""
    if "train/loss" not in df.columns:
        return df.iloc[0:0]
    return df[df["train/loss"].str.strip() != ""]


def load_export(d: Path) -> tuple[list[Run], dict[str, dict[str, dict]], list[str]]:
    """Runs, base-model evals by size, and notes on what was skipped."""
    evals = _Evals()
    states: dict[str, str] = {}
    # canonical run name -> {"match", "files": [history file], "segments": [(checkpoint step, file, frame)]}
    train: dict[str, dict] = {}
    notes: list[str] = []
    for f in _csv_files(d):
        try:
            df = _read(f)
        except Exception as e:  # a broken export must not sink the whole report
            notes.append(f"{f.name}: unreadable CSV ({type(e).__name__}); skipped")
            continue
        cols = set(df.columns)
        m = RUN_FILE_RE.match(f.stem)
        if m:
            entry = train.setdefault(canonical(m), {"match": m, "files": [], "segments": []})
            ckpt = CHECKPOINT_RE.search(m.group("rest"))
            if not m.group("rest"):
                entry["files"].append((f, df))
            elif ckpt and not _logged(df).empty:
                # a run resumed from checkpoint N: its rows continue the run, they are not a run of their own
                entry["segments"].append((int(ckpt.group(1)), f, df))
        if {"name", "state"} <= cols:
            for _, row in df.iterrows():
                states[row["name"]] = STATES.get(row["state"], row["state"])
        if {"name", "eval_accuracy"} <= cols:  # SJP summary: one row per run, no timestamp
            for _, row in df.iterrows():
                evals.add(f"run:{row['name']}", "sjp-generate", {"accuracy": to_float(row["eval_accuracy"])}, 0.0,
                          None)
        if any(MCQ_COL_RE.match(c) for c in cols):
            if "name" in cols:  # a wide summary: one row per eval run
                for _, row in df.iterrows():
                    _mcq_records(evals, row.to_dict(), row["name"], _epoch(row.get("created_at")))
            else:  # one eval run's own history
                ts = max((_epoch(v) for v in df.get("_timestamp", [])), default=0.0)
                merged: dict[str, str] = {}
                for _, row in df.iterrows():
                    merged.update({k: v for k, v in row.items() if v != ""})
                _mcq_records(evals, merged, f.stem, ts)
        elif "train/loss" in cols and not m:
            notes.append(f"{f.name}: history without lr/rank/method/size in its name; skipped")

    runs = []
    for name, entry in sorted(train.items()):
        if not entry["files"] and not entry["segments"]:
            continue  # only evaluation exports of this run
        run = _load_run(name, entry, evals, states)
        if run is None:
            notes.append(f"{name}: no logged training loss; skipped")
        else:
            runs.append(run)
            if not entry["files"]:
                notes.append(f"{name}: only resumed segments (from a checkpoint) were exported; curve is partial")
    base = {}
    sizes = sorted({t.split(":", 1)[1] for (t, _k) in evals.records if t.startswith("base:")})
    for size in sizes:
        base[size] = evals.for_target(f"base:{size}")
    return runs, base, notes


def _curve_rows(df: pd.DataFrame) -> list[dict]:
    logged = _logged(df)

    def col(name: str) -> list:
        return [to_float(v) for v in logged[name]] if name in logged.columns else [None] * len(logged)

    steps = col("train/global_step")
    if all(s is None for s in steps):
        steps = [(s or 0) + 1 for s in col("_step")]
    return [{"step": s, "loss": lo if lo is not None else math.nan, "tokens": t, "lr": lr, "elapsed_s": e}
            for s, lo, t, lr, e in zip(steps, col("train/loss"), col("train/num_tokens"), col("train/learning_rate"),
                                       col("_runtime"))]


def _load_run(name: str, entry: dict, evals: _Evals, states: dict[str, str]) -> Run | None:
    rows: list[dict] = []
    for _f, df in entry["files"][:1]:
        rows = _curve_rows(df)
    for step, _f, df in sorted(entry["segments"], key=lambda x: x[0]):
        # keep what was logged up to the checkpoint, then what the resumed job logged after it
        rows = [r for r in rows if (r["step"] or 0) <= step] + [r for r in _curve_rows(df) if (r["step"] or 0) > step]
    if not rows:
        return None
    curve = make_curve(rows)
    m = entry["match"]
    method = m.group("method")
    last_step = int(curve["step"].max()) if curve["step"].notna().any() else None
    run_evals = evals.for_target(f"run:{name}", last_step)
    # The history's own eval/accuracy column is the SJP score logged at the end of training.
    for _f, df in entry["files"][:1]:
        if "eval/accuracy" in df.columns and "sjp-generate" not in run_evals:
            acc = [to_float(v) for v in df["eval/accuracy"] if v.strip()]
            if acc:
                run_evals["sjp-generate"] = {"accuracy": acc[-1]}
    path = entry["files"][0][0] if entry["files"] else entry["segments"][0][1]
    return Run(
        name=name,
        source="wandb",
        path=str(path),
        method=method,
        rank=int(m.group("rank")) if method == "lora" else None,  # full runs carry a dummy r1 in their name
        lr=float(m.group("lr")),
        size=size_from_name(m.group("size")),
        curve=curve,
        evals=run_evals,
        status=states.get(name),
        tokens_per_s=throughput_from_curve(curve),
        num_nodes=int(m.group("nodes")) if m.group("nodes") else None,
        strategy=m.group("strategy"),
        # the study's runs share one training identity apart from lr, rank and method (and launch)
        group=("wandb", size_from_name(m.group("size")), "study" if method == "lora" else None),
    )
