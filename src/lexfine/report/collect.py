"""Load finished runs into one table, whatever they came from.

Inputs (mixable, each a folder):
  * a lexfine run directory (config.yaml + manifest.json, metrics.jsonl, eval/<task>-<mode>/summary.json);
  * a sweep directory: any folder holding run directories (searched a few levels deep) and/or a sweep.jsonl
    whose rows point at run directories elsewhere;
  * a folder of Weights & Biases exports in the reference study's format (see wandb_export.py).

Everything downstream (findings, plots, report) sees only `Run` objects, so a new source is one loader here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lexfine.errors import LexfineError
from lexfine.report import wandb_export
from lexfine.report.runs import (Run, RunSet, headline, make_curve, size_from_name, size_from_params,
                                 size_sort_key, throughput_from_curve, to_float)
from lexfine.report.sizes import model_size
from lexfine.rundir import RunDir
from lexfine.runlock import effective_status

# Folders inside a run directory that never hold runs: do not walk into them (checkpoints can be huge).
_SKIP_DIRS = {"checkpoints", "eval", "adapter", "model", "__pycache__"}
_MAX_DEPTH = 4


# ------------------------------------------------------------------------------------------------
# lexfine run directories


def is_run_dir(p: Path) -> bool:
    return (p / "config.yaml").is_file() and (p / "manifest.json").is_file()


def _dig(tree: dict, dotted: str, default: Any = None) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _read_config(path: Path) -> dict:
    """The resolved config as a plain dict, RunConfig defaults filled in.

    Validated with RunConfig when possible; a config written by a newer lexfine (unknown keys) is still read
    as plain YAML, since a report must not refuse old or new runs.
    """
    from lexfine.config import RunConfig

    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise LexfineError(f"{str(path)!r} is not a config mapping; is this a lexfine run directory?")
    try:
        return RunConfig.model_validate(raw).model_dump(mode="json")
    except Exception:
        defaults = RunConfig().model_dump(mode="json")
        for k, v in raw.items():
            if isinstance(v, dict) and isinstance(defaults.get(k), dict):
                defaults[k] = {**defaults[k], **v}
            else:
                defaults[k] = v
        return defaults


_SETTINGS = ("data", "split", "limit")


def _read_evals(run_path: Path, manifest: dict, settings: dict[str, dict]) -> dict[str, dict[str, float]]:
    evals: dict[str, dict[str, float]] = {}
    for key, entry in sorted((manifest.get("evals") or {}).items()):
        if isinstance(entry, dict):
            evals[key] = headline(entry)
    # summary.json files are the source of truth; the manifest may lag behind an eval that was run later
    eval_root = run_path / "eval"
    if eval_root.is_dir():
        for summary in sorted(eval_root.glob("*/summary.json")):
            try:
                data = json.loads(summary.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(data, dict):
                evals[summary.parent.name] = {**evals.get(summary.parent.name, {}), **headline(data)}
                if isinstance(data.get("settings"), dict):
                    settings[summary.parent.name] = {k: data["settings"].get(k) for k in _SETTINGS}
    return evals


def load_run_dir(path: Path) -> Run:
    try:
        cfg = _read_config(path / "config.yaml")
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: bytes that are not UTF-8
        raise LexfineError(f"cannot read run directory {str(path)!r}: {' '.join(str(e).split())}") from None
    manifest = RunDir(path).manifest()  # a one-line LexfineError when it is not a JSON object
    rows = []
    nonfinite = 0
    mpath = path / "metrics.jsonl"
    if mpath.is_file():
        for line in mpath.read_text().splitlines():
            try:
                r = json.loads(line)  # json accepts NaN/Infinity; rundir writes them as null
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if not isinstance(r, dict) or "step" not in r or "loss" not in r:
                continue  # eval_during rows (eval/ keys, no loss) are read by report/eval_curves.py
            loss = r.get("loss", math.nan)
            value = to_float(loss)
            if r.get("nonfinite") or value is None or not math.isfinite(value):
                nonfinite += 1  # a null loss is how rundir stores a non-finite one; `nonfinite` names the fields
            rows.append({
                "step": r.get("step"),
                # null is how rundir stores a non-finite loss: keep it as NaN so the run counts as diverged
                "loss": math.nan if loss is None else loss,
                "tokens": r.get("num_tokens"),
                "lr": r.get("learning_rate"),
                "elapsed_s": r.get("elapsed_s"),
            })
    curve = make_curve(rows)
    hw = manifest.get("hardware") or {}
    method = str(cfg.get("method") or "lora")
    model = cfg.get("model")
    size = model_size(cfg, manifest)
    launch = cfg.get("launch") or {}
    tps = to_float(manifest.get("tokens_per_s"))
    from lexfine.report.identity import group_identity, group_key

    eval_settings: dict[str, dict] = {}
    evals = _read_evals(path, manifest, eval_settings)
    base = {k: v for k, v in sorted((manifest.get("base_evals") or {}).items()) if isinstance(v, dict)}
    return Run(
        name=path.name,
        source="lexfine",
        path=str(path),
        method=method,
        rank=int(_dig(cfg, "lora.r")) if method == "lora" and _dig(cfg, "lora.r") is not None else None,
        lr=to_float(_dig(cfg, "train.lr")),
        seed=_dig(cfg, "train.seed"),
        size=size,
        curve=curve,
        model=model,
        evals=evals,
        base_evals={k: headline(v) for k, v in base.items()},
        base_settings={k: {s: v["settings"].get(s) for s in _SETTINGS} for k, v in base.items()
                       if isinstance(v.get("settings"), dict)},
        eval_settings=eval_settings,
        status=effective_status(path, manifest),  # a killed run reads `dead`, not `running`
        tokens_per_s=tps if tps and tps > 0 else throughput_from_curve(curve),
        world_size=manifest.get("world_size") or hw.get("world_size") or launch.get("num_processes"),
        num_nodes=manifest.get("num_nodes") or hw.get("num_nodes") or launch.get("num_machines"),
        gpu=hw.get("gpu_name"),
        strategy=launch.get("strategy") if launch.get("strategy") not in (None, "none") else None,
        group=("lexfine", *group_key(cfg)),
        identity=_identity(group_identity(cfg)),
        random_weights=str(model or "").startswith("random:"),
        nonfinite_steps=nonfinite,
    )


def _identity(parts: tuple[dict, dict | None]) -> dict:
    shared, lora = parts
    return {**shared, "lora": lora} if lora is not None else shared


# ------------------------------------------------------------------------------------------------
# Discovery


def _listdir(p: Path) -> list[Path]:
    try:
        return sorted(p.iterdir())
    except PermissionError:
        raise LexfineError(f"cannot read folder {str(p)!r}: permission denied") from None
    except OSError as e:
        raise LexfineError(f"cannot read folder {str(p)!r}: {e.strerror or e}") from None


def _sweep_jsonl_dirs(sweep_file: Path) -> list[Path]:
    """Run directories named by a sweep.jsonl (rows: run_id, status, job id, and maybe run_dir/path)."""
    out = []
    try:
        lines = sweep_file.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        for key in ("run_dir", "path", "dir"):
            if row.get(key):
                p = Path(row[key])
                p = p if p.is_absolute() else sweep_file.parent / p
                if is_run_dir(p):
                    out.append(p)
                break
    return out


def _discover(p: Path, run_dirs: list[Path], wandb_dirs: list[Path], depth: int) -> None:
    if is_run_dir(p):
        run_dirs.append(p)
        return
    children = _listdir(p)
    if wandb_export.is_export_dir(p, children):
        wandb_dirs.append(p)
        return
    if (p / "sweep.jsonl").is_file():
        run_dirs.extend(_sweep_jsonl_dirs(p / "sweep.jsonl"))
    if depth >= _MAX_DEPTH:
        return
    for c in children:
        if c.is_dir() and not c.name.startswith(".") and c.name not in _SKIP_DIRS:
            _discover(c, run_dirs, wandb_dirs, depth + 1)


def collect(inputs: list[str | Path]) -> RunSet:
    """Load every run under `inputs` (run dirs, sweep dirs, W&B export folders, mixed)."""
    if not inputs:
        raise LexfineError("no inputs given: pass run directories, sweep directories or W&B export folders")
    run_dirs: list[Path] = []
    wandb_dirs: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_file() and p.name == "sweep.jsonl":
            p = p.parent
        if not p.exists():
            raise LexfineError(f"input not found: {str(item)!r} (give a run directory, a sweep directory "
                               "or a folder of W&B exports)")
        if not p.is_dir():
            raise LexfineError(f"input {str(item)!r} is a file; give the folder that holds the runs")
        _discover(p, run_dirs, wandb_dirs, 0)

    runs: list[Run] = []
    notes: list[str] = []
    base: dict[str, dict[str, dict[str, float]]] = {}
    seen: set[Path] = set()
    for d in run_dirs:
        key = d.resolve()
        if key in seen:  # the same run reached through two inputs (a sweep dir and its run dir) counts once
            continue
        seen.add(key)
        run = load_run_dir(d)
        if run.curve.empty:
            notes.append(f"{d.name}: no logged steps (status {run.status or 'unknown'}); left out")
            continue
        runs.append(run)
    for d in wandb_dirs:
        w_runs, w_base, w_notes = wandb_export.load_export(d)
        runs.extend(w_runs)
        notes.extend(w_notes)
        for size, evals in w_base.items():
            base.setdefault(size, {}).update(evals)

    if not runs:
        shown = ", ".join(repr(str(i)) for i in inputs)
        raise LexfineError(
            f"no runs found in {shown}: expected lexfine run directories (config.yaml + manifest.json + "
            "metrics.jsonl), sweep folders, or W&B exports (history/lr<lr>_r<rank>_<lora|full>_<size>.csv)")
    _unique_names(runs)
    # Base-model scores: a lexfine run carries its own base's scores; they fill what W&B exports lack.
    for r in sorted(runs, key=lambda r: r.name):
        for key, metrics in r.base_evals.items():
            base.setdefault(r.size or "unknown", {}).setdefault(key, metrics)
    runs.sort(key=lambda r: (size_sort_key(r.size or "unknown"), r.method, r.rank or 0, r.lr or 0.0, r.name))
    return RunSet(runs=runs, base_evals=base, notes=notes, inputs=[str(i) for i in inputs])


def _unique_names(runs: list[Run]) -> None:
    """Names key the findings; two inputs may hold runs of the same name: suffix the later ones."""
    counts: dict[str, int] = {}
    for r in runs:
        n = counts.get(r.name, 0) + 1
        counts[r.name] = n
        if n > 1:
            r.name = f"{r.name}#{n}"


def runs_table(runset: RunSet) -> pd.DataFrame:
    """One row per run: the normalised table (handy in notebooks; the report itself uses `Run` objects)."""
    rows = []
    for r in runset.runs:
        row = {
            "name": r.name, "source": r.source, "size": r.size, "method": r.method, "rank": r.rank, "lr": r.lr,
            "status": r.status, "steps": len(r.curve), "tokens_per_s": r.tokens_per_s,
            "world_size": r.world_size, "num_nodes": r.num_nodes, "gpu": r.gpu, "strategy": r.strategy,
        }
        for key, metrics in sorted(r.evals.items()):
            for m, v in sorted(metrics.items()):
                row[f"{key}/{m}"] = v
        rows.append(row)
    return pd.DataFrame(rows)
