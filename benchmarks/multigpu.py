"""Multi-GPU correctness and scaling on one host (issues 7, 18): DDP, ZeRO-2, ZeRO-3, FSDP2 through `lexfine train`.

    NCCL_NVLS_ENABLE=0 python benchmarks/multigpu.py --out runs-mgpu [--tokenizer DIR] [--strategies ddp,zero3] \
        [--budget 540] [--json rows.json]
    # scaling of a shipped config (real architecture, random weights, bundled SJP cases), per GPU count:
    NCCL_NVLS_ENABLE=0 python benchmarks/multigpu.py --out runs-scale --scaling configs/exp/sjp_lora_apertus8b.yaml \
        --model random:apertus-8b --gpus 1,2 --strategies ddp,zero2,zero3,fsdp2 --steps 12
    NCCL_NVLS_ENABLE=0 python benchmarks/multigpu.py --out runs-70b --scaling configs/exp/sjp_lora_apertus70b.yaml \
        --model random:apertus-70b --gpus 4 --strategies zero3,fsdp2 --steps 12

For each method (LoRA, full) it trains a ~0.9B Apertus-architecture model (random weights, built once on the CPU and
cached by lexfine, so every strategy starts from the same weights; 8 layers, width 2048) on bundled SJP cases for a
few steps in bf16, as training runs by default: once on 1 GPU with gradient accumulation 2 (the reference), then on
2 GPUs with accumulation 1 under each strategy. Compiled layers and the fused xIELU are off (--speed-levers turns them
on): compilation adds to every run's start (the step-1 column shows how much) and would make the strategies that
compile (1 GPU, DDP) compute differently from those that do not. It prints, per run, a row as soon as it ends, and a table at the end: exit code, wall time,
where the time went (data preparation, model load, process start to the end of step 1, save), the largest relative
and absolute loss difference to the reference, steady real tokens/s per GPU, rank 0's peak memory and the
adapter/weights check. A failed run's log tail is printed; every log stays in OUT/logs. --budget stops starting runs
that would not finish in time (their rows say so) so that a time-limited call still prints its table.
The equality of trajectories is asserted, in fp32, by tests/gpu/test_multigpu.py; here it is measured in bf16.

With --scaling CONFIG it instead trains that config (its model replaced by --model, its data by the bundled SJP
train cases, no evaluation) for --steps steps per strategy and GPU count, and prints tokens/s per GPU (median of
the per-step rates after the first third of the steps, so compilation and warm-up stay out), peak memory of rank 0
and the time to save the adapter or weights.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ARCH = {"num_hidden_layers": 8, "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128}


def config(out: Path, method: str, strategy: str, gpus: int, accum: int, tokenizer: str | None, steps: int,
           speed_levers: bool = False) -> dict:
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
        "eval": [],
        "output_dir": str(out / "runs"),
    }
    if not speed_levers:
        cfg["train"].update(compile_layers=False, fused_activation=False)
    return cfg


def train(cfg: dict, out: Path, overrides: list[str] | None = None, timeout: int = 600) -> tuple[int, float, Path | None]:
    """`lexfine train` on cfg (a config dict, or a config file path with overrides); the run directory if it ended.
    Its output goes to OUT/logs/<name>.log; on a failure the log's tail is printed."""
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
        proc = subprocess.Popen([sys.executable, "-m", "lexfine.cli", "train", str(path), *(overrides or [])],
                                stdout=f, stderr=f, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in descendants(proc.pid):  # the CLI, the launcher (its own session) and the ranks
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            code = 124
    found = sorted((out / "runs").glob(f"{cfg['name']}-*"))
    run_dir = found[-1] if code == 0 and found else None
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        print(f"FAILED {cfg['name']} rc={code} after {time.time() - t0:.0f} s ({log}):", *tail, sep="\n  ", flush=True)
    return code, time.time() - t0, run_dir


def descendants(pid: int) -> list[int]:
    """pid and every process below it (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if "loss" in r]


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


def row_of(method: str, setup: str, code: int | None, wall: float, run_dir: Path | None, ref: list[float] | None,
           gpus: int) -> dict:
    m = json.loads((run_dir / "manifest.json").read_text()) if run_dir else {}
    t = m.get("timings") or {}
    got = losses(run_dir) if run_dir else None
    rel = absd = None
    if got and ref and run_dir and "1 GPU" not in setup:
        if len(got) == len(ref):
            rel = max(abs(x - y) / abs(y) for x, y in zip(got, ref))
            absd = max(abs(x - y) for x, y in zip(got, ref))
        else:
            rel = absd = float("inf")
    steady = t.get("steady_tokens_per_s")
    return {"method": method, "setup": setup, "gpus": gpus, "rc": code, "wall_s": round(wall, 1),
            "data_prep_s": t.get("data_prep_s"), "model_load_s": t.get("model_load_s"),
            "first_step_s": t.get("first_step_s"), "save_s": m.get("save_s"),
            "max_rel_dloss": rel, "max_abs_dloss": absd, "losses": got,
            "steady_tokens_per_s_per_gpu": round(steady / gpus, 1) if steady else None,
            "peak_gib_rank0": m.get("peak_gpu_memory_gib"),
            "check": (check_output(run_dir, method) if run_dir else
                      "skipped: budget" if code is None else "FAILED (log above)")}


def print_table(rows: list[dict]) -> None:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(f"\n{'method':6} {'setup':22} {'rc':>4} {'wall':>5} {'prep':>5} {'load':>5} {'step1':>6} {'save':>5} "
          f"{'max rel dloss':>13} {'tok/s/GPU':>9} {'peak GiB':>8}  output")
    for r in rows:
        print(f"{r['method']:6} {r['setup']:22} {f(r['rc'], 'd'):>4} {f(r['wall_s'], '.0f'):>5} "
              f"{f(r['data_prep_s'], '.0f'):>5} {f(r['model_load_s'], '.0f'):>5} {f(r['first_step_s'], '.0f'):>6} "
              f"{f(r['save_s'], '.0f'):>5} {f(r['max_rel_dloss'], '.1e'):>13} "
              f"{f(r['steady_tokens_per_s_per_gpu'], '.0f'):>9} {f(r['peak_gib_rank0'], '.1f'):>8}  {r['check']}")
    print("(seconds: wall = the whole `lexfine train`; prep, load = data and model in rank 0; step1 = process start to "
          "the end of step 1; save = adapter or weights)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--strategies", default="ddp,zero2,zero3,fsdp2")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--speed-levers", action="store_true", help="compiled layers and fused xIELU as in production")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all runs: later ones are skipped")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    ap.add_argument("--scaling", type=Path, default=None, help="a shipped config to time instead (see above)")
    ap.add_argument("--model", default="random:apertus-8b", help="--scaling: the model to put in the config")
    ap.add_argument("--gpus", default="1,2", help="--scaling: GPU counts (1 runs without a strategy)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run (killed after it: exit code 124)")
    a = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if a.scaling:
        return scaling(a)
    start = time.time()
    rows, longest = [], 0.0

    def budget_left(need: float) -> bool:
        return a.budget is None or time.time() - start + need <= a.budget

    for method in a.methods.split(","):
        setups = [("none", 1, 2, "1 GPU x accum 2")] + [(s, 2, 1, f"{s} 2 GPU x accum 1") for s in a.strategies.split(",")]
        ref = None
        for strategy, gpus, accum, setup in setups:
            if not budget_left(max(longest, 60.0)):
                rows.append(row_of(method, setup, None, 0.0, None, None, gpus))
                print("ROW", json.dumps(rows[-1]), flush=True)
                continue
            cfg = config(a.out, method, strategy, gpus, accum, a.tokenizer, a.steps, a.speed_levers)
            code, wall, run_dir = train(cfg, a.out, timeout=a.timeout)
            longest = max(longest, wall)
            if strategy == "none":
                ref = losses(run_dir) if run_dir else None
            rows.append(row_of(method, setup, code, wall, run_dir, ref, gpus))
            print("ROW", json.dumps(rows[-1]), flush=True)
    print_table(rows)
    if a.json:
        a.json.write_text(json.dumps({"steps": a.steps, "arch": ARCH, "speed_levers": a.speed_levers, "rows": rows},
                                     indent=1))


if __name__ == "__main__":
    main()
