"""Data preparation speed: SJP cases tokenized and masked per second, serial vs parallel workers vs the cache.

    python benchmarks/data_prep.py                          # bundled French SJP cases (800), embedded SmolLM2
    python benchmarks/data_prep.py --data ../shared/data/sjp/fr_train.parquet --workers 1,16 --limit 0
    python benchmarks/data_prep.py --tokenizer DIR          # another tokenizer (e.g. Apertus's)

Every row goes through lexfine.data.prepare.tokenized_dataset, the path `lexfine train` takes: "cold" rows write
to a fresh cache folder (so they include the cache write), the "cached" row reads what the last cold row wrote.
The parallel rows are checked to give the serial row's Dataset exactly. The "bare tokenizers" rows are the floor to
compare with: the tokenizer's own Rust backend (a copy, as `Tokenizer.from_file` of its tokenizer.json gives) encoding
each case's rendered prompt once, in as many forked processes, nothing else (no answer, masking, truncation, cache).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


_BARE: tuple | None = None  # (backend, texts) that the forked bare-tokenizer processes encode


def _bare_range(bounds: tuple[int, int]) -> int:
    backend, texts = _BARE
    return sum(len(backend.encode(t, add_special_tokens=False).ids) for t in texts[bounds[0]:bounds[1]])


def bare_tokenizer_seconds(tokenizer, examples, workers: int) -> float:
    """Seconds for the bare backend to encode every case's rendered prompt, in `workers` forked processes."""
    import multiprocessing

    import tokenizers

    global _BARE
    texts = [tokenizer.apply_chat_template(ex.messages(), add_generation_prompt=True, tokenize=False)
             for ex in examples]
    _BARE = (tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()), texts)
    chunk = max(1, -(-len(texts) // (8 * workers)))
    bounds = [(i, min(i + chunk, len(texts))) for i in range(0, len(texts), chunk)]
    t = time.perf_counter()
    if workers <= 1:
        for b in bounds:
            _bare_range(b)
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            list(pool.imap(_bare_range, bounds))
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="bundled:sjp_fr_train", help="data.train: a file, folder or bundled:<name>")
    p.add_argument("--tokenizer", default="smollm2-135m", help="a model spec, or a folder holding a tokenizer")
    p.add_argument("--chat-template", default=None, help="model_args.chat_template (chatml, apertus, a .jinja)")
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--limit", type=int, default=0, help="first N cases only (0: all)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts, one cold row each")
    p.add_argument("--no-bare", action="store_true", help="skip the bare-tokenizer rows")
    p.add_argument("--eval-prompts", action="store_true", help="add rows for `lexfine eval`'s SJP prompts")
    args = p.parse_args(argv)

    from lexfine import models
    from lexfine.config import build_config
    from lexfine.data import load_examples
    from lexfine.data.prepare import tokenized_dataset

    import datasets  # noqa: F401  (imported by training before this step: not part of the first row's time)

    tok_dir = Path(args.tokenizer)
    # a bare tokenizer folder (no config.json: no model to resolve) is given as model_args.tokenizer
    model = ["model=random:apertus-8b", f"model_args.tokenizer={tok_dir}"] \
        if tok_dir.is_dir() and not (tok_dir / "config.json").is_file() else [f"model={args.tokenizer}"]
    over = [*model, f"data.train={args.data}", f"train.max_length={args.max_length}"]
    over += [f"data.limit={args.limit}"] if args.limit else []
    over += [f"model_args.chat_template={args.chat_template}"] if args.chat_template else []
    cfg = build_config({}, over)
    tok = models.load_tokenizer(models.resolve(cfg.model), cfg.model_args)
    examples = load_examples(cfg.data, seed=cfg.train.seed)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{len(examples)} cases from {args.data}, max_length {args.max_length}, tokenizer {args.tokenizer}; "
          f"{cores} cores of {cpu_name()}, load average {os.getloadavg()[0]:.1f}")
    print(f"| {'row':<22} | workers | seconds | cases/s | cache hit |")
    print("|---|---|---|---|---|")
    reference = None
    for w in [int(x) for x in args.workers.split(",")]:
        os.environ["LEXFINE_TOKENIZED_CACHE"] = tempfile.mkdtemp(prefix="lexfine-bench-")
        t = time.perf_counter()
        ds, stats = tokenized_dataset(tok, examples, cfg.train.max_length, cfg.data.loss_on, cfg.data.truncation,
                                      progress=False, workers=w)
        dt = time.perf_counter() - t
        reference = ds[:] if reference is None else reference
        same = "" if ds[:] == reference else "  DIFFERS FROM THE FIRST ROW"
        print(f"| {'cold, ' + ('serial' if w == 1 else 'parallel'):<22} | {w} | {dt:.1f} | {len(examples) / dt:.0f} | "
              f"{stats.cache_hit} |{same}")
    t = time.perf_counter()
    ds, stats = tokenized_dataset(tok, examples, cfg.train.max_length, cfg.data.loss_on, cfg.data.truncation,
                                  progress=False)
    dt = time.perf_counter() - t
    print(f"| {'cached (second run)':<22} | - | {dt:.2f} | {len(examples) / dt:.0f} | {stats.cache_hit} |")
    for w in [] if args.no_bare else [int(x) for x in args.workers.split(",")]:
        dt = bare_tokenizer_seconds(tok, examples, w)
        print(f"| {'bare tokenizers encode':<22} | {w} | {dt:.1f} | {len(examples) / dt:.0f} | - |")
    ok = ds[:] == reference
    if args.eval_prompts:  # what `lexfine eval --task sjp` builds before scoring (lexfine.eval.runner.build_prompts)
        from lexfine.eval.runner import build_prompts, make_plan
        from lexfine.eval.tasks import get_task

        plan = make_plan(tok, get_task("sjp"), "loglik", args.max_length)
        first = None
        for w in [int(x) for x in args.workers.split(",")]:
            os.environ["LEXFINE_TOKENIZE_WORKERS"] = str(w)
            t = time.perf_counter()
            built = build_prompts(tok, examples, plan, cfg.data.truncation)
            dt = time.perf_counter() - t
            first = built if first is None else first
            ok = ok and built == first
            print(f"| {'eval prompts':<22} | {w} | {dt:.1f} | {len(examples) / dt:.0f} | - |"
                  f"{'' if built == first else '  DIFFERS FROM THE FIRST ROW'}")
        os.environ.pop("LEXFINE_TOKENIZE_WORKERS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
