"""Evaluations after training: each task in cfg.eval on the trained weights, plus the base model's (cached) scores.

Called by `lexfine train` once the adapter/model is saved, with the model still in memory. For a LoRA run the base
model's scores come from the same weights with the adapter switched off (no second copy); for a full fine-tune
the base is loaded once, and only when the cache has no answer for it.
"""

from __future__ import annotations

from lexfine.config import RunConfig
from lexfine.eval import dist
from lexfine.eval.runner import evaluate, headline
from lexfine.eval.target import from_run, load
from lexfine.eval.tasks import eval_key, split_entry
from lexfine.rundir import RunDir


def _data_for(task: str, cfg: RunConfig) -> tuple[str | None, str | None]:
    """Data and split of a task spec: `sjp@validation` names its split, plain `sjp` takes eval_options.sjp_split."""
    opts = cfg.eval_options
    if task.startswith("sjp"):
        return opts.sjp_data, (None if "@" in task else opts.sjp_split)
    return opts.lexam_data, None


def base_record(summary: dict) -> dict:
    """What the manifest keeps of a base-model evaluation: headline metrics, cache key, and the settings (data,
    split, limit) that `lexfine report` matches a run's evaluation against before computing a drop."""
    settings = summary.get("settings") or {}
    return {**headline(summary), "cache_key": summary.get("cache_key"), "cached": summary.get("cached"),
            "settings": {k: settings.get(k) for k in ("data", "split", "limit")}}


def run_configured_evals(run_dir: RunDir, cfg: RunConfig, model=None, tokenizer=None) -> dict:
    """Evaluate every task in cfg.eval (entries `task` or `task:mode`) with cfg.eval_options.

    Writes run_dir/eval/<task>-<mode>/{predictions.jsonl, summary.json}, records them in the manifest (`evals`) and
    the base model's headline metrics under `base_evals`. Returns {"evals": {...}, "base_evals": {...}}.
    """
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    results: dict = {"evals": {}, "base_evals": {}}
    if not cfg.eval:
        return results
    entries = [split_entry(e, cfg.eval_options.mode) for e in cfg.eval]
    target = from_run(rd.path, cfg)
    opts = cfg.eval_options
    info = dist.setup()
    if model is None:
        model, tokenizer = load(target, device=info.device)
    elif tokenizer is None:
        raise ValueError("run_configured_evals(model=...) needs the tokenizer too")
    base_cache: dict = {}

    def load_base():  # full fine-tunes only, and only on a cache miss; loaded once for all tasks
        if "m" not in base_cache:
            base_cache["m"] = load(target.base(), device=next(model.parameters()).device)
        return base_cache["m"]

    for task, mode in entries:
        data, split = _data_for(task, cfg)
        common = dict(data=data, limit=opts.limit, batch_size=opts.batch_size, max_length=target.max_length,
                      split=split)
        summary = evaluate(target, task, mode, out=rd.path, model=model, tokenizer=tokenizer, **common)
        name = eval_key(task, mode)
        results["evals"][name] = headline(summary)
        if target.weights == "adapter" and hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                base = evaluate(target.base(), task, mode, write=False, model=model, tokenizer=tokenizer, **common)
        else:
            base = evaluate(target.base(), task, mode, write=False, model=load_base, **common)
        results["base_evals"][name] = base_record(base)
    if info.main:
        known = rd.manifest().get("base_evals", {})
        rd.update_manifest(base_evals={**known, **results["base_evals"]})
    return results
