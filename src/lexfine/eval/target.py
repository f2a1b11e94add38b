"""What is evaluated: a run directory (its base model + LoRA adapter, unmerged, or its full weights) or a model
(hub id, local directory, smollm2-135m, random:<arch>), together with the prompt settings to build its prompts.

A run trained with lora.quantize (QLoRA) is evaluated on its unquantized base (model_args.dtype; auto: bf16 on a
GPU) with the adapter on top, like `lexfine export` merges it: the deployed model, not the 4-bit training view.

A run is evaluated with the prompt settings it was trained with (its config.yaml: prompt template, system prompt,
truncation, max_length), so that the evaluation prompt is token for token the training prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lexfine.config import DataArgs, EvalArgs, ModelArgs, RunConfig
from lexfine.errors import ModelError
from lexfine.rundir import RunDir

DEFAULT_MAX_LENGTH = 4096  # = TrainArgs.max_length: models are evaluated with the context training would use


@dataclass
class Target:
    spec: str  # what the user gave
    kind: str  # run | model
    model: str  # the (base) model spec
    model_args: ModelArgs = field(default_factory=ModelArgs)
    data_args: DataArgs = field(default_factory=DataArgs)
    max_length: int = DEFAULT_MAX_LENGTH
    run_dir: RunDir | None = None
    weights: str = "base"  # base | adapter | full
    cfg: RunConfig | None = None
    eval_args: EvalArgs = field(default_factory=EvalArgs)  # default data (a run: its eval_options)
    checkpoint: str | None = None  # `<run>@best`: the run's selected checkpoint in <run>/best/, not its final weights

    @property
    def weights_dir(self) -> Path | None:
        """The folder holding the run's adapter or full weights (adapter/, model/ or best/)."""
        if self.run_dir is None:
            return None
        if self.checkpoint:
            return self.run_dir.path / self.checkpoint
        return self.run_dir.adapter_dir if self.weights == "adapter" else self.run_dir.model_dir

    @property
    def out_dir(self) -> Path | None:
        """Where a run's evaluation goes by default: the run directory (or the selected checkpoint's folder)."""
        return self.weights_dir if self.checkpoint else (self.run_dir.path if self.run_dir else None)

    @property
    def name(self) -> str:
        if self.run_dir:
            return self.run_dir.path.name + (f"@{self.checkpoint}" if self.checkpoint else "")
        return self.model

    @property
    def safe_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("_") or "model"

    def base(self) -> "Target":
        """The untrained starting point of a run, with the run's prompt settings (for before/after comparisons)."""
        return Target(self.model, "model", self.model, self.model_args, self.data_args, self.max_length,
                      eval_args=self.eval_args)

    def identity(self) -> dict:
        """What determines a base model's scores (part of the cache key). Only meaningful for kind == model."""
        args = self.model_args.model_dump(mode="json", exclude={"attn_implementation", "trust_remote_code"})
        ident: dict = {"model": self.model, **args}
        p = Path(self.model).expanduser()
        if p.is_dir():  # a local directory can be overwritten: its weights' size and mtime stand in for content
            files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
            ident["files"] = [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files]
        return ident


CHECKPOINTS = ("best",)  # `<run>@best`: the checkpoint eval_during.select chose (manifest: selected_checkpoint)


def split_checkpoint(spec: str) -> tuple[str, str | None]:
    """`runs/x@best` -> (`runs/x`, `best`); anything else unchanged."""
    head, sep, tail = str(spec).rpartition("@")
    if sep and tail in CHECKPOINTS and RunDir.is_run_dir(head):
        return head, tail
    return str(spec), None


def from_run(path: str | Path, cfg: RunConfig | None = None, base: str | None = None,
             checkpoint: str | None = None) -> Target:
    from lexfine.config import load_config

    rd = RunDir(path)
    cfg = cfg or load_config(rd.config_path)
    if checkpoint:
        ck = rd.path / checkpoint
        weights = "adapter" if (ck / "adapter_config.json").is_file() else "full" if (ck / "config.json").is_file() \
            else None
        if weights is None:
            raise ModelError(f"run {str(rd.path)!r} has no selected checkpoint in {checkpoint}/ (set "
                             "eval_during.select in its config and train it); evaluate the final model without @best")
        if base and weights == "full":
            raise ModelError(f"--base applies to LoRA runs only; {str(ck)!r} holds full weights")
        max_length = cfg.eval_options.max_length or cfg.train.max_length
        return Target(f"{path}@{checkpoint}", "run", base or cfg.model, cfg.model_args, cfg.data, max_length, rd,
                      weights, cfg, cfg.eval_options, checkpoint)
    if (rd.adapter_dir / "adapter_config.json").is_file():
        weights = "adapter"
    elif (rd.model_dir / "config.json").is_file():
        weights = "full"
    else:
        raise ModelError(f"run {str(rd.path)!r} has no adapter/ or model/ (status: {rd.status}); train it to the end "
                         f"first, or evaluate its base model with `lexfine eval {cfg.model}`")
    if weights == "adapter":
        from lexfine.adapter_files import check_adapter_dir

        check_adapter_dir(rd.adapter_dir)  # before any data is read or a base model is loaded
    if base and weights == "full":
        raise ModelError(f"--base applies to LoRA runs only; {str(rd.path)!r} holds full weights")
    max_length = cfg.eval_options.max_length or cfg.train.max_length
    return Target(str(path), "run", base or cfg.model, cfg.model_args, cfg.data, max_length, rd, weights, cfg,
                  cfg.eval_options)


def resolve_target(spec: str, base: str | None = None, data_args: DataArgs | None = None,
                   model_args: ModelArgs | None = None) -> Target:
    if RunDir.is_run_dir(spec):
        return from_run(spec, base=base)
    run, checkpoint = split_checkpoint(spec)
    if checkpoint:
        return from_run(run, base=base, checkpoint=checkpoint)
    if base:
        raise ModelError(f"--base is for run directories; {spec!r} is a model, evaluate it directly")
    from lexfine import models

    if Path(spec).expanduser().is_dir() and (Path(spec) / "manifest.json").is_file():
        raise ModelError(f"{spec!r} looks like a run directory but has no config.yaml; it cannot be evaluated")
    models.resolve(spec)  # one-line error for an unknown spec, before any data is read
    return Target(spec, "model", spec, model_args or ModelArgs(), data_args or DataArgs())


def _same_model(recorded: str, given: str) -> bool:
    if not recorded or not given or recorded == given:
        return True
    a, b = Path(recorded).expanduser(), Path(given).expanduser()
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    # A cache directory moved between machines, or a hub id vs a local copy of it: compare the last name part.
    return a.name.lower() in b.name.lower() or b.name.lower() in a.name.lower()


def check_adapter_base(adapter_dir: Path, base_source: str, base_spec: str) -> None:
    try:
        recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {adapter_dir / 'adapter_config.json'}: {e}") from None
    if not _same_model(recorded, base_source):
        raise ModelError(f"the adapter in {str(adapter_dir)!r} was trained on {recorded!r}, not on {base_spec!r}; "
                         "evaluate it on its own base (--base) or retrain")


def load(target: Target, device=None, dtype=None, fused_xielu: bool = True):
    """(model, tokenizer) in eval mode on `device` (default: the first GPU, else CPU)."""
    import torch

    from lexfine import models

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args = target.model_args
    if target.weights == "full":
        spec = models.resolve(str(target.weights_dir))
        args = args.model_copy(update={"tokenizer": None, "revision": None, "arch_overrides": {}})
    else:
        spec = models.resolve(target.model)
    tokenizer = models.load_tokenizer(spec, args)
    # random: up to models.RANDOM_CACHE_MAX_PARAMS loads its CPU-built copy (the weights training saw), a larger one is
    # built on the GPU (an 8B init on a CPU takes minutes)
    model = models.load_model(spec, args, tokenizer=tokenizer, dtype=dtype,
                              device=device if spec.is_random and device.type == "cuda" else None)
    if target.weights == "adapter":
        from peft import PeftModel

        adapter = target.weights_dir
        check_adapter_base(adapter, spec.source, target.model)
        try:
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as e:
            msg = " ".join(str(e).split())[:300]
            raise ModelError(f"the adapter in {str(adapter)!r} does not fit base model {target.model!r}: {msg}") from None
    model.to(device)
    model.eval()
    if device.type == "cuda" and fused_xielu:
        try:  # Apertus: transformers' Python xIELU runs ~10 kernels per MLP; the compiled one runs one
            from lexfine.kernels.xielu import patch_xielu

            patch_xielu(model)
        except ImportError:
            pass
    return model, tokenizer
