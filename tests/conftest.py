"""Shared fixtures: offline by default, the embedded tokenizer, tiny configs, skip rules for GPU and ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    # Tests never reach the hub: a silent download would make them slow and flaky.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Each test has its own tokenized-data cache: a hit left by another test (or a user's run) would hide behaviour.
    monkeypatch.setenv("LEXFINE_TOKENIZED_CACHE", str(tmp_path_factory.mktemp("tokenized")))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("WANDB_DISABLED", "true")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        n_gpu = torch.cuda.device_count()
    except Exception:
        n_gpu = 0
    # LEXFINE_MGPU_ON_CPU=1: the multigpu tests run their logic with 2 gloo CPU processes (tests/gpu/test_multigpu.py)
    on_cpu = os.environ.get("LEXFINE_MGPU_ON_CPU") == "1"
    for item in items:
        if on_cpu and "multigpu" in item.keywords:
            continue
        if "gpu" in item.keywords and n_gpu < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and n_gpu < 2:
            item.add_marker(pytest.mark.skip(reason="needs 2+ CUDA GPUs"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present (only in the development checkout)")
    return SHARED


@pytest.fixture(scope="session")
def smollm_tokenizer():
    from lexfine import models

    return models.load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def apertus_tokenizer():
    """SmolLM2's vocabulary with the real Apertus chat template (its <|...|> markers become special tokens)."""
    from lexfine import models
    from lexfine.config import ModelArgs

    return models.load_tokenizer("smollm2-135m", ModelArgs(chat_template="apertus"))


def tiny_arch() -> dict:
    """A 2-layer, width-64 Apertus: the real architecture code at a size that trains in seconds on a CPU."""
    return {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 49152 + 64, "max_position_embeddings": 2048}


@pytest.fixture
def tiny_config(tmp_path):
    """Factory: a RunConfig tree for a seconds-long training of the tiny Apertus on bundled SJP rows."""

    def make(**over) -> dict:
        tree = {
            "name": "tiny",
            "model": "random:apertus-8b",
            "model_args": {"arch_overrides": tiny_arch(), "dtype": "float32"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"limit": 24},
            "train": {"max_steps": 4, "batch_size": 2, "max_length": 256, "lr": 1e-3, "save_steps": 2,
                      "gradient_checkpointing": False, "logging_steps": 1},
            "output_dir": str(tmp_path / "runs"),
        }
        for key, value in over.items():
            node = tree
            parts = key.split("__")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        return tree

    return make


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
