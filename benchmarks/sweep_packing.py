"""Wall time of the same small grid run serially vs packed onto the GPUs (issue 17: sweeps that fill the machine).

    python benchmarks/sweep_packing.py --out runs-pack                       # 1x1 (serial) vs 1x4, and 2x1, 2x4
    python benchmarks/sweep_packing.py --out runs-pack --setups 1x1,1x2,1x4,1x8 --runs 8 --steps 60
    python benchmarks/sweep_packing.py --out runs-pack --setups 1x1,4x1,4x2 --eval   # + SJP evaluation jobs

Each setup `GxN` runs the same grid (the embedded SmolLM2-135M, LoRA lr x rank, bundled SJP train cases, a fixed
number of optimizer steps) from scratch with `lexfine sweep run --gpus <first G GPUs> --runs-per-gpu N` in its own
folder (<out>/<setup>/), and prints one row per setup: wall time of the whole grid, speed-up over the first setup,
mean wall time of one run, aggregate training tokens/s (all runs' tokens / grid wall time) and the largest peak GPU
memory of one run. Setups needing more GPUs than are visible are skipped. --json writes the rows.

On a CPU the scheduler can be tried with fake GPUs: LEXFINE_FAKE_GPUS=0:80,1:80 python benchmarks/sweep_packing.py
--out /tmp/p --setups 1x1,2x1 --runs 2 --steps 1 --max-length 256 (the timings then mean nothing).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

LRS = [1e-4, 3e-4, 1e-3, 3e-3]
RANKS = [4, 16, 64, 1]


def sweep_file(folder: Path, args) -> Path:
    combos = [(lr, r) for r in RANKS for lr in LRS][: args.runs]
    data = {
        "name": "pack",
        "output_dir": str(folder / "sweeps"),
        "base": {
            "model": args.model, "method": "lora", "lora": {"alpha": 16, "dropout": 0.0},
            "data": {"train": args.data, "limit": max(64, args.steps * args.batch)},
            "train": {"max_steps": args.steps, "batch_size": args.batch, "max_length": args.max_length,
                      "save_steps": 10_000, "logging_steps": 5},
            "eval_options": {"sjp_data": "bundled:sjp_fr_heldout", "lexam_data": None, "limit": args.eval_limit,
                             "max_length": args.max_length},
        },
        "eval": ["sjp"] if args.eval else [],
        "variants": [{"train.lr": lr, "lora.r": r} for lr, r in combos],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(f"# python benchmarks/sweep_packing.py (setup {folder.name})\n" + yaml.safe_dump(data))
    return path


def run_setup(setup: str, gpu_ids: list[str], args) -> dict:
    g, n = (int(x) for x in setup.lower().split("x"))
    row: dict = {"setup": setup, "gpus": g, "runs_per_gpu": n}
    if g > len(gpu_ids):
        return {**row, "skipped": f"needs {g} GPUs, {len(gpu_ids)} visible"}
    folder = Path(args.out) / setup
    path = sweep_file(folder, args)
    cmd = [sys.executable, "-c", "from lexfine.cli import main; main()", "sweep", "run", str(path),
           "--gpus", ",".join(gpu_ids[:g]), "--runs-per-gpu", str(n), "--progress-every", "30"]
    if args.gpu_memory_per_run:
        cmd += ["--gpu-memory-per-run", str(args.gpu_memory_per_run)]
    t0 = time.perf_counter()
    with open(folder / "sweep_run.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    manifests = [json.loads(p.read_text()) for p in (folder / "sweeps" / "pack").glob("*/manifest.json")]
    done = [m for m in manifests if m.get("status") == "completed"]
    walls = [m["wall_time_s"] for m in done if isinstance(m.get("wall_time_s"), (int, float))]
    tokens = sum(m.get("train_tokens") or 0 for m in done)
    peaks = [m["peak_gpu_memory_gib"] for m in done if isinstance(m.get("peak_gpu_memory_gib"), (int, float))]
    return {**row, "rc": rc, "runs": len(manifests), "completed": len(done), "wall_s": round(wall, 1),
            "mean_run_s": round(sum(walls) / len(walls), 1) if walls else None,
            "tokens_per_s": round(tokens / wall, 1) if wall else None, "peak_gib": max(peaks) if peaks else None,
            "log": str(folder / "sweep_run.log")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Folder for the setups' sweeps (start from an empty one).")
    ap.add_argument("--setups", default="1x1,1x4,2x1,2x4", help="GPUs x runs per GPU, comma-separated.")
    ap.add_argument("--runs", type=int, default=8, help="Runs in the grid (at most 16).")
    ap.add_argument("--steps", type=int, default=40, help="Optimizer steps per run.")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="bundled:sjp_fr_train")
    ap.add_argument("--eval", action="store_true", help="Also evaluate each run on SJP (eval jobs on free slots).")
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--gpu-memory-per-run", type=float, default=None, help="Passed on (skip the estimate).")
    ap.add_argument("--json", default=None, help="Write the rows here.")
    args = ap.parse_args()

    from lexfine.sweep.gpus import inventory

    gpu_ids = [g.id for g in inventory()]
    print(f"visible GPUs: {', '.join(gpu_ids) or 'none'}; grid: {args.runs} LoRA runs of {args.model}, "
          f"{args.steps} steps of {args.batch} x {args.max_length}{', + SJP eval' if args.eval else ''}")
    rows = []
    for setup in args.setups.split(","):
        row = run_setup(setup.strip(), gpu_ids, args)
        rows.append(row)
        print("ROW " + json.dumps(row), flush=True)
    base = next((r["wall_s"] for r in rows if r.get("wall_s")), None)
    print(f"\n{'setup':<7} {'done':>6} {'wall s':>8} {'speed-up':>8} {'run s':>7} {'tok/s':>9} {'peak GiB':>8}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['setup']:<7} skipped: {r['skipped']}")
            continue
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{r['setup']:<7} {r['completed']:>3}/{r['runs']:<2} {r['wall_s']:>8.1f} "
              f"{fmt(base / r['wall_s'] if base else None, '>7.2f')}x {fmt(r['mean_run_s'], '>7.1f')} "
              f"{fmt(r['tokens_per_s'], '>9.0f')} {fmt(r['peak_gib'], '>8.1f')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0 if all(r.get("rc", 0) == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
