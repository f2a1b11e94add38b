"""Sweep files: a base config, a grid and tied groups -> a validated, deduplicated list of runs.

    # lexfine sweep plan configs/sweep/tiny_cpu.yaml
    name: tiny                      # sweep name: prefix of every run name, folder <output_dir>/<name>/
    output_dir: sweeps              # parent of the sweep folder (default: sweeps)
    base_config: ../exp/x.yaml      # a config file, relative to this file ... or `base:` an inline config
    overrides: [train.max_steps=2]  # dotted overrides applied to the base (list of k=v or a mapping)
    eval: [sjp, lexam_mcq4]         # evaluations after each training (default: the base config's);
                                    # sjp@validation / sjp@test: SJP on one year split (select / report)
    global_batch: 128               # (optional) grad_accum derived per run so batch x accum x processes = 128
                                    # on any GPU count (sweep/batch.py); a count that does not divide it fails
    grid:                           # Cartesian product over dotted keys -> lists of values
      train.lr: [1.0e-4, 1.0e-3]
    variants:                       # tied groups: keys that vary together. One entry = one group of runs;
      - {method: lora, lora.r: [8, 16]}            # a list inside an entry is that entry's own sub-grid
      - {method: full, train.lr: [1.0e-6, 1.0e-5]}
    tied:                           # (optional) zipped keys: one run per position, lists of equal length
      train.batch_size: [4, 8]
      train.grad_accum: [8, 4]

Runs = variants x tied x grid. Keys that do nothing for a run (lora.* for method full) are dropped, and runs
with the same run id (same training config) are merged. Every run is validated before anything runs.
"""

from __future__ import annotations

import copy
import itertools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from lexfine.config import RunConfig, load_yaml, parse_override, read_utf8, set_dotted, validate
from lexfine.errors import ConfigError
from lexfine.sweep.names import fmt_value, run_name

TOP_KEYS = ("name", "description", "output_dir", "base", "base_config", "overrides", "eval", "global_batch", "grid",
            "variants", "tied")
# Set once per sweep, not per run: grid/variants must not touch them.
RESERVED = {"name": "the sweep's `name:`", "output_dir": "the sweep's `output_dir:`", "eval": "the sweep's `eval:`"}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# ----------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class PlannedRun:
    index: int
    """1-based position in the sweep."""
    name: str
    run_id: str
    config: RunConfig
    assignment: dict[str, Any]
    """The dotted keys this sweep set for this run (from grid, variants and tied groups)."""

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir()

    def describe(self) -> str:
        return " ".join(f"{k}={fmt_value(v)}" for k, v in self.assignment.items()) or "(base config)"


@dataclass
class Sweep:
    name: str
    output_dir: Path
    runs: list[PlannedRun]
    eval: list[str]
    source: Path | None = None
    text: str | None = None
    """The sweep file as written (copied to <sweep_dir>/sweep.yaml)."""
    merged: int = 0
    """Expanded combinations dropped because another run has the same run id."""
    keys: list[str] = field(default_factory=list)
    """Every key the sweep varies."""
    global_batch: int | None = None
    """Sequences per optimizer step for every run, whatever the GPU count (sweep/batch.py)."""

    @property
    def sweep_dir(self) -> Path:
        return self.output_dir / self.name

    def find(self, pattern: str) -> list[PlannedRun]:
        import fnmatch

        return [r for r in self.runs if fnmatch.fnmatch(r.run_id, pattern) or fnmatch.fnmatch(r.name, pattern)
                or r.run_id == pattern or str(r.index) == pattern]


# ----------------------------------------------------------------------------------------------
# Reading


class _UniqueKeyLoader(yaml.SafeLoader):
    """A repeated key in one mapping is a conflict (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice in one mapping (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}): conflicting values, keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_sweep_file(path: str | Path) -> tuple[dict, str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {str(path)!r} (e.g. configs/sweep/tiny_cpu.yaml)")
    text = read_utf8(p, "sweep file")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ConfigError as e:
        raise ConfigError(f"sweep file {str(path)!r}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {str(path)!r} must hold a mapping (base:, grid:, ...), not {type(data).__name__}")
    return data, text


def load_sweep(path: str | Path) -> Sweep:
    data, text = read_sweep_file(path)
    p = Path(path)
    try:
        sweep = expand(data, base_dir=p.parent, default_name=p.stem)
    except ConfigError as e:
        raise ConfigError(f"sweep {str(path)!r}: {e}") from None
    sweep.source, sweep.text = p, text
    return sweep


# ----------------------------------------------------------------------------------------------
# Keys


def _is_model(ann) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def key_kind(key: str, where: str) -> str:
    """'leaf' for a config field, 'section' for a sub-model, 'item' for a key inside a dict-valued field.
    An unknown key is a one-line error naming the keys allowed at that level."""
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"{where}: empty part in key {key!r}")
    model: type[BaseModel] = RunConfig
    for i, part in enumerate(parts):
        f = model.model_fields.get(part)
        if f is None:
            at = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"{where}: unknown config key {key!r}; allowed under {at}: {', '.join(model.model_fields)}")
        ann = f.annotation
        last = i == len(parts) - 1
        if _is_model(ann):
            if last:
                return "section"
            model = ann
            continue
        if last:
            return "leaf"
        if typing.get_origin(ann) is dict:
            return "item"
        raise ConfigError(f"{where}: {'.'.join(parts[:i + 1])!r} is a value, it has no key {parts[i + 1]!r} (in {key!r})")
    return "leaf"  # pragma: no cover


def flatten(mapping: dict, where: str, prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 8}, 'train.lr': 1e-4} -> {'lora.r': 8, 'train.lr': 1e-4}; the same key twice with two
    values (dotted and nested) is a conflict."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if not isinstance(k, str):
            raise ConfigError(f"{where}: keys are dotted config keys, not {k!r}")
        key = prefix + k
        if key.split(".")[0] in RESERVED:
            raise ConfigError(f"{where}: {key!r} cannot vary per run; set it once with {RESERVED[key.split('.')[0]]}")
        kind = key_kind(key, where)
        if kind == "section":
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: {key!r} is a config section; give its keys, e.g. {key}.{next(iter(_fields(key)))}")
            items = flatten(v, where, key + ".")
        else:
            items = {key: v}
        for kk, vv in items.items():
            if kk in out and out[kk] != vv:
                raise ConfigError(f"{where}: conflicting values for {kk!r}: {out[kk]!r} and {vv!r}")
            out[kk] = vv
    keys = sorted(out)
    for a, b in zip(keys, keys[1:]):
        if b.startswith(a + "."):
            raise ConfigError(f"{where}: {a!r} and {b!r} overlap; give one of them")
    return out


def _fields(section: str) -> list[str]:
    model: Any = RunConfig
    for part in section.split("."):
        model = model.model_fields[part].annotation
    return list(model.model_fields)


# ----------------------------------------------------------------------------------------------
# Expansion


def _base_tree(data: dict, base_dir: Path | None) -> dict:
    if "base" in data and "base_config" in data:
        raise ConfigError("give either base: (an inline config) or base_config: (a path), not both")
    if "base_config" in data:
        ref = data["base_config"]
        if not isinstance(ref, str) or not ref:
            raise ConfigError(f"base_config must be a path to a config YAML, not {ref!r}")
        p = Path(ref).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        tree = load_yaml(p)
    else:
        tree = data.get("base") or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"base must be a mapping of config keys, not {type(tree).__name__}")
    tree = copy.deepcopy(tree)
    ov = data.get("overrides") or []
    if isinstance(ov, dict):
        for k, v in flatten(ov, "overrides").items():
            set_dotted(tree, k.split("."), v)
    elif isinstance(ov, list):
        for item in ov:
            if not isinstance(item, str):
                raise ConfigError(f"overrides: items are KEY=VALUE strings, not {item!r}")
            path, value = parse_override(item)
            key_kind(".".join(path), "overrides")
            set_dotted(tree, path, value)
    else:
        raise ConfigError(f"overrides must be a list of KEY=VALUE strings or a mapping, not {ov!r}")
    try:
        validate({**tree, "name": "base"})
    except ConfigError as e:
        raise ConfigError(f"base config: {e}") from None
    return tree


def _sub_grid(entry: dict, where: str) -> list[dict]:
    lists = {k: v for k, v in entry.items() if isinstance(v, list)}
    for k, v in lists.items():
        if not v:
            raise ConfigError(f"{where}: {k!r} has an empty list")
    out = []
    for combo in itertools.product(*lists.values()):
        chosen = dict(zip(lists, combo))
        out.append({k: chosen.get(k, v) for k, v in entry.items()})
    return out


def _check_full_entry(alt: dict, base_method: str, where: str) -> None:
    if alt.get("method", base_method) == "full":
        lora = [k for k in alt if k.startswith("lora.")]
        if lora:
            raise ConfigError(f"{where}: conflicting tied values: method full with {lora[0]}={alt[lora[0]]!r} "
                              "(LoRA keys do nothing for full fine-tuning; drop them)")


def _axes(data: dict, base_method: str) -> tuple[list[list[dict]], list[str]]:
    grid = data.get("grid")
    if grid is not None and not isinstance(grid, dict):
        raise ConfigError(f"grid must map dotted keys to lists of values, not {type(grid).__name__}")
    grid_flat = flatten(grid or {}, "grid")
    for k, v in grid_flat.items():
        if not isinstance(v, list):
            raise ConfigError(f"grid: {k!r} must map to a list of values, not {v!r} (one value: put it in overrides:)")
        if not v:
            raise ConfigError(f"grid: {k!r} has an empty list; give at least one value")

    variants, tied = data.get("variants"), data.get("tied")
    if isinstance(tied, list):
        if variants is not None:
            raise ConfigError("give tied groups either as variants: (a list) or tied: (a mapping), not both lists")
        variants, tied = tied, None
    axes: list[list[dict]] = []
    group_keys: dict[str, str] = {}
    if variants is not None:
        if not isinstance(variants, list) or not variants:
            raise ConfigError("variants must be a non-empty list of mappings, e.g. [{method: full, train.lr: [1e-5]}]")
        alts: list[dict] = []
        for i, entry in enumerate(variants):
            where = f"variants[{i}]"
            if not isinstance(entry, dict) or not entry:
                raise ConfigError(f"{where} must be a non-empty mapping of keys, not {entry!r}")
            flat = flatten(entry, where)
            for k in flat:
                if k in grid_flat:
                    raise ConfigError(f"{where}: {k!r} is also a grid key; vary it in one place "
                                      "(a list inside a variant is that variant's own sub-grid)")
                group_keys.setdefault(k, "variants")
            for alt in _sub_grid(flat, where):
                _check_full_entry(alt, base_method, where)
                alts.append(alt)
        axes.append(alts)
    if tied is not None:
        if not isinstance(tied, dict) or not tied:
            raise ConfigError("tied must map dotted keys to lists of equal length (or be a list of variants)")
        flat = flatten(tied, "tied")
        for k, v in flat.items():
            if not isinstance(v, list) or not v:
                raise ConfigError(f"tied: {k!r} must map to a non-empty list, not {v!r}")
            if k in grid_flat or k in group_keys:
                raise ConfigError(f"tied: {k!r} is also set by {'grid' if k in grid_flat else 'variants'}; vary it in one place")
        lengths = {k: len(v) for k, v in flat.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigError("conflicting tied values: tied lists differ in length ("
                              + ", ".join(f"{k}: {n}" for k, n in lengths.items()) + "); they vary together, one value per run")
        alts = [dict(zip(flat, vals)) for vals in zip(*flat.values())]
        for alt in alts:
            _check_full_entry(alt, base_method, "tied")
        axes.append(alts)
        group_keys.update({k: "tied" for k in flat})
    axes.extend([{k: v} for v in vals] for k, vals in grid_flat.items())
    if not axes:
        raise ConfigError("the sweep has no runs: grid is empty; give grid: {train.lr: [1.0e-4, 1.0e-3]} or variants:")
    return axes, [*group_keys, *grid_flat]


def expand(data: dict, base_dir: Path | None = None, default_name: str = "sweep") -> Sweep:
    """Sweep file contents -> Sweep. Raises ConfigError (one line) on any bad input, before anything runs."""
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"unknown sweep key {unknown[0]!r}; allowed: {', '.join(TOP_KEYS)}")
    name = str(data.get("name") or default_name)
    if not NAME_RE.fullmatch(name):
        name_fix = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "sweep"
        if data.get("name"):
            raise ConfigError(f"sweep name {name!r}: use letters, digits, '.', '_' or '-' (e.g. {name_fix!r})")
        name = name_fix
    output_dir = Path(str(data.get("output_dir") or "sweeps")).expanduser().absolute()
    evals = data.get("eval")
    if evals is not None and not (isinstance(evals, list) and all(isinstance(t, str) for t in evals)):
        raise ConfigError(f"eval must be a list of task names (e.g. [sjp, lexam_mcq4]), not {evals!r}")

    from lexfine.sweep.batch import check_global_batch, fit

    global_batch = check_global_batch(data.get("global_batch"))
    base = _base_tree(data, base_dir)
    base_method = base.get("method", "lora")
    axes, keys = _axes(data, base_method)
    if global_batch and ("train.grad_accum" in keys or "train.grad_accum" in str(data.get("overrides") or "")):
        raise ConfigError("give global_batch or train.grad_accum, not both: with global_batch the accumulation "
                          "follows train.batch_size and the GPU count")
    sweep_dir = output_dir / name

    runs: list[PlannedRun] = []
    seen: set[str] = set()
    merged = 0
    for n, combo in enumerate(itertools.product(*axes), start=1):
        assignment: dict[str, Any] = {}
        for part in combo:
            assignment.update(part)
        if assignment.get("method", base_method) == "full":
            assignment = {k: v for k, v in assignment.items() if not k.startswith("lora.")}
        tree = copy.deepcopy(base)
        for k, v in assignment.items():
            set_dotted(tree, k.split("."), copy.deepcopy(v))
        tree["output_dir"] = str(sweep_dir)
        if evals is not None:
            tree["eval"] = list(evals)
        tree["name"] = name
        try:
            cfg = validate(tree)
            tree["name"] = run_name(name, cfg, assignment)
            cfg = fit(validate(tree), global_batch)
        except ConfigError as e:
            desc = " ".join(f"{k}={fmt_value(v)}" for k, v in assignment.items())
            raise ConfigError(f"combination {n} ({desc}): {e}") from None
        rid = cfg.run_id()
        if rid in seen:
            merged += 1
            continue
        seen.add(rid)
        runs.append(PlannedRun(len(runs) + 1, tree["name"], rid, cfg, assignment))
    ev = list(evals) if evals is not None else (list(runs[0].config.eval) if runs else [])
    return Sweep(name=name, output_dir=output_dir, runs=runs, eval=ev, merged=merged, keys=keys,
                 global_batch=global_batch)
