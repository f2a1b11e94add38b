"""evaluate(): data -> prompts (built exactly as in training) -> scores or generations -> metrics -> files.

    <out>/eval/<task>-<mode>/predictions.jsonl   one row per case: id, gold, prediction, correct, scores|output, groups
                                                 (loglik: also scores_length_normalized, prediction_length_normalized)
    <out>/eval/<task>-<mode>/summary.json        metrics, breakdowns, baselines, settings, timing (loglik: the
                                                 headline is the summed log-prob, headline_scoring; the mean per
                                                 answer token next to it, length_normalized: eval/scoring.py)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lexfine.errors import ConfigError, DataError
from lexfine.eval import cache, dist
from lexfine.eval.target import Target, resolve_target
from lexfine.eval.tasks import Task, check_mode, eval_key, load_cases, parse_task_spec
from lexfine.rundir import atomic_write_json, now_iso, write_jsonl

log = logging.getLogger("lexfine.eval")

HEADLINE = ("n", "accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95", "balanced_accuracy", "majority_baseline",
            "chance_level", "parse_failures", "parse_failure_rate", "headline_scoring")


def headline(summary: dict) -> dict:
    """The manifest's copy of a summary: HEADLINE keys, plus the length-normalised loglik accuracy and macro-F1."""
    out = {k: summary.get(k) for k in HEADLINE}
    ln = summary.get("length_normalized")
    if ln:
        out["length_normalized"] = {k: ln.get(k) for k in ("accuracy", "macro_f1")}
    return out


def candidate_ids(tokenizer, task: Task, eot: list[int]) -> tuple[list[list[int]], str]:
    """Token ids scored for each label. LEXam letters that are single distinct tokens are compared at one position
    (no end-of-turn); anything else (SJP words, multi-token labels) is scored as answer + end-of-turn, the exact
    sequence a fine-tuned model is trained to produce (and the end-of-turn keeps "1" from beating "10")."""
    from lexfine.data.masking import answer_ids

    labels = task.labels
    if task.kind == "lexam":
        single = [list(tokenizer(lab, add_special_tokens=False)["input_ids"]) for lab in labels]
        if all(len(s) == 1 for s in single) and len({s[0] for s in single}) == len(single):
            return single, "first_token"
    return [answer_ids(tokenizer, lab, eot) for lab in labels], "sequence_with_eot"


def _model_dtype(model) -> str:
    return str(model.get_input_embeddings().weight.dtype).replace("torch.", "")


def _cache_payload(tgt: Target, task: Task, mode: str, info: dict, max_length: int, dtype: str,
                   max_new_tokens: int | None, backend: str) -> dict:
    d = tgt.data_args
    return {"target": tgt.identity(), "task": task.name, "mode": mode, "fingerprint": info["fingerprint"],
            "limit": info["limit"], "split": info["split"], "max_length": max_length, "dtype": dtype,
            "prompt": {"template": d.prompt_template, "system": d.system_prompt, "truncation": d.truncation},
            "max_new_tokens": max_new_tokens if mode == "generate" else None, "backend": backend}


def evaluate(target, task: str, mode: str = "loglik", data: str | None = None, out=None, limit: int | None = None,
             batch_size: int | None = None, max_length: int | None = None, split: str | None = None, *, base: str | None = None,
             backend: str = "hf", max_new_tokens: int | None = None, seed: int = 0, use_cache: bool = True,
             write: bool = True, model=None, tokenizer=None, data_args=None, progress: bool = True,
             max_batch_tokens: int | None = None, compile: bool | None = None, fp8: bool = False) -> dict:
    """Evaluate `target` (run directory, model spec or Target) on `task`; returns the summary (+ summary_path).

    model/tokenizer: an already loaded model (e.g. the one training just finished), or a zero-argument callable
    returning (model, tokenizer), called only when the cache has no answer. Without either, the target is loaded.
    compile: loglik scoring through torch.compile'd decoder layers; None: on a GPU for large sets (compile_scoring).
    fp8: loglik scoring with FP8 matmuls in the decoder layers (lexfine.eval.fp8): approximate scores, kept apart
    from bf16 ones (own folder, keys and cache entries). Only for a model this function loads itself.
    """
    from lexfine.clock import since_process_start

    marks: dict = {"called_s": round(since_process_start(), 2), "model_load_s": None}  # `timing` (rank 0's)
    t_task, at_split = parse_task_spec(task)
    if at_split:
        if split is not None and split != at_split:
            raise ConfigError(f"task {task!r} names split {at_split!r} but --split is {split!r}; give one")
        split = at_split
    check_mode(mode)
    if compile and mode != "loglik":
        raise ConfigError("--compile applies to loglik scoring; generate mode decodes eagerly")
    if fp8 and model is not None:
        raise ConfigError("fp8 scoring converts a model lexfine eval loads itself, not one passed in; "
                          "evaluate the run directory instead")
    if backend not in ("hf", "vllm"):
        raise ConfigError(f"unknown backend {backend!r}; use hf or vllm")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    tgt = target if isinstance(target, Target) else resolve_target(str(target), base=base, data_args=data_args)
    max_length = max_length or tgt.max_length
    max_new = (max_new_tokens or t_task.max_new_tokens) if mode == "generate" else None
    if data is None:  # the configured defaults (EvalArgs: bundled samples, which work offline)
        ea = tgt.eval_args
        data, split = (ea.sjp_data, split or ea.sjp_split) if t_task.kind == "sjp" else (ea.lexam_data, split)
    t = time.perf_counter()
    cases, info = load_cases(t_task, mode, data, tgt.data_args, split, limit, seed)
    marks["data_s"] = round(time.perf_counter() - t, 2)
    if not cases:
        raise DataError(f"no {task} cases to evaluate in {info['data']!r} (split {info['split']})")
    info_dist = dist.setup()
    if fp8:
        from lexfine.eval import fp8 as fp8_scoring

        fp8_scoring.check(mode, info_dist.device)  # before the model loads

    import torch

    given = model is not None and isinstance(model, torch.nn.Module)
    key = payload = None
    if tgt.kind == "model" and use_cache:
        from lexfine.models import resolve_dtype

        dtype = _model_dtype(model) if given else str(resolve_dtype(tgt.model_args)).replace("torch.", "")
        payload = _cache_payload(tgt, t_task, mode, info, max_length, dtype, max_new, backend)
        if fp8:  # its own cache entries (the bf16 payload, and so every earlier key, is unchanged)
            payload["matmul"] = "fp8"
        key = cache.make_key(payload)
        hit = cache.lookup(key)
        if hit is not None:
            summary, rows = hit
            summary.update(cached=True, cache_key=key, target=tgt.spec)
            return _finish(summary, rows, tgt, t_task, mode, out, write, info_dist, at_split)

    t = time.perf_counter()
    if model is not None and not given:
        model, tokenizer = model()
    elif model is None:
        from lexfine.eval.target import load

        model, tokenizer = load(tgt, device=info_dist.device)
    if not given:
        marks["model_load_s"] = round(time.perf_counter() - t, 2)
    fp8_info = None
    if fp8:
        t = time.perf_counter()
        model, n_fp8 = fp8_scoring.convert(model)
        fp8_info = fp8_scoring.info(n_fp8)
        marks["fp8_convert_s"] = round(time.perf_counter() - t, 2)
    if tokenizer is None:
        raise ConfigError("evaluate(model=...) needs the tokenizer too")
    device = model_device(model)
    batch_size, max_batch_tokens = batch_limits(mode, device, batch_size, max_batch_tokens)
    was_training = model.training
    model.eval()
    try:
        rows, stats = _run(model, tokenizer, tgt, t_task, mode, cases, max_length, batch_size, max_new, backend,
                           info_dist, progress, max_batch_tokens, compile)
    finally:
        model.train(was_training)
    if not info_dist.main:
        return {}
    from lexfine import compile_cache

    summary = build_summary(t_task, mode, rows, stats["candidate_tokens"])
    d = tgt.data_args
    summary.update(stats)
    summary["timing"] = {**stats["timing"], **marks, "since_process_start_s": round(since_process_start(), 2),
                         **compile_cache.stats()}
    summary["settings"] = {**{k: info[k] for k in ("data", "split", "limit", "seed", "fingerprint")},
                           "max_length": max_length, "batch_size": batch_size,
                           "max_batch_tokens": max_batch_tokens, "prompt_template": d.prompt_template,
                           "system_prompt": d.system_prompt, "truncation": d.truncation, "max_new_tokens": max_new,
                           "backend": backend, "dtype": _model_dtype(model), "device": str(device),
                           "world_size": info_dist.world, "fp8": fp8_info}
    summary.update(target=tgt.spec, model=tgt.model, weights=tgt.weights, created=now_iso(), cached=False)
    if key is not None:
        summary["cache_key"] = key
        cache.store(key, summary, rows, payload)
    return _finish(summary, rows, tgt, t_task, mode, out, write, info_dist, at_split)


# loglik on a GPU: 64 rows and 32768 padded tokens per pass scored 1.49x the cases/s of 8 rows for the 8B on an
# H100 (`lexfine eval random:apertus-8b --task sjp`, 300 French cases, 21.3k vs 14.3k tokens/s, 2026-11-23).
GPU_LOGLIK_BATCH = (64, 32768)


# Compiled decoder layers score the 8B at 1.44x the tokens/s once compiled (37.0k vs 25.8k, H100,
# benchmarks/eval_speed.py on 1,000 French SJP cases, 2026-11-23); compiling takes ~10 s with a warm inductor cache
# and ~30-40 s on a fresh machine. Through `lexfine eval` on 2,000 cases (3.35M prompt tokens): 1.19x warm, 0.95x
# fresh. So by default it compiles from 4M prompt tokens on (break-even on a fresh machine; docs/evaluation.md).
AUTO_COMPILE_TOKENS = 4_000_000


def compile_scoring(compile: bool | None, mode: str, model, prompt_tokens: int) -> bool:
    """Whether loglik scoring runs through compiled decoder layers: as asked, else (None) on a CUDA GPU when the
    prompts hold at least AUTO_COMPILE_TOKENS tokens. Never for generate mode."""
    if mode != "loglik":
        return False
    if compile is not None:
        return compile
    return model_device(model).type == "cuda" and prompt_tokens >= AUTO_COMPILE_TOKENS


def batch_limits(mode: str, device, batch_size: int | None, max_batch_tokens: int | None) -> tuple[int, int | None]:
    """Rows and padded tokens per forward pass where the caller left them unset: GPU_LOGLIK_BATCH for loglik on a
    GPU; else 8 rows, and for loglik loglik.default_token_cap (a cap on a CPU)."""
    if mode != "loglik":
        return batch_size or 8, max_batch_tokens
    if device.type == "cuda":
        return batch_size or GPU_LOGLIK_BATCH[0], max_batch_tokens or GPU_LOGLIK_BATCH[1]
    from lexfine.eval.loglik import default_token_cap

    return batch_size or 8, max_batch_tokens or default_token_cap(device)


def model_device(model):
    return next(model.parameters()).device


def _run(model, tokenizer, tgt: Target, task: Task, mode: str, cases, max_length: int, batch_size: int,
         max_new: int | None, backend: str, info_dist, progress: bool,
         max_batch_tokens: int | None = None, compile: bool | None = None) -> tuple[list[dict], dict]:
    import torch

    from lexfine.eval import generate as gen
    from lexfine.eval.loglik import Case, compiled_layers, predict, score_cases
    from lexfine.eval.scoring import per_token

    plan = make_plan(tokenizer, task, mode, max_length, max_new)
    eot, cands, labels = plan.eot, plan.candidates, task.labels
    # Shard by character length (a proxy for tokens) so that each process tokenizes only its own cases.
    mine = dist.shard([len(c.example.before) + len(c.example.facts) + len(c.example.after) for c in cases], info_dist)
    show = progress and info_dist.main
    t = time.perf_counter()
    prompts, truncated = build_prompts(tokenizer, [cases[i].example for i in mine], plan, tgt.data_args.truncation,
                                       f"{task.name} prompts", show)
    timing = {"prompts_s": round(time.perf_counter() - t, 2)}
    prompts, truncated = dict(zip(mine, prompts)), dict(zip(mine, truncated))
    order = list(prompts)
    # Each data-parallel process holds a full model copy, so processes need not run in lock-step (no batch padding).
    compiled = compile_scoring(compile, mode, model, sum(map(len, prompts.values())))
    t0 = time.perf_counter()
    if mode == "loglik":
        score = [Case(prompts[i], cands) for i in order]
        args = (batch_size, _pad_id(tokenizer, eot), show, f"{task.name} loglik")
        outs = None
        if compiled:
            try:
                with compiled_layers(model) as n_layers:
                    outs = score_cases(model, score, *args, max_batch_tokens=max_batch_tokens, min_rows=2,
                                       timing=timing)
                compiled = n_layers > 0
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # torch.compile cannot handle this model: the eager scores are the same
                log.warning("compiled scoring failed (%s: %s); scoring eagerly", type(e).__name__, str(e)[:300])
                compiled = False
        if outs is None:
            timing.pop("first_batch_s", None)  # a failed compiled attempt's
            outs = score_cases(model, score, *args, max_batch_tokens=max_batch_tokens, timing=timing)
    elif backend == "vllm":
        outs = _vllm(tgt, tokenizer, [prompts[i] for i in order], max_new, gen.stop_ids(tokenizer, eot), max_length)
    else:
        outs = gen.generate_hf(model, tokenizer, [prompts[i] for i in order], max_new, batch_size,
                               gen.stop_ids(tokenizer, eot), show, f"{task.name} generate",
                               max_batch_tokens=max_batch_tokens)
    seconds = time.perf_counter() - t0
    local = {i: (o, len(prompts[i]), truncated[i]) for i, o in zip(order, outs)}
    merged = dist.gather(local, info_dist)
    rows = []
    for i, case in enumerate(cases):
        out, n_tokens, was_cut = merged[i]
        row = {"id": case.id, "gold": case.gold}
        if mode == "loglik":
            pred = predict(out, labels)
            norm = per_token(out, cands)
            extra = {"scores": {lab: round(s, 5) for lab, s in zip(labels, out)},
                     "scores_length_normalized": {lab: round(s, 5) for lab, s in zip(labels, norm)},
                     "prediction_length_normalized": predict(norm, labels)}
        else:
            pred = gen.parse_sjp(out) if task.kind == "sjp" else gen.parse_hash_answer(out, labels)
            extra = {"output": out, "parsed": pred is not None}
        row.update(prediction=pred, correct=pred == case.gold, **extra, **case.groups,
                   prompt_tokens=n_tokens, truncated=was_cut)
        rows.append(row)
    n_tok = sum(r["prompt_tokens"] for r in rows)
    stats = {
        "scoring": plan.scoring,
        "candidates": {lab: c for lab, c in zip(labels, cands)} if cands else None,
        "candidate_tokens": {lab: len(c) for lab, c in zip(labels, cands)} if cands else None,
        "truncated": sum(r["truncated"] for r in rows),
        "compiled_layers": compiled,
        "prompt_tokens_mean": n_tok / len(rows),
        "prompt_tokens_max": max(r["prompt_tokens"] for r in rows),
        "timing": {"seconds": round(seconds, 3), "examples_per_s": round(len(rows) / seconds, 3) if seconds else None,
                   "prompt_tokens_per_s": round(n_tok / seconds, 1) if seconds else None, **timing},
        "example_prompt": tokenizer.decode(prompts[order[-1]]) if order else None,
    }
    return rows, stats


@dataclass
class Plan:
    eot: list[int]
    candidates: list[list[int]] | None  # loglik: token ids per label
    scoring: str
    budget: int  # prompt tokens allowed: max_length minus the longest answer (or the new tokens)


def make_plan(tokenizer, task: Task, mode: str, max_length: int, max_new: int | None = None) -> Plan:
    from lexfine.data.masking import end_of_turn_ids

    eot = end_of_turn_ids(tokenizer)  # also the one-line error for a tokenizer without a chat template
    cands, scoring = candidate_ids(tokenizer, task, eot) if mode == "loglik" else (None, "generate")
    reserve = max(len(c) for c in cands) if cands else (max_new or task.max_new_tokens)
    if max_length - reserve <= 16:
        raise ConfigError(f"max_length={max_length} leaves no room for a prompt after {reserve} answer tokens; raise it")
    return Plan(eot, cands, scoring, max_length - reserve)


def build_prompts(tokenizer, examples: list, plan: Plan, truncation: str, desc: str = "prompts",
                  progress: bool = False) -> tuple[list[list[int]], list[bool]]:
    """build_prompt for every example, in order: by forked worker processes from PARALLEL_MIN examples, as training
    prepares its data (one per available core shared among the local ranks, `LEXFINE_TOKENIZE_WORKERS`), so that
    the 17k-case SJP test set is not tokenized on one core while the GPU waits."""
    from tqdm.auto import tqdm

    from lexfine.data.prepare import default_workers, forked_chunks

    def prompts_of(start: int, stop: int) -> list[tuple[list[int], bool]]:
        return [build_prompt(tokenizer, ex, plan, truncation) for ex in examples[start:stop]]

    with tqdm(total=len(examples), desc=desc, unit="case", disable=not progress or len(examples) < 500,
              leave=False) as bar:
        parts = forked_chunks(prompts_of, len(examples), default_workers(len(examples)), bar)
    built = [p for part in parts for p in part]
    return [ids for ids, _ in built], [cut for _, cut in built]


def build_prompt(tokenizer, example, plan: Plan, truncation: str) -> tuple[list[int], bool]:
    """The prompt ids exactly as training builds them (masking.fit_prompt: chat template, system prompt, facts cut
    to fit), with room left for the longest candidate answer."""
    from lexfine.data.masking import fit_prompt

    ids, truncated, _ = fit_prompt(tokenizer, example, plan.budget, truncation)
    return ids, truncated


def _pad_id(tokenizer, eot: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot[0]


def _vllm(tgt: Target, tokenizer, prompts, max_new, eos_ids, max_length):
    from lexfine.eval.generate import generate_vllm
    from lexfine.models import resolve

    if tgt.weights == "full":
        return generate_vllm(str(tgt.weights_dir), tokenizer, prompts, max_new, eos_ids,
                             max_model_len=max_length + max_new)
    lora = str(tgt.weights_dir) if tgt.weights == "adapter" else None
    rank = tgt.cfg.lora.r if tgt.cfg is not None else 16
    return generate_vllm(resolve(tgt.model).source, tokenizer, prompts, max_new, eos_ids, lora_path=lora,
                         max_model_len=max_length + max_new, lora_rank=rank)


def build_summary(task: Task, mode: str, rows: list[dict], candidate_tokens: dict[str, int] | None = None) -> dict:
    from lexfine.eval import metrics, scoring

    labels = task.labels
    gold = [r["gold"] for r in rows]
    pred = [r["prediction"] for r in rows]
    failures = sum(p is None for p in pred)
    parsed = [(g, p) for g, p in zip(gold, pred) if p is not None]
    summary = {"task": task.name, "mode": mode, **metrics.classification_report(gold, pred, labels),
               "chance_level": task.chance_level, "parse_failures": failures,
               "parse_failure_rate": failures / len(rows),
               "accuracy_parsed": (sum(g == p for g, p in parsed) / len(parsed)) if parsed else None}
    if mode == "loglik":
        summary["headline_scoring"] = scoring.HEADLINE_SCORING
        summary["length_normalized"] = scoring.length_normalized(rows, labels, candidate_tokens)
    for field in task.groups:
        summary[f"by_{field}"] = metrics.breakdown(gold, pred, [r.get(field) for r in rows], labels)
    return summary


def result_mode(mode: str, summary: dict) -> str:
    """The mode part of a result's folder and manifest keys: `loglik`, or `loglik-fp8` for FP8 scores, which are
    kept apart from bf16 ones (`sjp-loglik-fp8`)."""
    from lexfine.eval.fp8 import SUFFIX

    return mode + (SUFFIX if (summary.get("settings") or {}).get("fp8") else "")


def _finish(summary: dict, rows: list[dict], tgt: Target, task: Task, mode: str, out, write: bool,
            info_dist, at_split: str | None = None) -> dict:
    if not info_dist.main:
        return {}  # rank 0 writes and reports
    if not write:
        return summary
    if out is None:
        out = tgt.out_dir if tgt.kind == "run" else Path("evals") / tgt.safe_name
    label = result_mode(mode, summary)
    key = eval_key(f"{task.name}@{at_split}" if at_split else task.name, label)
    out_dir = Path(out) / "eval" / key
    write_jsonl(out_dir / "predictions.jsonl", rows)
    atomic_write_json(out_dir / "summary.json", summary)
    if tgt.kind == "run" and not tgt.checkpoint and Path(out).resolve() == tgt.run_dir.path.resolve():
        tgt.run_dir.record_eval(key[: -len(label) - 1], label, out_dir / "summary.json", headline(summary))
    return {**summary, "summary_path": str(out_dir / "summary.json")}
