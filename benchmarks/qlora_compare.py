"""Side by side: the bf16 LoRA and QLoRA runs of a `lora.quantize: [none, nf4]` sweep (issue 21's quality check).

    python benchmarks/qlora_compare.py sweeps/qlora-quality-cpu      # after: lexfine sweep run benchmarks/qlora_quality_cpu.yaml
    python benchmarks/qlora_compare.py sweeps/qlora-quality          # after: benchmarks/qlora_quality.yaml (a GPU)

Prints the training loss at a few steps, the mean loss per quarter of the run with the paired difference (QLoRA -
bf16, same batches) and its 95% interval over the steps of that quarter, then each run's SJP validation and LEXam
scores with the 95% CIs lexfine's evaluation wrote.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path


def load(sweep: Path, quantize: str):
    found = sorted(sweep.glob(f"*quantize-{quantize}-*/manifest.json"))
    if not found:
        sys.exit(f"no run with lora.quantize={quantize} in {sweep}")
    run = found[0].parent
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, json.loads(found[0].read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", type=Path)
    args = p.parse_args(argv)
    (a, ma), (b, mb) = load(args.sweep_dir, "none"), load(args.sweep_dir, "nf4")
    steps = sorted(set(a) & set(b))
    n = len(steps)
    print("| step | bf16 LoRA | QLoRA NF4 |\n|---:|---:|---:|")
    for s in sorted({1, 2, *steps[n // 8::max(1, n // 8)], steps[-1]}):
        print(f"| {s} | {a[s]:.3f} | {b[s]:.3f} |")
    print("\n| steps | bf16 LoRA mean loss | QLoRA mean loss | paired difference (95% interval) |\n|---|---:|---:|---:|")
    for q in range(4):
        part = steps[q * n // 4:(q + 1) * n // 4]
        diffs = [b[s] - a[s] for s in part]
        half = 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        print(f"| {part[0]}-{part[-1]} | {statistics.mean(a[s] for s in part):.3f} | "
              f"{statistics.mean(b[s] for s in part):.3f} | {statistics.mean(diffs):+.3f} +- {half:.3f} |")
    print("\n| run | steps | final loss | SJP accuracy (95% CI) | SJP macro-F1 (95% CI) | LEXam accuracy (95% CI) |")
    print("|---|---:|---:|---|---|---|")

    def ci(e, k):
        lo, hi = e.get(f"{k}_ci95") or (float("nan"), float("nan"))
        return f"{e.get(k, float('nan')):.3f} [{lo:.3f}, {hi:.3f}]"

    base = ma.get("base_evals") or {}
    for name, m in (("base model (bf16)", None), ("bf16 LoRA", ma), ("QLoRA NF4 (adapter on the bf16 base)", mb)):
        ev = base if m is None else (m.get("evals") or {})
        sjp, lex = ev.get("sjp-validation-loglik") or {}, ev.get("lexam_mcq4-loglik") or {}
        steps_s = "-" if m is None else m.get("steps")
        loss = "-" if m is None else f"{m.get('final_loss'):.4f}"
        print(f"| {name} | {steps_s} | {loss} | {ci(sjp, 'accuracy')} (n={sjp.get('n')}) | {ci(sjp, 'macro_f1')} | "
              f"{ci(lex, 'accuracy')} (n={lex.get('n')}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
