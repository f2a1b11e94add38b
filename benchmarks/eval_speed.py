"""Evaluation speed: SJP log-likelihood scoring vs plain `model.generate` batch decoding of the same cases.

    python benchmarks/eval_speed.py --tiny      # CPU: embedded SmolLM2-135M, a couple dozen bundled SJP cases
    python benchmarks/eval_speed.py             # GPU: random:apertus-8b (real 8B architecture, random weights), bf16

Random weights cost exactly what trained ones do per token, so the GPU numbers are the real 8B speed. The generate
baseline is the reference study's approach minus vLLM: batches in data order, left-padded, greedy decoding of a few
new tokens (random weights never emit end-of-turn, so every batch decodes all of them). The projection to the full
SJP test set (17,357 cases, ~1.1k tokens mean) scales by prompt tokens; LEXam MCQ-4 (1,655) by cases.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SJP_TEST = (17_357, 1_100)  # cases, mean prompt tokens
LEXAM_MCQ4 = 1_655


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn):
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t


def _report(rows: list, row: tuple) -> None:
    """Keep a phase's numbers as soon as it ends (a run cut short still says what it measured)."""
    rows.append(row)
    name, count, toks, secs = row
    print(f"  done: {name}: {count} cases in {secs:.2f}s = {count / secs:.2f} cases/s, {count * toks / secs:.0f} tok/s",
          file=sys.stderr, flush=True)


def _prompts(tok, task_name, mode, data, n, max_length, data_args):
    from lexfine.eval.runner import build_prompt, make_plan
    from lexfine.eval.tasks import get_task, load_cases

    task = get_task(task_name)
    cases, _ = load_cases(task, mode, data, data_args, limit=n)
    plan = make_plan(tok, task, mode, max_length, 8)
    return [build_prompt(tok, c.example, plan, "middle")[0] for c in cases], plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU mode: embedded SmolLM2, few cases, short contexts")
    ap.add_argument("--model", default=None, help="model spec (default: smollm2-135m with --tiny, else random:apertus-8b)")
    ap.add_argument("--data", default=None, help="SJP rows (default: ../shared/data/sjp/fr_validation.parquet if present)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir for random:<arch> (default: the embedded one)")
    ap.add_argument("--lexam-data", default=None, help="LEXam MCQ-4 rows (default: ../shared/data/lexam if present)")
    ap.add_argument("--cases", type=int, default=None, help="SJP cases (default 24 tiny / 512 GPU)")
    ap.add_argument("--lexam-cases", type=int, default=None, help="LEXam MCQ-4 cases (default 24 tiny / 1655 GPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="loglik batch size cap (default 8 tiny / 64 GPU)")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="loglik padded tokens per batch (GPU: 32768)")
    ap.add_argument("--gen-batch-size", type=int, default=None, help="generate batch size (default 8 tiny / 16 GPU)")
    ap.add_argument("--max-length", type=int, default=None, help="context limit (default 512 tiny / 4096 GPU)")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="generate baseline: new tokens per case")
    ap.add_argument("--strategies", default="auto", help="loglik strategies to time, comma-separated: auto, packed "
                    "(one pass, 4D mask), cached (maskless prompt pass + candidate pass on the KV cache); append +compiled "
                    "to time it with torch.compile'd decoder layers (e.g. cached,cached+compiled,packed+compiled); +sync reads each "
                    "batch's scores before queueing the next (lookahead 0: the GPU idles while the host builds a batch); +fp8 "
                    "converts the model to FP8 matmuls (lexfine eval --fp8) for this and every later strategy; +flash keeps "
                    "SDPA off its cuDNN kernels; +repeat scores cached's candidate pass as before the seventh session "
                    "(keys and values copied to every query head, lexfine.eval.grouped_attention)")
    ap.add_argument("--python-xielu", action="store_true", help="keep transformers' unfused Python xIELU (Apertus)")
    ap.add_argument("--no-generate", action="store_true", help="skip the generate baseline")
    ap.add_argument("--no-lexam", action="store_true", help="skip LEXam (SJP only)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from lexfine.config import DataArgs, ModelArgs
    from lexfine.eval.generate import generate_hf
    from lexfine.eval.loglik import Case, score_cases
    from lexfine.eval.target import Target, load

    gpu = torch.cuda.is_available() and not a.tiny
    model_spec = a.model or ("smollm2-135m" if a.tiny or not gpu else "random:apertus-8b")
    n = a.cases or (24 if a.tiny else 512)
    n_lexam = a.lexam_cases or (24 if a.tiny else LEXAM_MCQ4)
    bs = a.batch_size or (8 if a.tiny else 64)
    mbt = a.max_batch_tokens or (None if a.tiny else 32768)
    gbs = a.gen_batch_size or (8 if a.tiny else 16)
    max_length = a.max_length or (512 if a.tiny else 4096)
    data = a.data or (str(SHARED / "sjp" / "fr_validation.parquet") if (SHARED / "sjp").is_dir()
                      else "bundled:sjp_fr_heldout")
    lexam_data = a.lexam_data or (str(SHARED / "lexam") if (SHARED / "lexam").is_dir() else None)
    if lexam_data is None:
        n_lexam = min(n_lexam, 300)  # the bundled sample
    device = "cuda" if gpu else "cpu"

    t0 = time.perf_counter()
    model, tok = load(Target(model_spec, "model", model_spec, ModelArgs(dtype="bfloat16" if gpu else "float32",
                                                                  tokenizer=a.tokenizer)),
                      device=device, fused_xielu=not a.python_xielu)
    load_s = time.perf_counter() - t0
    data_args = DataArgs()
    (prompts, plan), tok_s = _timed(lambda: _prompts(tok, "sjp", "loglik", data, n, max_length, data_args))
    pad = tok.pad_token_id if tok.pad_token_id is not None else plan.eot[0]
    cases = [Case(p, plan.candidates) for p in prompts]
    mean_tokens = sum(map(len, prompts)) / len(prompts)

    strategies = [x.strip() for x in a.strategies.split(",") if x.strip()]
    rows = []
    fp8_state: dict = {}
    warm_s: dict[str, float] = {}  # warm-up seconds per task and strategy (compilation included), not in the rows
    from contextlib import ExitStack, nullcontext

    from lexfine.eval.loglik import compiled_layers

    def time_strategies(task: str, task_cases: list, phase: str) -> None:
        """Score `task_cases` once per strategy ('<strategy>+compiled': through torch.compile'd decoder layers, as
        `lexfine eval --compile`), after a warm-up (kernels, compile, allocator) on a long and a short batch that is
        timed apart; one strategy failing must not lose the others' numbers."""
        nonlocal model
        for strat in strategies:
            parts = strat.split("+")
            if "fp8" in parts and not fp8_state:
                from lexfine.eval import fp8

                model, fp8_state["layers"] = fp8.convert(model)  # irreversible: later strategies stay FP8
            compiled = "compiled" in parts
            attn = ExitStack()  # the phase's settings, undone when it ends
            if compiled:  # graphs traced anew: inductor fixes the attention kernel when it traces
                import torch._dynamo

                torch._dynamo.reset()
            if "flash" in parts:  # SDPA without its cuDNN kernels (as training's default)
                from lexfine.train.speed import attention_kernels

                attn.enter_context(attention_kernels({"cudnn_attention": False}))
            if "repeat" in parts:  # no folding of the candidate pass onto the grouped key/value heads
                from unittest import mock

                from lexfine.eval import grouped_attention

                attn.enter_context(mock.patch.object(grouped_attention, "MAX_FOLDED_ROWS", 0))
            kw = {"strategy": parts[0], "min_rows": 2 if compiled else 1, "lookahead": 0 if "sync" in parts else 1}
            try:
                with attn, compiled_layers(model) if compiled else nullcontext():
                    _, warm_s[f"{task} {strat}"] = _timed(lambda: score_cases(
                        model, task_cases[:4] + task_cases[-4:], 4, pad, progress=False, **kw))
                    _, secs = _timed(lambda: score_cases(model, task_cases, bs, pad, progress=sys.stderr.isatty(),
                                                         desc=f"{task} {strat}", max_batch_tokens=mbt, **kw))
                tokens = sum(len(c.prompt) for c in task_cases) / len(task_cases)
                _report(rows, (phase.format(strat=strat), len(task_cases), tokens, secs))
            except Exception as e:
                print(f"strategy {strat} failed on {task}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)

    time_strategies("SJP", cases, "SJP loglik {strat} (1 prompt pass)")
    peak_ll = torch.cuda.max_memory_allocated() / 2**30 if gpu else None

    if not a.no_generate:
        # the baseline in data order (the study's batches); length sorting would be an improvement we made
        def plain_generate():
            for i in range(0, len(prompts), gbs):
                generate_hf(model, tok, prompts[i:i + gbs], a.max_new_tokens, gbs, plan.eot, progress=False)

        _, gen_s = _timed(plain_generate)
        _report(rows, (f"SJP generate {a.max_new_tokens} tok (data order)", len(prompts), mean_tokens, gen_s))

    if not a.no_lexam:
        lex_prompts, lex_plan = _prompts(tok, "lexam_mcq4", "loglik", lexam_data, n_lexam, max_length, data_args)
        lex_cases = [Case(p, lex_plan.candidates) for p in lex_prompts]
        time_strategies("LEXam", lex_cases, "LEXam MCQ-4 loglik {strat}")

    dev_name = torch.cuda.get_device_name(0) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    print(f"\nmodel {model_spec} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, {dtype}, "
          f"{getattr(model.config, '_attn_implementation', '?')}) on {dev_name}; load {load_s:.1f}s, "
          f"tokenize {len(prompts)} prompts {tok_s:.1f}s; batch <= {bs} rows, <= {mbt} tokens (generate {gbs}); "
          f"max_length {max_length}; xIELU {'fused' if gpu and not a.python_xielu else 'python'}")
    print(f"{'phase':<44} {'cases':>6} {'tok/case':>9} {'seconds':>9} {'cases/s':>9} {'tok/s':>10}")
    results = []
    for name, count, toks, secs in rows:
        print(f"{name:<44} {count:>6} {toks:>9.0f} {secs:>9.2f} {count / secs:>9.2f} {count * toks / secs:>10.0f}")
        results.append({"phase": name, "cases": count, "mean_tokens": toks, "seconds": secs,
                        "cases_per_s": count / secs, "tokens_per_s": count * toks / secs})
    sjp_ll = [r for r in results if r["phase"].startswith("SJP loglik")]
    lex_ll = [r for r in results if r["phase"].startswith("LEXam")]
    best = max(sjp_ll, key=lambda r: r["tokens_per_s"])
    proj_sjp = SJP_TEST[0] * SJP_TEST[1] / best["tokens_per_s"]
    proj_lex = LEXAM_MCQ4 / max(r["cases_per_s"] for r in lex_ll) if lex_ll else None
    print(f"\nprojected (best strategy): SJP test ({SJP_TEST[0]} cases x {SJP_TEST[1]} tok) loglik {proj_sjp / 60:.1f} min "
          f"(target < 6 min on one H100)" + (f"; LEXam MCQ-4 ({LEXAM_MCQ4}) loglik {proj_lex:.0f} s (target < 60 s)"
                                              if lex_ll else ""))
    summary = {"model": model_spec, "device": dev_name, "dtype": dtype, "batch_size": bs, "max_batch_tokens": mbt, "gen_batch_size": gbs, "max_length": max_length,
               "phases": results, "projected_sjp_test_min": proj_sjp / 60, "projected_lexam_mcq4_s": proj_lex,
               "peak_gib_loglik": peak_ll, "warmup_s": warm_s,
               "fp8_linear_layers": fp8_state.get("layers")}
    gen = [r for r in results if r["phase"].startswith("SJP generate")]
    if gen:
        ratio = best["cases_per_s"] / gen[0]["cases_per_s"]
        summary["loglik_vs_generate_speedup"] = ratio
        print(f"loglik ({best['phase']}) vs generate: {ratio:.2f}x the cases/s")
    print("warm-up before each timed phase (8 cases; compilation included, not in the rates above): "
          + ", ".join(f"{k} {v:.1f}s" for k, v in warm_s.items()))
    if peak_ll is not None:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
