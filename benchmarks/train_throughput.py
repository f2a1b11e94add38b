"""Training throughput on the real Apertus-8B architecture (random weights), through lexfine's own training path.

    python benchmarks/train_throughput.py                 # one GPU: reference setup vs lexfine, lever by lever
    python benchmarks/train_throughput.py --tiny          # CPU smoke run in seconds (tiny Apertus)

Sequence lengths are drawn from the real French SJP train-year cases as lexfine tokenizes them (SmolLM2 tokenizer,
sjp_default prompt, max 4096: benchmarks/sjp_fr_train_lengths.json; median 1461, p90 2998 tokens). Token ids are
random: speed does not depend on them. Tokens/s counts real (non-pad) tokens only, over the measured steps; the
warm-up steps start with one batch at max length (memory peak, compilation of the largest shapes). Every row with
the same batch size sees the same batches (see batch_lengths).

MFU = achieved FLOP/s / peak bf16 dense FLOP/s (H100 SXM: 989e12; H200: 989e12), with FLOPs per real token
    LoRA: 4N + 12 L d s     full: 6N + 12 L d s
N = parameters of the decoder layers (embeddings and LM head excluded), L layers, d hidden size, s the token's own
sequence length (attention; causal masking not discounted). Recomputation by checkpointing is not counted.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "GH200": 989e12}

# Each row changes one thing from the row before it (levers measured one at a time), up to the shipped setup.
OFF = {"train.compile_layers": False}
FIXED = {"train.adaptive_checkpointing": False}
ROWS = [
    ("reference (study: batch 4, pad longest, ckpt, loss on all)",
     {**OFF, "train.group_by_length": False, "train.fused_activation": False, "data.loss_on": "all"}),
    ("+ length-grouped batches", {**OFF, "train.fused_activation": False, "data.loss_on": "all"}),
    ("+ fused xIELU", {**OFF, "data.loss_on": "all"}),
    ("+ loss on the answer only", {**OFF}),
    ("+ compiled decoder layers (lexfine default on a GPU)", {"train.compile_layers": True}),
    ("+ ckpt on 9/16 of the layers, every step", {"train.compile_layers": True, "train.checkpoint_fraction": 0.5625,
                                                   **FIXED}),
    ("+ adaptive: 9/16 at a full batch (shipped 8B LoRA)", {"train.compile_layers": True,
                                                             "train.checkpoint_fraction": 0.5625}),
    ("adaptive, 1/2 at a full batch", {"train.compile_layers": True, "train.checkpoint_fraction": 0.5}),
    ("ckpt on 1/2 of the layers, not compiled", {**OFF, **FIXED, "train.checkpoint_fraction": 0.5}),
    ("compiled, no activation checkpointing", {"train.compile_layers": True, "train.gradient_checkpointing": False}),
    ("compiled, adaptive 3/4 at a full batch, batch 8", {"train.compile_layers": True,
                                                         "train.checkpoint_fraction": 0.75, "train.batch_size": 8}),
    ("compiled, all layers ckpt, batch 8", {"train.compile_layers": True, "train.batch_size": 8}),
    ("not compiled, all layers ckpt, batch 8", {**OFF, "train.batch_size": 8}),
]


def minimal_tokenizer(vocab_size: int):
    """Padding and EOS ids are all the trainer needs from a tokenizer when the data is already token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def batch_lengths(steps: int, batch: int, max_length: int, grouped: bool, seed: int = 0) -> list[list[int]]:
    """Per-step sequence lengths, identical for every row with the same batch size and grouping.

    The first batch is the worst case (every sequence at max_length: the memory peak, and compiled kernels see the
    largest shapes early). The rest are drawn from the real SJP length distribution: grouped rows sort the draws and
    cut them into batches (what length grouping does within a mega-batch), then shuffle the batch order, so a short
    measured window still covers the whole distribution; ungrouped rows batch the draws as they come."""
    lengths = json.loads((HERE / "sjp_fr_train_lengths.json").read_text())["lengths"]
    rng = random.Random(seed)
    draws = [min(rng.choice(lengths), max_length) for _ in range((steps - 1) * batch)]
    if grouped:
        draws.sort()
    batches = [draws[i:i + batch] for i in range(0, len(draws), batch)]
    if grouped:
        rng.shuffle(batches)
    return [[max_length] * batch] + batches


def synthetic_dataset(batches: list[list[int]], vocab: int, loss_on: str, seed: int = 0):
    """Random token ids in exactly the given batch order (the trainer reads it sequentially)."""
    from datasets import Dataset

    rng = random.Random(seed)
    ids, labels = [], []
    for length in (n for b in batches for n in b):
        seq = [rng.randrange(10, vocab) for _ in range(length)]
        ids.append(seq)
        labels.append(list(seq) if loss_on == "all" else [-100] * (length - 4) + seq[-4:])
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def decoder_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and "lora_" not in n)


def run_row(label: str, overrides: dict, base: list[str], steps: int, warmup: int, vocab_limit: int | None):
    from torch.utils.data import SequentialSampler
    from trl import SFTTrainer
    from transformers import TrainerCallback

    from lexfine import models
    from lexfine.config import build_config
    from lexfine.rundir import RunDir
    from lexfine.train.sft import build_args, lora_config, weights_dtype
    from lexfine.train.speed import apply_speed_levers

    cfg = build_config({}, base + [f"{k}={v}" for k, v in overrides.items()])
    cfg.train.max_steps = warmup + steps
    spec = models.resolve(cfg.model)
    arch = models.architecture_config(spec, cfg.model_args)
    vocab = min(arch.vocab_size, vocab_limit or arch.vocab_size)
    tok = minimal_tokenizer(vocab)
    batches = batch_lengths(warmup + steps, cfg.train.batch_size, cfg.train.max_length, cfg.train.group_by_length,
                            seed=cfg.train.seed)
    data = synthetic_dataset(batches, vocab, cfg.data.loss_on, seed=cfg.train.seed)
    cuda = torch.cuda.is_available()
    torch.cuda.empty_cache() if cuda else None
    torch.cuda.reset_peak_memory_stats() if cuda else None
    model = models.load_model(spec, cfg.model_args, dtype=weights_dtype(cfg) if cuda else torch.float32,
                              device="cuda" if cuda else None)
    callbacks, _ = apply_speed_levers(cfg, model)
    n_dec, layers, hidden = decoder_params(model), arch.num_hidden_layers, arch.hidden_size
    args = build_args(cfg, RunDir(Path("/tmp/lexfine-bench") / label.replace(" ", "_")[:40]))
    args.save_strategy = "no"
    args.report_to = []
    marks = []

    from torch._dynamo.utils import counters

    class Clock(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                if cuda:
                    torch.cuda.synchronize()
                marks.append((state.global_step, time.perf_counter(), float(logs["num_tokens"]),
                              counters["stats"]["unique_graphs"]))  # graphs compiled so far in this process

    class InOrder(SFTTrainer):  # the batch order is built above (length grouping included): read it as is
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=lora_config(cfg) if cfg.method == "lora" else None, callbacks=[Clock(), *callbacks])
    err = None
    try:
        trainer.train()
    except torch.OutOfMemoryError as e:
        err = "OOM"
        print(f"{label}: out of memory ({str(e).splitlines()[0][:120]})")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    ckpt = cfg.train.checkpoint_fraction if cfg.train.gradient_checkpointing else 0
    row = {"setup": label, "batch": cfg.train.batch_size, "ckpt": ckpt, "compiled": cfg.train.compile_layers,
           "adaptive": cfg.train.adaptive_checkpointing and 0 < ckpt < 1,
           "peak_gib": round(peak, 1), "error": err}
    if not err:
        w = [m for m in marks if m[0] >= warmup]
        (s0, t0, k0, _), (s1, t1, k1, _) = w[0], w[-1]
        tokens_per_s = (k1 - k0) / (t1 - t0)
        # steps in the window during which Dynamo compiled a graph (a new shape, or the first compiled row)
        steps = list(zip(w, w[1:]))
        quiet = [(b[2] - a[2], b[1] - a[1]) for a, b in steps if b[3] == a[3]]
        compiling = len(steps) - len(quiet)
        tps_quiet = sum(k for k, _ in quiet) / sum(t for _, t in quiet) if quiet else None
        # attention FLOPs: per token 12*L*d*s, with s the mean sequence length weighted by tokens
        lengths = [n for b in batches[warmup:] for n in b]  # the measured steps' sequences
        s_mean = sum(x * x for x in lengths) / sum(lengths)
        per_token = (4 if cfg.method == "lora" else 6) * n_dec + 12 * layers * hidden * s_mean
        name = torch.cuda.get_device_name(0) if cuda else "cpu"
        peak_flops = next((v for k, v in PEAK_BF16.items() if k in name), None)
        sc = next((c for c in callbacks if hasattr(c, "counted")), None)
        if sc and sc.counted[0]:
            row.update(ckpt_layers_mean=round(sc.counted[1] / sc.counted[0], 2))
        row.update(step_times=[round(b[1] - a[1], 3) for a, b in zip(marks, marks[1:])])
        row.update(tokens_per_s=round(tokens_per_s, 1), step_s=round((t1 - t0) / (s1 - s0), 3),
                   mfu=round(tokens_per_s * per_token / peak_flops, 3) if peak_flops else None,
                   compiling_steps=compiling,
                   tokens_per_s_no_compile=round(tps_quiet, 1) if tps_quiet and compiling else None)
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny Apertus on the CPU (smoke test)")
    ap.add_argument("--model", default="random:apertus-8b")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", default="0,1,2,3,4,5,6",
                    help="comma-separated row numbers (0-based; default: the lever-by-lever rows) or 'all'")
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    a = ap.parse_args()
    base = [f"model={a.model}", f"method={a.method}", "lora.r=64", "lora.alpha=128", "lora.dropout=0.0",
            "train.batch_size=4", "train.max_length=4096", "train.lr=1e-4", "train.gradient_checkpointing=true",
            "train.logging_steps=1"]
    vocab_limit = None
    if a.tiny:
        arch = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}
        base += [f"model_args.arch_overrides={json.dumps(arch)}", "model_args.dtype=float32", "train.max_length=256"]
        a.steps, a.warmup, vocab_limit = 3, 1, 512
    rows = ROWS if a.rows == "all" else [ROWS[int(i)] for i in a.rows.split(",")]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    results = []
    for label, over in rows:
        results.append(run_row(label, over, base, a.steps, a.warmup, vocab_limit))
        print("ROW", json.dumps(results[-1]), flush=True)
    ref = results[0].get("tokens_per_s")
    print(f"\n{a.model} {a.method} on {device}; {a.steps} measured steps after {a.warmup} warm-up")
    print(f"{'setup':58} {'batch':>5} {'ckpt':>6} {'tok/s':>9} {'x ref':>6} {'s/step':>7} {'MFU':>6} {'peak GiB':>9}"
          f"  compiling steps")
    for r in results:
        tps = r.get("tokens_per_s")
        ratio = f"{tps / ref:.2f}" if tps and ref else "-"
        ckpt = f"{r['ckpt']:.3g}{'a' if r['adaptive'] else ''}"
        print(f"{r['setup'][:58]:58} {r['batch']:>5} {ckpt:>6} {tps or r['error']!s:>9} {ratio:>6} "
              f"{r.get('step_s', '-')!s:>7} {r.get('mfu') or '-'!s:>6} {r['peak_gib']:>9}  "
              + (f"{r['compiling_steps']} (without them: {r['tokens_per_s_no_compile']} tok/s)"
                 if r.get("compiling_steps") else "0"))
    print("ckpt: fraction of the layers checkpointed; 'a': adaptive (that fraction at a full batch, fewer on shorter)")
    print("compiling steps: measured steps in which torch.compile built a graph (not steady state); a compiled row\n"
          "that compiles inside the window is best re-run after another compiled row in the same process")
    if a.out:
        a.out.write_text(json.dumps({"device": device, "model": a.model, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
