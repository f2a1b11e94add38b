"""`lexfine quickstart`: the whole loop on a CPU in minutes — evaluate, fine-tune, evaluate, report."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from lexfine.config import load_config


def quickstart_config_path() -> Path:
    return Path(str(files("lexfine") / "configs" / "quickstart.yaml"))


def _headline(summary: dict | None, metric: str) -> str:
    if not summary or summary.get(metric) is None:
        return "-"
    return f"{summary[metric]:.3f}"


def run_quickstart(out: Path, steps: int = 20, eval_limit: int = 40) -> Path:
    from lexfine.report import write_report
    from lexfine.train import run

    import torch

    out = Path(out)
    overrides = [f"output_dir={out / 'runs'}", f"train.max_steps={steps}", f"eval_options.limit={eval_limit}"]
    if torch.cuda.is_available():
        # A GPU affords all bundled cases at a realistic context length, in about the time a CPU needs for a sample.
        overrides += ["data.limit=800", f"train.max_steps={max(steps, 200)}", "train.max_length=2048",
                      f"eval_options.limit={max(eval_limit, 300)}", "eval_options.max_length=2048",
                      "eval_options.batch_size=16"]
    cfg = load_config(quickstart_config_path(), overrides)
    print(f"lexfine quickstart: LoRA r={cfg.lora.r} on {cfg.model}, {steps} steps of {cfg.train.batch_size} "
          f"bundled SJP cases (max {cfg.train.max_length} tokens); evaluation on {eval_limit} cases per task")
    rd = run(cfg)
    manifest = rd.manifest()
    evals, base = manifest.get("evals", {}), manifest.get("base_evals", {})
    rows = [("SJP macro-F1 (loglik)", "sjp-loglik", "macro_f1"), ("SJP accuracy (loglik)", "sjp-loglik", "accuracy"),
            ("LEXam MCQ-4 accuracy (loglik)", "lexam_mcq4-loglik", "accuracy")]
    print(f"\n{'metric':32} {'before':>8} {'after':>8}")
    for label, key, metric in rows:
        print(f"{label:32} {_headline(base.get(key), metric):>8} {_headline(evals.get(key), metric):>8}")
    sjp = evals.get("sjp-loglik") or {}
    if sjp.get("majority_baseline") is not None:
        print(f"{'SJP majority-class accuracy':32} {sjp['majority_baseline']:>17.3f}")
    summary_path = rd.eval_dir("sjp", "loglik") / "summary.json"
    if summary_path.exists():
        import json

        counts = {k: v for k, v in (json.loads(summary_path.read_text()).get("prediction_counts") or {}).items() if v}
        if len(counts) == 1:
            print(f"note: the model predicts {next(iter(counts))!r} for every case (the majority class): a 135M model "
                  "trained on a few short-context cases learns the answer format, not the task. Accuracy alone would "
                  "hide this; macro-F1 shows it. For real runs see configs/exp/.")
    print(f"\nrun directory: {rd.path}")
    return write_report([rd.path], out / "report")
