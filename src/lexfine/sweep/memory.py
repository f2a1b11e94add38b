"""A rough upper bound of a training run's peak GPU memory, from its config alone (no weights are loaded).

Per process, in bytes (b = bytes of a weight: 4 for full fine-tuning, which keeps fp32 master weights, or with
model_args.dtype=float32; else 2):

    weights      P x b                                 P: parameters, from the architecture (embeddings, attention,
                                                          MLP; norms ignored)
    training     full: P x 4b (gradients + AdamW's two moments, in the weights' dtype)
                 LoRA: T x 16 (fp32 adapter, gradient, two moments); T from r and the adapted modules' shapes
    activations  checkpointed layers keep their input: B x S x H x b each; the others (and the one being recomputed)
                 keep ~B x S x (10 H + 3 I) x b
    logits       B x S x V x 16 (bf16 logits, their fp32 copy, log-softmax and its gradient: the largest term for a
                 small model with a large vocabulary); liger's fused loss never materialises them: B x S x H x 8
    overhead     +10% (allocator fragmentation) + 1 GiB (CUDA context, kernels)

B = train.batch_size, S = train.max_length (every batch padded to the limit: the worst case), H hidden size, I
intermediate size, V vocabulary. ZeRO-2 divides the training term by the number of processes; ZeRO-3 and FSDP2
divide weights and training. AdamW 8-bit, shorter batches and fused kernels use less: `--gpu-memory-per-run` wins
over the estimate when you have measured a run (manifest.json: peak_gpu_memory_gib).

Examples (80 GiB H100): SmolLM2-135M LoRA r=16, 4 x 4096 tokens, gradient checkpointing: ~15 GiB (4 per GPU);
Apertus-8B LoRA r=64 at 4 x 4096: ~63 GiB (measured: 58.3 GiB with 18 of 32 layers
checkpointed, docs/performance.md); Apertus-8B full fine-tuning on one GPU: ~217 GiB (does not fit even alone).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lexfine.config import RunConfig
from lexfine.errors import ConfigError, ModelError

GIB = 2**30
# SmolLM2-135M-Instruct's config.json (the embedded default), so that its size is known before it is converted.
SMOLLM2_135M = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                "tie_word_embeddings": True}
# MLPs with an up and a down projection only (no gate).
UNGATED = {"apertus", "gpt2", "gpt_neox", "opt", "phi", "bloom", "falcon"}
HEADROOM = 1.10
CONTEXT_GIB = 1.0


def model_config(cfg: RunConfig) -> dict:
    """The model's config.json (with model_args.arch_overrides), read without loading any weights."""
    from lexfine import models

    spec = cfg.model
    if spec == models.EMBEDDED:
        local = models.cache_dir() / "models" / "smollm2-135m-instruct" / "config.json"
        raw = json.loads(local.read_text()) if local.is_file() else dict(SMOLLM2_135M)
    else:
        resolved = models.resolve(spec)
        if resolved.kind == "random":
            raw = json.loads(Path(resolved.source).read_text())
        elif resolved.kind == "local":
            raw = json.loads((Path(resolved.source) / "config.json").read_text())
        else:
            try:
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(resolved.source, "config.json", revision=cfg.model_args.revision)
            except Exception as e:
                raise ModelError(f"cannot read the config of model {spec!r} to estimate its memory "
                                 f"({type(e).__name__}); give --gpu-memory-per-run GiB") from None
            raw = json.loads(Path(path).read_text())
    raw = dict(raw.get("text_config") or raw) if "hidden_size" not in raw else dict(raw)
    raw.update(cfg.model_args.arch_overrides)
    return raw


def shapes(c: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear module of one decoder layer."""
    h, i = int(c["hidden_size"]), int(c.get("intermediate_size") or 4 * int(c["hidden_size"]))
    heads = int(c.get("num_attention_heads") or 1)
    kv = int(c.get("num_key_value_heads") or heads)
    hd = int(c.get("head_dim") or h // heads)
    out = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
           "up_proj": (h, i), "down_proj": (i, h)}
    if c.get("model_type") not in UNGATED:
        out["gate_proj"] = (h, i)
    return out


def parameters(c: dict) -> int:
    layers, h, v = int(c["num_hidden_layers"]), int(c["hidden_size"]), int(c["vocab_size"])
    per_layer = sum(a * b for a, b in shapes(c).values())
    embeddings = v * h * (1 if c.get("tie_word_embeddings", False) else 2)
    return layers * per_layer + embeddings


def lora_parameters(c: dict, r: int, target_modules) -> int:
    adapted = shapes(c)
    if target_modules != "all-linear":
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        adapted = {k: s for k, s in adapted.items() if any(k == w or k.endswith(w) for w in wanted)}
    return int(c["num_hidden_layers"]) * sum(r * (a + b) for a, b in adapted.values())


@dataclass
class Estimate:
    gib: float
    parts: dict[str, float]
    """GiB per term (weights, training, activations, logits), before the overhead."""

    def describe(self) -> str:
        return f"{self.gib:.1f} GiB (" + ", ".join(f"{k} {v:.1f}" for k, v in self.parts.items()) + ")"


def estimate(cfg: RunConfig, config: dict | None = None) -> Estimate:
    """Peak GPU memory of one process of this run (see the module docstring for the formula)."""
    c = config if config is not None else model_config(cfg)
    try:
        p = parameters(c)
        layers, h, v = int(c["num_hidden_layers"]), int(c["hidden_size"]), int(c["vocab_size"])
        inter = int(c.get("intermediate_size") or 4 * h)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"model {cfg.model!r}: its config lacks {e} to estimate memory; give --gpu-memory-per-run "
                          "GiB") from None
    t = cfg.train
    full = cfg.method == "full"
    b = 4 if (full and cfg.model_args.dtype == "auto") or cfg.model_args.dtype == "float32" else 2
    weights = p * b
    training = p * 4 * b if full else lora_parameters(c, cfg.lora.r, cfg.lora.target_modules) * 16
    n, strategy = cfg.launch.num_processes, cfg.launch.strategy
    if n > 1 and strategy in ("zero2", "zero3", "fsdp2"):
        training /= n
        if strategy != "zero2":
            weights /= n
    tokens = t.batch_size * t.max_length
    kept = t.checkpoint_fraction if t.gradient_checkpointing else 0.0
    whole_layer = tokens * (10 * h + 3 * inter) * b
    activations = layers * kept * tokens * h * b + (layers * (1 - kept) + 1) * whole_layer
    logits = tokens * (h * 8 if t.liger else v * 16)
    parts = {"weights": weights, "training": training, "activations": activations, "logits": logits}
    total = sum(parts.values()) * HEADROOM / GIB + CONTEXT_GIB
    return Estimate(total, {k: x / GIB for k, x in parts.items()})


def max_runs_per_gpu(per_run_gib: float, gpu_gib: float) -> int:
    return int(gpu_gib // per_run_gib) if per_run_gib > 0 else 0


def check_fit(runs: list, gpus: list, runs_per_gpu: int, per_run_gib: float | None = None) -> dict[str, float]:
    """Refuse, in one line, runs_per_gpu > 1 when N of the largest run do not fit the smallest GPU.
    `runs` are PlannedRun (or anything with .run_id and .config). Returns run_id -> GiB used for the check."""
    if runs_per_gpu <= 1 or not runs or not gpus:
        return {}
    known = [g.memory_gib for g in gpus if g.memory_gib]
    if not known:
        raise ConfigError("--runs-per-gpu > 1 needs the GPUs' memory, which nvidia-smi and torch did not tell; "
                          "use --runs-per-gpu 1")
    gpu_gib = min(known)
    need: dict[str, float] = {}
    cache: dict[str, dict] = {}
    for run in runs:
        if per_run_gib is not None:
            need[run.run_id] = per_run_gib
            continue
        key = run.config.model + json.dumps(run.config.model_args.arch_overrides, sort_keys=True)
        if key not in cache:
            cache[key] = model_config(run.config)
        need[run.run_id] = estimate(run.config, cache[key]).gib
    worst = max(need, key=need.get)
    if need[worst] * runs_per_gpu > gpu_gib:
        fits = max_runs_per_gpu(need[worst], gpu_gib)
        source = "given by --gpu-memory-per-run" if per_run_gib is not None else "estimated"
        hint = (f"use --runs-per-gpu {fits}" if fits >= 1 else
                "it does not fit one GPU even alone: use launch.num_processes with launch.strategy=zero3")
        raise ConfigError(f"--runs-per-gpu {runs_per_gpu}: run {worst} needs {need[worst]:.1f} GiB ({source}) x "
                          f"{runs_per_gpu} > {gpu_gib:.1f} GiB per GPU; at most {fits} fit: {hint} "
                          "(or --gpu-memory-per-run GiB if you measured less)")
    return need
