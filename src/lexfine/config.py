"""The one config object: pydantic models, YAML files and `key.sub=value` overrides.

The docstring under each field is its documentation (and `lexfine config --help-keys` prints it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lexfine.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelArgs(Section):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights dtype. auto: LoRA keeps the frozen base in bfloat16 on a GPU that supports it; full fine-tuning keeps
    float32 master weights and trains in bf16 autocast (pure-bf16 weights would round away updates at LR <= 1e-5;
    under ZeRO-2/3 through DeepSpeed's torch_autocast, lexfine.train.strategies.zero_autocast); float32 on CPU."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (sdpa, eager, flash_attention_2, ...)."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code. Off unless you trust the repository."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model."""
    tokenizer: str | None = None
    """Tokenizer source when it differs from the model (random-architecture models default to the embedded one)."""
    chat_template: str | None = None
    """Path to a Jinja chat template that replaces the tokenizer's own (e.g. the Apertus template)."""
    arch_overrides: dict[str, Any] = Field(default_factory=dict)
    """For `random:` models: config fields to change, e.g. {num_hidden_layers: 2, hidden_size: 64}."""

    @field_validator("arch_overrides")
    @classmethod
    def arch_override_keys_are_names(cls, v: dict) -> dict:
        # YAML reads {num_hidden_layers:2} (no space) as the key 'num_hidden_layers:2' with value null: ignored, the
        # full-size model would be built
        broken = [k for k in v if ":" in k or " " in k]
        if broken:
            raise ValueError(f"{', '.join(map(repr, broken))} is not a config field; write {{key: value}} with a space "
                             "after each colon, or quote the keys")
        return v


class LoraArgs(Section):
    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: float = Field(32, gt=0)
    """LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rslora)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: 'all-linear' or a list of module-name suffixes (q_proj, ...)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling (alpha / sqrt(r))."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    quantize: Literal["none", "nf4", "fp4", "int8"] = "none"
    """Base weights quantization (QLoRA), choices: none | nf4 | fp4 | int8. nf4/fp4 load the frozen base in 4-bit
    (bitsandbytes; double quantization and bfloat16 compute dtype), int8 in 8-bit; the adapters train as usual and
    save as a normal adapter that loads onto the bf16 base (export and eval use the bf16 base). Needs method=lora,
    the bitsandbytes package and a device it supports (CUDA; a CPU too where the installed bitsandbytes supports
    it: 0.50 does); not with launch.strategy zero3/fsdp2. random: models are built quantized one layer at a time
    (for speed and memory measurements; they need eval=[]) (docs/performance.md, QLoRA).
    none: the base in model_args.dtype."""


class DataArgs(Section):
    train: str = "bundled:sjp_fr_train"
    """Training data: a hub dataset id, a local file/folder (parquet, jsonl, json, csv) or bundled:<name>."""
    format: Literal["auto", "sjp", "chat", "prompt_completion"] = "auto"
    """Row format. auto: sjp if the rows have text+label, chat if `messages`, else prompt/completion."""
    hub_config: str | None = None
    """Hub dataset config (SJP: de, fr, it or all; default all)."""
    split: Literal["train", "validation", "test", "all"] = "train"
    """Which split. For SJP it is the official year split (train 2000-2014, validation 2015-16, test 2017-20);
    local rows without a year are refused unless the split is `all`."""
    languages: list[str] | None = None
    """Keep only these languages (SJP `language` column), e.g. [de, fr]."""
    years: list[int] | None = None
    """Keep only these years (overrides the split's years; rows without a year are then refused)."""
    legal_areas: list[str] | None = None
    """Keep only these legal areas (SJP `legal area` column), e.g. [civil law]."""
    limit: int | None = Field(None, ge=1)
    """Use at most this many rows (a seeded random subset)."""
    prompt_template: str = "sjp_default"
    """SJP prompt: a bundled template name or a path to a text file with {facts} and metadata fields."""
    system_prompt: str | None = "You are an expert in Swiss case law."
    """Explicit system message. Keeps prompts independent of templates that insert today's date. null: none."""
    loss_on: Literal["answer", "all"] = "answer"
    """answer: loss only on the answer and its end-of-turn token. all: every token (the reference study)."""
    truncation: Literal["middle", "tail"] = "middle"
    """How too-long facts are cut so that instruction and answer survive: drop the middle or the tail."""


class TrainArgs(Section):
    lr: float = Field(1e-4, gt=0, allow_inf_nan=False)
    """Peak learning rate (finite, > 0)."""
    max_steps: int = -1
    """Optimizer steps (>= 1); -1 trains for `epochs`."""
    epochs: float = Field(1.0, gt=0, allow_inf_nan=False)
    """Passes over the data when max_steps is -1."""
    batch_size: int = Field(4, ge=1)
    """Sequences per device per micro-step."""
    grad_accum: int = Field(1, ge=1)
    """Micro-steps per optimizer step."""
    max_length: int = Field(4096, ge=16)
    """Maximum tokens per example; longer examples have their facts cut (see data.truncation)."""
    lr_scheduler: str = "constant"
    """LR schedule (transformers names: constant, cosine, linear, ...). The study used constant. With
    warmup_ratio > 0, constant becomes constant_with_warmup (constant alone has no warm-up)."""
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    """Fraction of the run's optimizer steps for linear warm-up from 0 to train.lr (0: none, as in the study;
    1.0: the whole run). With lr_scheduler constant it trains with constant_with_warmup."""
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, allow_inf_nan=False)
    """Gradient clipping norm."""
    optim: str = "adamw_torch"
    """A transformers OptimizerNames value (adamw_torch, adamw_torch_fused, ...)."""
    seed: int = 42
    """Seed for data order, LoRA init and dropout."""
    bf16: bool | None = None
    """Mixed precision in bfloat16. null: on when the GPU supports it."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    checkpoint_fraction: float = Field(1.0, ge=0, le=1)
    """With gradient_checkpointing: the fraction of decoder layers that recompute (spread evenly over the stack);
    the others keep their activations. Lower is faster and needs more memory; 1.0 checkpoints every layer.
    With adaptive_checkpointing this holds for a full batch (batch_size x max_length tokens)."""
    adaptive_checkpointing: bool = True
    """With checkpoint_fraction below 1: a batch with fewer tokens than a full one checkpoints proportionally fewer
    layers, so it stores no more activations than a full batch would (less recomputation on most steps; the peak
    measured 2.5 GiB higher for the 8B, probably allocator fragmentation). Not under ZeRO-3 (its parameter
    prefetch follows a fixed module order) or FSDP2. false: the same layers every step."""
    compile_layers: bool | None = None
    """torch.compile each decoder layer (fuses norms, residuals and LoRA's extra elementwise work; 2x on an H100,
    docs/performance.md). The first steps are slower while it compiles (dynamic shapes: variable lengths do not
    recompile each step). null: on with a CUDA GPU for launch.strategy none/ddp, off on a CPU and under ZeRO/FSDP2."""
    pad_to_multiple_of: int | None = Field(None, ge=1)
    """Pad each batch's length up to a multiple of this (padding is masked: the loss is unchanged). null: 8 when the
    decoder layers are compiled (compile_layers), else 1 (pad to the longest of the batch only). With compiled
    layers, a length that is always a multiple of 8 keeps CUDA attention kernels' alignment checks from giving aligned
    and unaligned lengths graphs of their own (docs/performance.md, "Recompiles"); 8 costs ~0.2% more tokens on
    length-grouped SJP batches, 64 ~1.8%. Ignored with padding_free."""
    mask_free_attention: bool | None = None
    """Training batches reach SDPA attention without their padding mask (is_causal): exact for right-padded batches,
    since causal attention already keeps real tokens from the padding after them, and faster (flash kernel, upper
    triangle skipped; docs/performance.md). Each batch is checked to be right-padded. null: on wherever it is exact
    (SDPA, causal over the whole sequence, not padding_free); false: train with the padding mask."""
    cudnn_attention: bool | None = None
    """Whether SDPA may use PyTorch's cuDNN attention kernels in training (CUDA). false: flash (then memory-efficient)
    kernels only. null: off where mask_free_attention applies (cuDNN's kernel costs ~2 ms of host time per call
    with changing lengths: 10.2k -> 11.3k tokens/s on an H200 without it, docs/performance.md), else PyTorch's
    choice (a masked batch cannot use flash)."""
    group_by_length: bool = True
    """Batch sequences of similar length together: far less padding (SJP cases range from 0.2k to 10k tokens)."""
    padding_free: bool = False
    """Concatenate the batch into one sequence without padding. Needs model_args.attn_implementation=flash_attention_2
    (or _3): with sdpa/eager, packed sequences would attend to each other, so lexfine refuses the combination."""
    fused_activation: bool = True
    """Compile Apertus's xIELU activation into one fused kernel (forward and backward; CUDA: Triton via inductor)."""
    liger: bool = False
    """Use Liger kernels (fused linear cross-entropy, ...) when liger-kernel is installed."""
    logging_steps: int = Field(1, ge=1)
    """Log every N optimizer steps to metrics.jsonl."""
    save_steps: int = Field(100, ge=1)
    """Save a resumable checkpoint every N steps."""
    save_total_limit: int = Field(2, ge=1)
    """Keep at most this many checkpoints."""
    report_to: Literal["none", "wandb", "tensorboard", "mlflow"] = "none"
    """Extra experiment tracker (lexfine always writes metrics.jsonl)."""
    dataloader_workers: int = Field(0, ge=0)
    """DataLoader worker processes."""
    keep_checkpoints: bool = False
    """Keep the resumable checkpoints (optimizer states included) after the run completed. Off: delete them."""
    profile_steps: tuple[int, int] | None = None
    """[FIRST, LAST]: record torch.profiler over these optimizer steps (1-based, inclusive) into the run's profile/
    folder: device time by kernel family, the top operators, a Perfetto trace (src/lexfine/train/profile.py). A
    diagnostic, not in the run id. null: off."""
    max_nonfinite_steps: int = Field(3, ge=1)
    """Stop a run after this many consecutive optimizer steps with a non-finite (NaN/inf) loss or gradient norm:
    status `diverged`, exit code 65, the checkpoint of the last finite step kept (non-finite steps are never
    checkpointed). A run that ends on a non-finite step is diverged too. With logging_steps > 1 a logged row
    counts for all the steps it averages."""

    @field_validator("profile_steps")
    @classmethod
    def _profile(cls, v):
        if v is not None and not 1 <= v[0] <= v[1]:
            raise ValueError(f"give [FIRST, LAST] optimizer steps with 1 <= FIRST <= LAST, not {list(v)}")
        return v

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("give a number of optimizer steps >= 1, or -1 to train for train.epochs")
        return v

    @field_validator("lr_scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        return _transformers_name(v, "transformers.trainer_utils", "SchedulerType", _COMMON_SCHEDULERS, "LR schedule")

    @field_validator("optim")
    @classmethod
    def _optimizer(cls, v: str) -> str:
        return _transformers_name(v, "transformers.training_args", "OptimizerNames", _COMMON_OPTIMIZERS, "optimizer")


# Accepted without importing transformers (seconds: torch comes with it), so `config show` stays fast; any other
# name is checked against transformers' own enum. tests/unit/test_config_values.py keeps these a subset of it.
_COMMON_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear", "cosine_with_min_lr")
_COMMON_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd")


def _transformers_name(value: str, module: str, enum: str, common: tuple[str, ...], what: str) -> str:
    if value in common:
        return value
    import importlib

    allowed = [e.value for e in getattr(importlib.import_module(module), enum)]
    if value not in allowed:
        raise ValueError(f"unknown {what}; allowed (transformers {enum}): {', '.join(allowed)}")
    return value


class EvalArgs(Section):
    sjp_data: str = "bundled:sjp_fr_heldout"
    """SJP evaluation data (hub id, path or bundled:<name>)."""
    sjp_split: Literal["train", "validation", "test", "all"] = "all"
    """Year split of the SJP evaluation data for a plain `sjp` entry (`sjp@validation` / `sjp@test` name their own)."""
    lexam_data: str | None = None
    """LEXam data: hub id, a folder of mcq_N_choices_test.jsonl files or a file. null: bundled sample."""
    mode: Literal["loglik", "generate"] = "loglik"
    """loglik: score the candidate answers. generate: greedy decoding and parsing (study parity)."""
    limit: int | None = Field(None, ge=1)
    """Evaluate at most this many examples per task."""
    batch_size: int | None = Field(None, ge=1)
    """Examples per forward pass. null: 64 for loglik on a GPU (at most 32768 padded tokens), else 8."""
    max_length: int | None = None
    """Context limit for evaluation prompts (null: the training max_length)."""


class SelectArgs(Section):
    metric: str = "eval/sjp/validation/macro_f1"
    """The eval_during metric to maximise (a key of the eval/ rows in metrics.jsonl)."""
    max_lexam_drop: float | None = Field(0.05, ge=0)
    """Only checkpoints whose LEXam accuracy (eval/<first lexam task>/accuracy) is at most this far below the base
    model's (absolute, 0.05 = 5 points) can be selected. null: no retention condition."""
    max_top_answer_share: float | None = Field(0.9, gt=0, le=1)
    """Nor a checkpoint that gives one LEXam answer to at least this share of the questions (a collapse: on balanced
    MCQ-4 its accuracy is that letter's share of the gold answers, which a near-chance base cannot tell from
    retention). null: no such condition."""


class EvalDuringArgs(Section):
    every_steps: int = Field(0, ge=0)
    """Score the tasks every N optimizer steps, at the end and once before step 1 (the base model). 0: off."""
    tasks: list[str] = Field(default_factory=lambda: ["sjp", "lexam_mcq4"])
    """Tasks scored by loglik, as `lexfine eval` scores them: sjp, lexam_mcq4, lexam_mcq8, lexam_mcq16, lexam_mcq32."""
    limit: int | None = Field(200, ge=1)
    """Cases per task (a seeded subset, the same at every evaluation). null: all."""
    sjp_data: str | None = None
    """SJP cases. null: the validation years of data.train when it has them, else bundled:sjp_fr_heldout."""
    sjp_split: Literal["train", "validation", "test", "all"] = "validation"
    """Year split of the SJP cases."""
    lexam_data: str | None = None
    """LEXam data (hub id, folder or file). null: the bundled sample."""
    batch_size: int | None = Field(None, ge=1)
    """Cases per forward pass. null: as `lexfine eval` (64 on a GPU, 8 on a CPU)."""
    select: SelectArgs | None = None
    """Checkpoint selection, e.g. {metric: eval/sjp/validation/macro_f1, max_lexam_drop: 0.05}: the best checkpoint
    under the rule is saved to <run>/best/ (`lexfine eval <run>@best`) and named in the manifest
    (selected_checkpoint). null: off."""
    stop_lexam_drop: float | None = Field(None, gt=0)
    """Early stop: end training (status completed, manifest stopped_early) once LEXam accuracy is more than this far
    below the base model's (absolute). null: off."""

    @field_validator("tasks")
    @classmethod
    def _loglik_tasks(cls, v: list[str]) -> list[str]:
        known = {"sjp", "lexam_mcq4", "lexam_mcq8", "lexam_mcq16", "lexam_mcq32"}
        bad = [t for t in v if t not in known]
        if bad:
            raise ValueError(f"unknown task {bad[0]!r}; allowed: {', '.join(sorted(known))}")
        return v

    @model_validator(mode="after")
    def _select_needs_its_tasks(self):
        s = self.select
        if s is None:
            return self
        task = s.metric.split("/")[1] if s.metric.startswith("eval/") and s.metric.count("/") >= 2 else None
        if task not in self.tasks:
            raise ValueError(f"eval_during.select.metric {s.metric!r} is not a metric of eval_during.tasks "
                             f"{self.tasks}; use e.g. eval/sjp/validation/macro_f1 or eval/lexam_mcq4/accuracy")
        if (s.max_lexam_drop is not None or self.stop_lexam_drop is not None) and not self.retention_task:
            raise ValueError("a LEXam retention condition needs a lexam_mcq* task in eval_during.tasks")
        return self

    @property
    def retention_task(self) -> str | None:
        """The LEXam task whose accuracy measures retention: the first lexam_* task."""
        return next((t for t in self.tasks if t.startswith("lexam")), None)


class LaunchArgs(Section):
    strategy: Literal["none", "ddp", "zero2", "zero3", "fsdp2"] = "none"
    """Distributed strategy (an accelerate config shipped with lexfine)."""
    num_processes: int = Field(1, ge=1)
    """Processes (GPUs) in all, over all machines."""
    num_machines: int = Field(1, ge=1)
    """Nodes."""


# Keys that do not change what is trained: they stay out of the run id so that a run can be
# re-evaluated, relaunched on other hardware or logged elsewhere and still resume. `launch` is left out as a
# block (strategy and node count do not change the training), but the global batch it implies is hashed: see
# RunConfig.run_hash.
ID_EXCLUDE = {
    "output_dir": True,
    "eval": True,
    "eval_options": True,
    "eval_during": True,  # scoring during training does not change the weights (RNG states are restored around it)
    "launch": True,
    "train": {"report_to", "logging_steps", "save_steps", "save_total_limit", "dataloader_workers", "keep_checkpoints",
              "max_nonfinite_steps", "profile_steps",
              # speed knobs: same training, same run
              "checkpoint_fraction", "adaptive_checkpointing", "compile_layers", "pad_to_multiple_of",
              "mask_free_attention", "cudnn_attention"},
}


class RunConfig(Section):
    name: str = "run"
    """Run name; the run directory is <output_dir>/<name>-<config hash>."""
    model: str = "smollm2-135m"
    """Hub id, local directory, smollm2-135m (embedded) or random:<apertus-8b|apertus-70b|path/config.json>."""
    model_args: ModelArgs = Field(default_factory=ModelArgs)
    method: Literal["lora", "full"] = "lora"
    """lora: train adapters only. full: train every parameter."""
    lora: LoraArgs = Field(default_factory=LoraArgs)
    data: DataArgs = Field(default_factory=DataArgs)
    train: TrainArgs = Field(default_factory=TrainArgs)
    eval: list[str] = Field(default_factory=list)
    """Evaluations after training: sjp, lexam_mcq4, lexam_mcq8, lexam_mcq16, lexam_mcq32; `task:mode` picks the
    mode; `sjp@validation` / `sjp@test` score one year split into eval/sjp-<split>-<mode> (selection on validation,
    the report on test: a sweep lists both)."""
    eval_options: EvalArgs = Field(default_factory=EvalArgs)
    eval_during: EvalDuringArgs = Field(default_factory=EvalDuringArgs)
    launch: LaunchArgs = Field(default_factory=LaunchArgs)
    output_dir: str = "runs"
    """Parent folder of run directories."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("use letters, digits, '.', '_' or '-' (it names a directory)")
        return v

    @field_validator("eval")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        known = {"sjp", "lexam_mcq4", "lexam_mcq8", "lexam_mcq16", "lexam_mcq32"}
        bad = [t for t in v if t.split(":")[0].split("@")[0] not in known]
        if bad:
            raise ValueError(f"unknown task {bad[0]!r}; allowed: {', '.join(sorted(known))}")
        splits = [t for t in v if "@" in t.split(":")[0]]
        for t in splits:  # sjp@validation / sjp@test: SJP on one year split (eval/sjp-<split>-<mode>)
            name, split = t.split(":")[0].split("@", 1)
            if name != "sjp" or split not in ("train", "validation", "test", "all"):
                raise ValueError(f"task {t!r}: use sjp@validation or sjp@test (a year split of SJP)")
        return v

    @model_validator(mode="after")
    def _packing_needs_varlen_attention(self):
        # With sdpa/eager/flex, transformers ignores the cu_seq_lens of a padding-free batch: packed sequences would
        # attend to each other (tests/unit/test_packing.py shows it). Only flash-attention kernels honour them.
        if self.train.padding_free and "flash" not in self.model_args.attn_implementation:
            raise ValueError(
                f"train.padding_free needs a varlen attention kernel (model_args.attn_implementation="
                f"flash_attention_2 or flash_attention_3); with {self.model_args.attn_implementation!r} packed "
                "sequences would attend to each other. Use train.group_by_length instead"
            )
        return self

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all processes: train.batch_size x train.grad_accum x
        launch.num_processes."""
        return self.train.batch_size * self.train.grad_accum * self.launch.num_processes

    @model_validator(mode="after")
    def _quantize_where_supported(self):
        from lexfine.quantize import config_problem

        problem = config_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    def run_hash(self) -> str:
        exclude = dict(ID_EXCLUDE)
        if self.method == "full":
            exclude["lora"] = True  # LoRA settings do not change a full fine-tune
        elif self.lora.quantize == "none":
            exclude["lora"] = {"quantize"}  # runs from before the key existed keep their ids (and resume)
        payload = self.model_dump(mode="json", exclude=exclude)
        if self.launch.num_processes > 1:
            # One run id, one training: the world size changes the global batch (and the data order), so 1 GPU and
            # 8 GPUs are two runs; 2 nodes x 4 and 1 node x 8 are one. With one process the global batch follows
            # from batch_size x grad_accum, already hashed: single-process run ids stay what they were.
            payload["global_batch"] = self.global_batch
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    def group_hash(self) -> str:
        """The replicate identity: everything run_hash hashes except train.seed. Runs with the same group hash
        are replicates (other seeds) of one training; `lexfine report` compares only such groups."""
        return self.model_copy(update={"train": self.train.model_copy(update={"seed": 0})}).run_hash()

    def run_id(self) -> str:
        return f"{self.name}-{self.run_hash()}"

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_id()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------
# Loading, overrides and one-line errors


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        value = _number_or_str(value)
    return key.split("."), value


def _number_or_str(s: str) -> Any:
    # YAML 1.1 reads "1e-4" as a string; users mean a number.
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def set_dotted(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {str(path)!r} (give a YAML path, e.g. configs/exp/quickstart.yaml)")
    try:
        data = yaml.safe_load(read_utf8(p, "config file")) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, not {type(data).__name__}")
    return data


def read_utf8(path: Path, what: str) -> str:
    """The text of a file, or a one-line ConfigError when its bytes are not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text: byte 0x{data[e.start]:02x} on line {line}; "
                          "save it as UTF-8") from None


def build_config(base: dict | None = None, overrides: list[str] | None = None) -> RunConfig:
    tree = json.loads(json.dumps(base or {}))  # deep copy
    for item in overrides or []:
        path, value = parse_override(item)
        set_dotted(tree, path, value)
    return validate(tree)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    return build_config(load_yaml(path) if path else {}, overrides)


def validate(tree: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        ann = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)),
                   ann)  # Optional[Section] (eval_during.select)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return list(model.model_fields)


def format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            parts.append(f"unknown config key {key!r}; allowed here: {', '.join(allowed)}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(msg if not loc else f"bad value for {key!r}: {err.get('input')!r} ({msg})")
    return "config error: " + "; ".join(parts)


def describe_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every field: the reference printed by `lexfine config keys`."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, f"{prefix}{name}."))
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((f"{prefix}{name}", json.dumps(default), field.description or ""))
    return rows
