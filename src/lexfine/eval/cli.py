"""`lexfine eval`: registered on lexfine's typer app by lexfine.cli (and runnable as `python -m lexfine.eval`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lexfine.errors import LexfineError
from lexfine.rundir import RunDir


def eval_command(
    target: str = typer.Argument(..., help="A run directory (base + LoRA adapter, or full weights), <run>@best (the "
                                           "checkpoint eval_during.select chose; results in <run>/best/eval/) or a "
                                           "model: hub id, local directory, smollm2-135m, random:<arch>."),
    task: str = typer.Option("sjp", "--task", "-t", help="sjp, lexam_mcq4, lexam_mcq8, lexam_mcq16 or lexam_mcq32 "
                                                          "(comma-separated for several)."),
    data: Optional[str] = typer.Option(None, "--data", help="Data: a file or folder, a hub id or bundled:<name>. "
                                       "Default: eval_options of a run (else bundled:sjp_fr_heldout, the bundled "
                                       "LEXam MCQ-4 sample; LEXam 8+: the hub). Hub SJP: rcds/swiss_judgment_prediction."),
    mode: str = typer.Option("loglik", "--mode", "-m", help="loglik: score the candidate answers (no parsing). "
                                                            "generate: greedy decoding + parsing (study parity)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write <out>/eval/<task>-<mode>/. Default: the run "
                                       "directory (its manifest is updated), or ./evals/<model> for a model."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most N cases (a seeded random subset)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Cases per forward pass (length-"
                                             "sorted). Default: 64 for loglik on a GPU, else 8."),
    max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", min=64, help="Also cap a batch at "
                                                   "this many padded tokens (short cases then share larger batches). "
                                                   "Default for loglik: 32768 on a GPU, 4096 on a CPU."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="loglik: score through "
                                           "torch.compile'd decoder layers (8B on an H100: 1.44x the tokens/s once "
                                           "compiled, 10-40 s to compile). Default: on with a GPU from 4M prompt "
                                           "tokens (~2,400 SJP cases) on."),
    fp8: bool = typer.Option(False, "--fp8", help="loglik: FP8 matmuls in the decoder layers (torchao; a GPU of "
                             "compute capability >= 8.9; LoRA merged first). Approximate scores, written apart from "
                             "bf16 ones (eval/<task>-loglik-fp8/): see docs/evaluation.md, FP8 scoring."),
    split: Optional[str] = typer.Option(None, "--split", help="SJP: train, validation, test or all (default: test "
                                        "on the hub, all rows of a local file). LEXam: the hub split (test)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=32, help="Context limit; longer facts are "
                                             "cut as in training. Default: the run's eval_options.max_length, else its "
                                             "train.max_length; 4096 for a model."),
    base: Optional[str] = typer.Option(None, "--base", help="LoRA runs: the base model to put the adapter on "
                                       "(default: the run's model)."),
    backend: str = typer.Option("hf", "--backend", help="generate mode: hf (transformers) or vllm (if installed)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="generate mode: new tokens "
                                                 "(default: 16 for SJP, 1024 for the LEXam chain of thought)."),
    prompt_template: Optional[str] = typer.Option(None, "--prompt-template", help="Model targets: SJP prompt "
                                                  "template (a run uses its own)."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="Model targets: system message "
                                                "('none' for none; a run uses its own)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Model targets: the tokenizer (a folder or "
                                            "hub id) instead of the model's own; random:<arch> models otherwise "
                                            "use the embedded SmolLM2's (a run uses its own)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --limit subset."),
    with_base: bool = typer.Option(True, "--with-base/--no-base", help="Run directories evaluated in place: also "
                                   "score the base model (cached) and record it under base_evals, which the "
                                   "report needs to measure knowledge retention."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute a model's scores even when cached."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Evaluate a run or a model on SJP or LEXam; prints the summary.json path last."""
    try:
        _run(**locals())
        from lexfine.eval import dist

        dist.finish()
    except LexfineError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)


def _run(target, task, data, mode, out, limit, batch_size, max_batch_tokens, compile, fp8, split, max_length, base, backend, max_new_tokens,
         prompt_template, system_prompt, tokenizer, seed, with_base, no_cache, quiet) -> None:
    from lexfine import logs
    from lexfine.config import DataArgs, ModelArgs
    from lexfine.eval.runner import evaluate
    from lexfine.eval.tasks import check_mode, split_entry

    logs.setup()  # before transformers is imported: its optional packages' import-time notes stay out of the output
    tasks = [split_entry(t.strip(), mode)[0] for t in task.split(",") if t.strip()]  # sjp, sjp@validation, ...
    check_mode(mode)
    data_args = None
    if prompt_template is not None or system_prompt is not None:
        from lexfine.data.prompts import load_template

        fields = {}
        if prompt_template is not None:
            load_template(prompt_template)  # one-line error now rather than after the model loaded
            fields["prompt_template"] = prompt_template
        if system_prompt is not None:
            fields["system_prompt"] = None if system_prompt.lower() == "none" else system_prompt
        data_args = DataArgs(**fields)
    if data is not None and len(tasks) > 1:
        raise _user_error("--data applies to one task; evaluate the tasks one at a time")
    tgt = target
    if tokenizer is not None:
        from lexfine.eval.target import resolve_target

        if RunDir.is_run_dir(target) or "@" in target:
            raise _user_error("--tokenizer is for model targets; a run is evaluated with the tokenizer it saved")
        tgt = resolve_target(target, data_args=data_args, model_args=ModelArgs(tokenizer=tokenizer))
    paths = []
    for name in tasks:
        summary = evaluate(tgt, name, mode, data=data, out=out, limit=limit, batch_size=batch_size,
                           max_length=max_length, split=split, base=base, backend=backend,
                           max_new_tokens=max_new_tokens, seed=seed, use_cache=not no_cache, data_args=data_args,
                           progress=not quiet, max_batch_tokens=max_batch_tokens, compile=compile, fp8=fp8)
        if summary:  # empty on the other ranks of a data-parallel launch: rank 0 reports
            typer.echo(_line(summary), err=True)
            if not quiet and not summary.get("cached") and (tl := timing_line(summary.get("timing") or {})):
                typer.echo(tl, err=True)
            paths.append(summary["summary_path"])
        if with_base and out is None and RunDir.is_run_dir(target):
            _record_base(target, name, mode, base, dict(
                data=data, limit=limit, batch_size=batch_size, max_length=max_length, split=split, backend=backend,
                max_new_tokens=max_new_tokens, seed=seed, use_cache=not no_cache, data_args=data_args,
                progress=not quiet, max_batch_tokens=max_batch_tokens, compile=compile, fp8=fp8))
    for p in paths:
        typer.echo(p)


def _record_base(run_dir, task: str, mode: str, base: str | None, kwargs: dict) -> None:
    """The base model's scores on the same cases and prompts, cached by (model, task, mode, data, settings) so a
    sweep computes them once: what `lexfine train ... eval=[...]` records after training, for separate eval jobs.
    Every rank of a data-parallel launch takes part (the base model is scored data-parallel too)."""
    from lexfine.eval.configured import base_record
    from lexfine.eval.runner import evaluate, result_mode
    from lexfine.eval.target import resolve_target
    from lexfine.eval.tasks import eval_key

    tgt = resolve_target(str(run_dir), base=base)
    summary = evaluate(tgt.base(), task, mode, write=False, **{**kwargs, "max_length": kwargs["max_length"]
                                                                 or tgt.max_length})
    if not summary:
        return
    rd = RunDir(run_dir)
    known = rd.manifest().get("base_evals", {})
    known[eval_key(task, result_mode(mode, summary))] = base_record(summary)
    rd.update_manifest(base_evals=known)
    typer.echo("base model: " + _line(summary), err=True)


def _user_error(msg: str) -> LexfineError:
    from lexfine.errors import ConfigError

    return ConfigError(msg)


def _line(s: dict) -> str:
    ci = s.get("accuracy_ci95") or [float("nan")] * 2
    from lexfine.eval.runner import result_mode

    parts = [f"{s['task']}-{result_mode(s['mode'], s)}: n={s['n']}", f"accuracy={s['accuracy']:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]",
             f"macro_f1={s['macro_f1']:.4f}", f"majority={s['majority_baseline']:.4f}",
             f"chance={s['chance_level']:.3f}"]
    ln = s.get("length_normalized")
    if ln and not ln.get("identical_to_sum"):
        parts.append(f"(per token: accuracy={ln['accuracy']:.4f} macro_f1={ln['macro_f1']:.4f})")
    if s["mode"] == "generate":
        parts.append(f"parse_failures={s['parse_failures']} ({s['parse_failure_rate']:.1%})")
    if s.get("cached"):
        parts.append("(cached)")
    return "  ".join(parts)


def timing_line(t: dict) -> str:
    """Where this evaluation's time went, from process start (summary.json `timing`)."""
    if t.get("since_process_start_s") is None or t.get("seconds") is None:
        return ""
    parts = [f"{label} {t[k]:.1f} s" for label, k in (
        ("start-up", "called_s"), ("data", "data_s"), ("model", "model_load_s"), ("FP8 conversion", "fp8_convert_s"),
        ("prompts", "prompts_s")) if t.get(k) is not None]
    scoring = f"scoring {t['seconds']:.1f} s"
    inner = [f"first batch {t['first_batch_s']:.1f} s"] if t.get("first_batch_s") is not None else []
    if t.get("compile_s"):
        inner.append(f"compiling {t['compile_s']:.1f} s")
    if inner:
        scoring += f" ({', '.join(inner)})"
    rate = f", {t['prompt_tokens_per_s'] / 1000:.1f}k prompt tokens/s" if t.get("prompt_tokens_per_s") else ""
    return f"time: {t['since_process_start_s']:.1f} s from process start: " + ", ".join(parts + [scoring]) + rate


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
