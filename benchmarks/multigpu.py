"""Multi-GPU correctness and scaling on one host (issue 7): DDP, ZeRO-2, ZeRO-3, FSDP2 through `lexfine train`.

    NCCL_NVLS_ENABLE=0 python benchmarks/multigpu.py --out runs-mgpu [--tokenizer DIR] [--strategies ddp,zero3]

For each method (LoRA, full) it trains a ~1B Apertus-architecture model (random weights, 8 layers, width 2048) on
bundled SJP cases for a few steps: once on 1 GPU with gradient accumulation 2 (the reference), then on 2 GPUs with
accumulation 1 under each strategy. It prints, per run: status, max relative difference of the loss trajectory
against the reference, adapter / weights check, tokens/s per GPU and peak memory is in the manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ARCH = {"num_hidden_layers": 8, "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128}


def config(out: Path, method: str, strategy: str, gpus: int, accum: int, tokenizer: str | None, steps: int) -> dict:
    cfg = {
        "name": f"{method}-{strategy}-{gpus}gpu",
        "model": "random:apertus-8b",
        "model_args": {"arch_overrides": ARCH, **({"tokenizer": tokenizer} if tokenizer else {})},
        "method": method,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"limit": 64},
        "train": {"max_steps": steps, "batch_size": 4, "grad_accum": accum, "max_length": 1024,
                  "lr": 1e-4 if method == "lora" else 1e-5, "logging_steps": 1, "save_steps": 1000,
                  "group_by_length": False},  # HF groups per device batch x accum: layouts would differ
        "launch": {"strategy": strategy, "num_processes": gpus},
        "output_dir": str(out / "runs"),
    }
    return cfg


def train(cfg: dict, out: Path) -> tuple[int, float, Path | None]:
    path = out / "configs" / f"{cfg['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    log = out / "logs" / f"{cfg['name']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        try:
            code = subprocess.call([sys.executable, "-m", "lexfine.cli", "train", str(path)], stdout=f, stderr=f,
                                   timeout=300)
        except subprocess.TimeoutExpired:
            code = 124
    found = sorted((out / "runs").glob(f"{cfg['name']}-*"))
    run_dir = found[-1] if code == 0 and found else None
    if code != 0:
        tail = [x for x in log.read_text().splitlines() if "Error" in x or "error" in x][-3:]
        print(f"FAILED {cfg['name']} rc={code}:", *tail, sep="\n  ", flush=True)
    return code, time.time() - t0, run_dir


def losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def check_output(run_dir: Path, method: str) -> str:
    if method == "lora":
        from safetensors.torch import load_file

        t = load_file(run_dir / "adapter" / "adapter_model.safetensors")
        mods = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in t}
        zero_b = sum(1 for k, v in t.items() if "lora_B" in k and float(v.abs().sum()) == 0)
        return f"adapter {len(t)} tensors, modules {sorted(mods)}, zero lora_B {zero_b}"
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    return f"weights reload ok ({sum(p.numel() for p in m.parameters()) / 1e9:.2f}B params)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--strategies", default="ddp,zero2,zero3,fsdp2")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    rows = []
    for method in a.methods.split(","):
        ref_cfg = config(a.out, method, "none", 1, 2, a.tokenizer, a.steps)
        code, wall, ref_dir = train(ref_cfg, a.out)
        ref = losses(ref_dir) if ref_dir else None
        rows.append((method, "1 GPU x accum 2", code, wall, ref_dir, None))
        for strategy in a.strategies.split(","):
            code, wall, run_dir = train(config(a.out, method, strategy, 2, 1, a.tokenizer, a.steps), a.out)
            diff = None
            if run_dir and ref:
                got = losses(run_dir)
                diff = max(abs(x - y) / abs(y) for x, y in zip(got, ref)) if len(got) == len(ref) else float("inf")
            rows.append((method, f"{strategy} 2 GPU x accum 1", code, wall, run_dir, diff))
            print("ROW", method, strategy, code, diff, flush=True)
    print(f"\n{'method':6} {'setup':24} {'rc':>3} {'wall s':>7} {'max rel dloss':>13} {'tok/s/GPU':>10}  output")
    for method, setup, code, wall, run_dir, diff in rows:
        m = json.loads((run_dir / "manifest.json").read_text()) if run_dir else {}
        tps = m.get("tokens_per_s")
        per_gpu = tps / m.get("world_size", 1) if tps else None
        check = check_output(run_dir, method) if run_dir else "FAILED (see logs)"
        d = f"{diff:.2e}" if diff is not None else "-"
        print(f"{method:6} {setup:24} {code:>3} {wall:>7.0f} {d:>13} {per_gpu or '-'!s:>10}  {check}")


if __name__ == "__main__":
    main()
