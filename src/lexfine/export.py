"""`lexfine export`: a run's model as a standalone Hugging Face directory (for vLLM, the hub, or other tools)."""

from __future__ import annotations

from pathlib import Path

import yaml

from lexfine.config import validate
from lexfine.errors import LexfineError
from lexfine.rundir import RunDir


def export_run(run_dir: str | Path, out: str | Path, merge: bool = True) -> Path:
    from lexfine import models

    from lexfine.eval.target import split_checkpoint

    run_dir, checkpoint = split_checkpoint(str(run_dir))  # <run>@best: the checkpoint eval_during.select kept
    rd = RunDir(run_dir)
    if not RunDir.is_run_dir(rd.path):
        raise LexfineError(f"{str(run_dir)!r} is not a lexfine run directory (no config.yaml + manifest.json)")
    if rd.status != "completed":
        raise LexfineError(f"run {rd.path.name} is {rd.status!r}, not completed; finish it with `lexfine train`")
    cfg = validate(yaml.safe_load(rd.config_path.read_text()))
    weights = rd.path / checkpoint if checkpoint else (rd.model_dir if cfg.method == "full" else rd.adapter_dir)
    if checkpoint and not weights.is_dir():
        raise LexfineError(f"run {rd.path.name} has no {checkpoint}/ (set eval_during.select and train it)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LexfineError(f"--out {str(out)!r} exists and is not empty; choose a new folder")
    if cfg.method == "lora":
        from lexfine.adapter_files import check_adapter_dir

        check_adapter_dir(weights)  # the adapter exported: the run's final one, or the selected checkpoint's
    elif not (weights / "config.json").is_file():
        raise LexfineError(f"run {rd.path.name} has no {weights.name}/config.json; retrain it (`lexfine train --force`)")
    if cfg.method == "full":
        import shutil

        shutil.copytree(weights, out, dirs_exist_ok=True)
        return out
    if not merge:
        import shutil

        shutil.copytree(weights, out, dirs_exist_ok=True)
        return out
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(weights)
    # Never quantized, whatever lora.quantize was: a QLoRA adapter merges onto the bf16 base (model_args.dtype; auto:
    # bf16 on a GPU), not onto dequantized 4-bit weights, which would bake the quantization error into the export.
    base = models.load_model(cfg.model, cfg.model_args, tokenizer=tokenizer)
    merged = PeftModel.from_pretrained(base, weights).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
