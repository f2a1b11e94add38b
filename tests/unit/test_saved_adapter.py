"""The check after saving a LoRA adapter: complete, non-empty, and trained (not every lora_B still zero)."""

import pytest
import torch
from safetensors.torch import save_file

from lexfine.errors import LexfineError
from lexfine.train.saved_adapter import adapted_modules, check_saved_adapter

MODULES = {f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}


def write(tmp_path, modules, b_value=0.5, empty=None):
    tensors = {}
    for m in sorted(modules):
        tensors[f"{m}.lora_A.weight"] = torch.ones(4, 8)
        tensors[f"{m}.lora_B.weight"] = torch.full((8, 4), b_value)
    if empty:
        tensors[f"{empty}.lora_A.weight"] = torch.empty(0)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    return tmp_path


def test_complete_trained_adapter_passes(tmp_path):
    assert check_saved_adapter(write(tmp_path, MODULES), MODULES) == {"modules": 4, "lora_B_nonzero": 4}


def test_missing_module_is_named(tmp_path):
    saved = MODULES - {"base_model.model.model.layers.1.self_attn.v_proj"}
    with pytest.raises(LexfineError, match=r"1 of 4 adapted modules missing \(first: .*layers\.1\.self_attn\.v_proj\)"):
        check_saved_adapter(write(tmp_path, saved), MODULES)


def test_empty_tensors_from_an_ungathered_sharded_save(tmp_path):
    with pytest.raises(LexfineError, match="1 empty tensors"):
        check_saved_adapter(write(tmp_path, MODULES - {"base_model.model.model.layers.0.self_attn.q_proj"},
                                  empty="base_model.model.model.layers.0.self_attn.q_proj"), MODULES)


def test_untrained_adapter_is_refused_only_when_training_happened(tmp_path):
    path = write(tmp_path, MODULES, b_value=0.0)
    with pytest.raises(LexfineError, match="still zero"):
        check_saved_adapter(path, MODULES)
    assert check_saved_adapter(path, MODULES, trained=False)["lora_B_nonzero"] == 0


def test_wrapper_segments_in_saved_names_do_not_count_as_missing(tmp_path):
    wrapped = {m.replace("layers.0.", "layers.0._checkpoint_wrapped_module.") for m in MODULES}
    assert check_saved_adapter(write(tmp_path, wrapped), MODULES)["modules"] == 4


def test_expected_modules_come_from_the_peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert adapted_modules(model) == MODULES


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_are_a_broken_adapter(tmp_path, bad):
    # a diverged LoRA run saves NaN/inf weights; every lora_B is "non-zero", so only this check catches it
    with pytest.raises(LexfineError, match=r"NaN/inf weights in 4 tensors .*lower train\.lr"):
        check_saved_adapter(write(tmp_path, MODULES, b_value=bad), MODULES)
    path = write(tmp_path, MODULES)
    from safetensors.torch import load_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key][0, 0] = bad  # one value in one tensor is enough
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(LexfineError, match="in 1 tensors"):
        check_saved_adapter(path, MODULES)
