"""Dynamo recompilations of `lexfine train` with compiled decoder layers, step by step, with their guard failures.

    python benchmarks/recompiles.py --steps 100 --scale 0.0625 --set train.max_length=256   # CPU: tiny Apertus,
                                                  # SJP length mix / 16 (at full length a CPU step takes minutes)
    python benchmarks/recompiles.py ... --set train.pad_to_multiple_of=1   # pad to the longest only
    python benchmarks/recompiles.py --model random:apertus-8b --full-size --steps 1000   # a GPU: the 8B itself

Runs lexfine's own training recipe (lexfine.train.sft.run: build_args, TRL's SFTTrainer with its collator, the
length-grouped sampler, apply_speed_levers, the timings callback that writes `timings.recompiles` to the manifest).
Only the data differs: random token ids with lengths drawn from the real French SJP train-year cases
(benchmarks/sjp_fr_train_lengths.json, 129-4096 tokens, 3.6% at max length), answer-only labels (the last 4
tokens), so the batches the trainer sees have the padding pattern of a real run. On a CPU the layers compile with
aot_eager (what lexfine does there): recompilations are decided by Dynamo's guards, which do not depend on the
backend. Prints one line per frame compilation (step, reason) and the manifest's timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096}


def synthetic_dataset(n: int, vocab: int, max_length: int, seed: int = 0, scale: float = 1.0):
    """n cases with lengths drawn from the real SJP distribution (optionally scaled), answer-only labels."""
    from datasets import Dataset

    from lexfine.data.prepare import PreparedStats

    lengths = json.loads((HERE / "sjp_fr_train_lengths.json").read_text())["lengths"]
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        length = max(8, min(max_length, round(rng.choice(lengths) * scale)))
        seq = [rng.randrange(10, vocab) for _ in range(length)]
        ids.append(seq)
        labels.append([-100] * (length - 4) + seq[-4:])
    stats = PreparedStats(n=n)
    return Dataset.from_dict({"input_ids": ids, "labels": labels}), stats


class StepLog(logging.Handler):
    """Collects Dynamo's recompile and graph-break messages with the optimizer step they happened in."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.events: list[tuple[int, str]] = []

    def emit(self, record):
        msg = record.getMessage()
        if "Recompiling" in msg or "triggered by the following guard failure" in msg or "Graph break" in msg:
            self.events.append((self.step + 1, msg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:apertus-8b")
    ap.add_argument("--full-size", action="store_true", help="the model's own architecture, not the tiny one")
    ap.add_argument("--arch", default="{}", help="JSON overrides of the tiny architecture")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--cases", type=int, default=0, help="dataset size (default: steps x batch)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every drawn length (CPU: faster steps)")
    ap.add_argument("--set", action="append", default=[], help="dotted config override (repeatable)")
    ap.add_argument("--json", type=Path, help="write the events and timings here")
    a = ap.parse_args()

    import torch
    import torch._dynamo

    from lexfine import models
    from lexfine.config import build_config
    from lexfine.rundir import RunDir
    from lexfine.train import sft

    out = Path(tempfile.mkdtemp(prefix="lexfine-recompiles-"))
    over = ["method=lora", "lora.r=8", "lora.alpha=16", "lora.dropout=0.0", "train.batch_size=4",
            "train.max_length=4096", "train.gradient_checkpointing=true", "train.checkpoint_fraction=0.5",
            "train.compile_layers=true", "train.logging_steps=10", "train.save_steps=100000", "eval=[]",
            f"output_dir={out}", f"model={a.model}", f"train.max_steps={a.steps}"]
    if not a.full_size:
        over += [f"model_args.arch_overrides={json.dumps({**TINY, **json.loads(a.arch)})}",
                 "model_args.dtype=float32"]
    cfg = build_config({"name": "recompiles"}, over + a.set)
    t = cfg.train
    n = a.cases or a.steps * t.batch_size * t.grad_accum
    spec = models.resolve(cfg.model)
    vocab = models.load_tokenizer(spec, cfg.model_args).vocab_size
    data = synthetic_dataset(n, vocab, t.max_length, seed=t.seed, scale=a.scale)
    sft.load_dataset = lambda cfg, tokenizer: data

    handler = StepLog()
    torch._logging.set_logs(recompiles=True, graph_breaks=True)
    logging.getLogger("torch._dynamo").addHandler(handler)  # its children's records propagate to it

    import lexfine.train.timings as timings_mod

    base_cls = timings_mod.TimingsCallback

    class WithStep(base_cls):  # the recipe builds its own callbacks: piggy-back on the timings one
        def on_step_begin(self, args, state, control, **kw):
            handler.step = state.global_step

    timings_mod.TimingsCallback = WithStep
    t0 = time.time()
    rd = sft.run(cfg)
    wall = time.time() - t0
    timings_mod.TimingsCallback = base_cls
    m = RunDir(rd.path).manifest()
    from torch._dynamo.utils import counters

    print(f"\n{a.steps} steps in {wall:.0f} s; status {m['status']}; speed {m.get('speed')}")
    print("timings:", json.dumps(m.get("timings")))
    print("dynamo frames:", dict(counters["frames"]), "unique graphs:", counters["stats"]["unique_graphs"])
    for step, msg in handler.events:
        print(f"step {step}: {msg}")
    if a.json:
        a.json.write_text(json.dumps({"overrides": over + a.set, "timings": m.get("timings"), "wall_s": wall,
                                      "frames": dict(counters["frames"]),
                                      "events": [{"step": s, "message": e} for s, e in handler.events]}, indent=1))
    sys.exit(0 if m["status"] == "completed" else 1)


if __name__ == "__main__":
    main()
