"""The memory estimate behind --runs-per-gpu (from configs alone) and the GPU list behind --gpus."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lexfine.config import build_config
from lexfine.errors import ConfigError
from lexfine.sweep import memory
from lexfine.sweep.gpus import Gpu, select

SMOL = dict(memory.SMOLLM2_135M)
APERTUS_8B = {"model_type": "apertus", "vocab_size": 131072, "hidden_size": 4096, "intermediate_size": 21504,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "tie_word_embeddings": False}
H100 = [Gpu("0", 79.2), Gpu("1", 79.2)]


def run(overrides: list[str], rid: str = "r"):
    return SimpleNamespace(run_id=rid, config=build_config({}, overrides))


def test_parameter_counts_from_the_architecture():
    assert abs(memory.parameters(SMOL) - 134.5e6) < 0.5e6  # SmolLM2-135M
    assert abs(memory.parameters(APERTUS_8B) - 8.05e9) < 0.05e9  # Apertus-8B: ungated xIELU MLP, untied head
    # LoRA: r x (in + out) per adapted module per layer; q_proj only: 30 x 16 x (576 + 576)
    assert memory.lora_parameters(SMOL, 16, ["q_proj"]) == 30 * 16 * 1152
    assert memory.lora_parameters(SMOL, 16, "all-linear") > memory.lora_parameters(SMOL, 16, ["q_proj", "v_proj"])


def test_terms_grow_with_what_they_depend_on():
    base = ["train.batch_size=4", "train.max_length=4096"]
    e = memory.estimate(build_config({}, base), SMOL)
    assert set(e.parts) == {"weights", "training", "activations", "logits"} and "GiB" in e.describe()
    longer = memory.estimate(build_config({}, ["train.batch_size=8", "train.max_length=4096"]), SMOL)
    no_ckpt = memory.estimate(build_config({}, [*base, "train.gradient_checkpointing=false"]), SMOL)
    full = memory.estimate(build_config({}, [*base, "method=full"]), SMOL)
    liger = memory.estimate(build_config({}, [*base, "train.liger=true"]), SMOL)
    assert longer.parts["logits"] == 2 * e.parts["logits"] and no_ckpt.parts["activations"] > 5 * e.parts["activations"]
    assert full.parts["training"] > 10 * e.parts["training"] and full.parts["weights"] == 2 * e.parts["weights"]
    assert liger.gib < e.gib / 3


def test_smollm2_lora_packs_four_per_h100_and_8b_full_two_is_refused(monkeypatch):
    monkeypatch.setattr(memory, "model_config", lambda cfg: SMOL if cfg.model == "smollm2-135m" else APERTUS_8B)
    smol = [run(["train.batch_size=4", "train.max_length=4096", f"lora.r={r}"], f"r{r}") for r in (1, 16, 256)]
    need = memory.check_fit(smol, H100, 4)
    assert all(8 < g < 19.8 for g in need.values())
    with pytest.raises(ConfigError) as e:
        memory.check_fit([run(["model=random:apertus-8b", "method=full"], "big")], H100, 2)
    msg = str(e.value)
    assert "\n" not in msg and "run big needs" in msg and "x 2 > 79.2 GiB per GPU" in msg and "at most 0 fit" in msg
    # a measured number wins over the estimate
    assert memory.check_fit(smol, H100, 8, per_run_gib=9.0) == {r.run_id: 9.0 for r in smol}
    assert memory.check_fit(smol, H100, 1) == {}  # one per GPU: no check


def test_embedded_and_random_configs_are_read_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("LEXFINE_CACHE", str(tmp_path))  # nothing converted: the built-in SmolLM2 numbers
    assert memory.model_config(build_config({}, []))["hidden_size"] == 576
    c = memory.model_config(build_config({}, ["model=random:apertus-8b",
                                              "model_args.arch_overrides={num_hidden_layers: 2}"]))
    assert c["num_hidden_layers"] == 2 and c["hidden_size"] == 4096


def test_gpu_selection(monkeypatch):
    monkeypatch.setenv("LEXFINE_FAKE_GPUS", "0:80,1:40")
    assert [(g.id, g.memory_gib) for g in select("auto")] == [("0", 80.0), ("1", 40.0)]
    assert [g.id for g in select("1")] == ["1"] and select("none") == []
    with pytest.raises(ConfigError, match="GPU 2 is not visible"):
        select("0,2")
    with pytest.raises(ConfigError, match="distinct ids"):
        select("0,0")
    monkeypatch.setenv("LEXFINE_FAKE_GPUS", "")
    assert select("auto") == []  # a CPU machine: one run after another
