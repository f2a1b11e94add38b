"""Synthetic run directories that follow docs/contracts.md, with losses you choose.

The report's tests (and anyone trying `lexfine report` before a GPU run has finished) build run sets with
known answers from these: an optimum inside or at the edge of the LR grid, ties, diverged runs, missing evals.
Written through RunConfig and RunDir, exactly as `lexfine train` / `lexfine eval` write them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lexfine.config import RunConfig
from lexfine.rundir import RunDir, atomic_write_json, write_jsonl


def loss_curve(final: float, first: float = 2.0, steps: int = 60, flat_tail: int = 25) -> list[float]:
    """Exponential decay from `first` to `final`; the last `flat_tail` steps are exactly `final`, so the smoothed
    final loss (mean of the last <= flat_tail steps) is known exactly."""
    n_decay = max(steps - flat_tail, 1)
    decay = [final + (first - final) * math.exp(-5 * i / n_decay) for i in range(n_decay)]
    return (decay + [final] * flat_tail)[:steps]


def write_run(
    root: str | Path,
    *,
    name: str,
    losses: list[float],
    method: str = "lora",
    rank: int = 16,
    lr: float = 1e-4,
    model: str = "random:apertus-8b",
    evals: dict[str, dict] | None = None,
    base_evals: dict[str, dict] | None = None,
    status: str = "completed",
    world_size: int = 1,
    num_nodes: int = 1,
    gpu: str | None = None,
    tokens_per_step: int = 4096,
    seconds_per_step: float = 1.0,
    parameters_total: int | None = None,
    seed: int = 42,
    overrides: dict | None = None,
    metrics_rows: list[dict] | None = None,
) -> Path:
    """Write one run directory under `root` and return its path. `evals`: {"sjp-loglik": {"accuracy": ..}} (a
    "settings" mapping in a summary is written to summary.json too). `overrides`: {"data.loss_on": "all", ...}.
    `metrics_rows`: extra keys per logged step (e.g. {"nonfinite": ["loss"]}), merged into the rows."""
    from lexfine.config import set_dotted

    tree = {
        "name": name, "model": model, "method": method, "lora": {"r": rank}, "output_dir": str(root),
        "train": {"lr": lr, "seed": seed, "max_steps": len(losses) or 1},  # 0 steps is not a valid config
        "launch": {"num_processes": world_size, "num_machines": num_nodes},
    }
    for key, value in (overrides or {}).items():
        set_dotted(tree, key.split("."), value)
    cfg = RunConfig.model_validate(tree)
    rd = RunDir(cfg.run_dir())
    rd.create(cfg.to_yaml(), cfg.run_id())
    rows = []
    for i, loss in enumerate(losses, start=1):
        rows.append({"step": i, "epoch": i / len(losses), "loss": loss, "learning_rate": lr, "grad_norm": 1.0,
                     "num_tokens": i * tokens_per_step, "tokens_per_s": tokens_per_step / seconds_per_step,
                     "elapsed_s": i * seconds_per_step, **((metrics_rows or [])[i - 1:i] or [{}])[0]})
    write_jsonl(rd.metrics_path, rows)  # non-finite losses become null, as rundir writes them
    hardware = {"world_size": world_size, "num_nodes": num_nodes}
    if gpu:
        hardware.update(gpu_name=gpu, gpus_per_node=max(world_size // num_nodes, 1))
    rd.set_status(
        status, steps=len(losses), final_loss=losses[-1] if losses else None,
        train_tokens=len(losses) * tokens_per_step, tokens_per_s=tokens_per_step / seconds_per_step,
        world_size=world_size, num_nodes=num_nodes, hardware=hardware,
        parameters={"total": parameters_total} if parameters_total else {},
        base_evals=base_evals or {},
    )
    for key, summary in (evals or {}).items():
        task, mode = key.rsplit("-", 1)
        path = rd.eval_dir(task, mode) / "summary.json"
        atomic_write_json(path, {"n": 100, "parse_failures": 0, "by_language": {}, **summary})
        rd.record_eval(task, mode, path, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
    return rd.path


def write_sweep_jsonl(sweep_dir: str | Path, run_dirs: list[Path]) -> Path:
    """A sweep.jsonl naming run directories (relative paths where possible)."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for p in run_dirs:
        try:
            rel = str(Path(p).relative_to(sweep_dir))
        except ValueError:
            rel = str(p)
        lines.append(json.dumps({"run_id": Path(p).name, "status": "completed", "run_dir": rel}))
    path = sweep_dir / "sweep.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
