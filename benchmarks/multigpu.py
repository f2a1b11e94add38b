"""Multi-GPU correctness and scaling on one host (issue 7): DDP, ZeRO-2, ZeRO-3, FSDP2 through `lexfine train`.

    NCCL_NVLS_ENABLE=0 python benchmarks/multigpu.py --out runs-mgpu [--tokenizer DIR] [--strategies ddp,zero3]
    # scaling of a shipped config (real architecture, random weights, bundled SJP cases), per GPU count:
    NCCL_NVLS_ENABLE=0 python benchmarks/multigpu.py --out runs-scale --scaling configs/exp/sjp_lora_apertus8b.yaml \
        --model random:apertus-8b --gpus 1,2 --strategies ddp,zero2,zero3,fsdp2 --steps 12
    NCCL_NVLS_ENABLE=0 python benchmarks/multigpu.py --out runs-70b --scaling configs/exp/sjp_lora_apertus70b.yaml \
        --model random:apertus-70b --gpus 4 --strategies zero3,fsdp2 --steps 12

For each method (LoRA, full) it trains a ~1B Apertus-architecture model (random weights, 8 layers, width 2048) on
bundled SJP cases for a few steps: once on 1 GPU with gradient accumulation 2 (the reference), then on 2 GPUs with
accumulation 1 under each strategy. It prints, per run: status, max relative difference of the loss trajectory
against the reference, adapter / weights check, tokens/s per GPU and peak memory is in the manifest.

With --scaling CONFIG it instead trains that config (its model replaced by --model, its data by the bundled SJP
train cases, no evaluation) for --steps steps per strategy and GPU count, and prints tokens/s per GPU (median of
the per-step rates after the first third of the steps, so compilation and warm-up stay out), peak memory of rank 0
and the time to save the adapter or weights.
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


def train(cfg: dict, out: Path, overrides: list[str] | None = None, timeout: int = 300) -> tuple[int, float, Path | None]:
    """`lexfine train` on cfg (a config dict, or a config file path with overrides); the run directory if it ended."""
    if "path" in cfg:
        path = cfg["path"]
    else:
        path = out / "configs" / f"{cfg['name']}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
    log = out / "logs" / f"{cfg['name']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        try:
            code = subprocess.call([sys.executable, "-m", "lexfine.cli", "train", str(path), *(overrides or [])],
                                   stdout=f, stderr=f, timeout=timeout)
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


def scaling(a) -> None:
    """Tokens/s per GPU, peak memory and save time of a shipped config for each strategy and GPU count."""
    rows = []
    for gpus in (int(g) for g in a.gpus.split(",")):
        for strategy in (["none"] if gpus == 1 else a.strategies.split(",")):
            name = f"scale-{strategy}-{gpus}gpu"
            over = [f"name={name}", f"model={a.model}", "data.train=bundled:sjp_fr_train", "eval=[]",
                    f"train.max_steps={a.steps}", "train.save_steps=100000", "train.logging_steps=1",
                    f"launch.strategy={strategy}", f"launch.num_processes={gpus}", "launch.num_machines=1",
                    f"output_dir={a.out / 'runs'}"]
            if a.tokenizer:
                over.append(f"model_args.tokenizer={a.tokenizer}")
            code, wall, run_dir = train({"path": a.scaling, "name": name}, a.out, over, timeout=a.timeout)
            m = json.loads((run_dir / "manifest.json").read_text()) if run_dir else {}
            rates = [r["tokens_per_s"] for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text()
                     .splitlines() if x.strip())][a.steps // 3:] if run_dir else []
            rates = sorted(r for r in rates if r)
            per_gpu = rates[len(rates) // 2] / gpus if rates else None
            rows.append((strategy, gpus, code, wall, per_gpu, m.get("peak_gpu_memory_gib"), m.get("save_s")))
            print("ROW", json.dumps(dict(zip(("strategy", "gpus", "rc", "wall_s", "tokens_per_s_per_gpu",
                                              "peak_gib_rank0", "save_s"), rows[-1]))), flush=True)
    print(f"\n{a.scaling} on {a.model}, {a.steps} steps")
    print(f"{'strategy':9} {'GPUs':>4} {'rc':>3} {'wall s':>7} {'tok/s/GPU':>10} {'peak GiB':>9} {'save s':>7}")
    for strategy, gpus, code, wall, tps, peak, save in rows:
        print(f"{strategy:9} {gpus:>4} {code:>3} {wall:>7.0f} {tps or '-'!s:>10} {peak or '-'!s:>9} {save or '-'!s:>7}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--strategies", default="ddp,zero2,zero3,fsdp2")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--scaling", type=Path, default=None, help="a shipped config to time instead (see above)")
    ap.add_argument("--model", default="random:apertus-8b", help="--scaling: the model to put in the config")
    ap.add_argument("--gpus", default="1,2", help="--scaling: GPU counts (1 runs without a strategy)")
    ap.add_argument("--timeout", type=int, default=1800, help="--scaling: seconds per run")
    a = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if a.scaling:
        return scaling(a)
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
