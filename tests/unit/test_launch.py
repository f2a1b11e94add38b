import os

from lexfine.train.launch import accelerate_config_path, local_command, pin_single_process
from lexfine.train.strategies import training_fields


def test_single_process_is_pinned_to_one_gpu(monkeypatch):
    for k in ("CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    pin_single_process(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def test_user_choice_and_launched_processes_are_left_alone(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    pin_single_process(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("LOCAL_RANK", "1")
    pin_single_process(1)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.delenv("LOCAL_RANK")
    pin_single_process(4)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_local_commands():
    acc = local_command("/x/c.yaml", 4)
    assert acc[1:3] == ["-m", "accelerate.commands.launch"] and "--num_processes" in acc
    assert acc[acc.index("--config_file") + 1] == str(accelerate_config_path("zero3"))
    assert acc[-3:] == ["-m", "lexfine.train", "/x/c.yaml"]
    assert 0 < int(acc[acc.index("--main_process_port") + 1]) < 65536  # a free port: launches side by side
    tr = local_command("/x/c.yaml", 2, launcher="torchrun")
    assert "--nproc_per_node=2" in tr and tr[-1] == "/x/c.yaml"


def test_strategies_map_to_trainer_fields(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a))
    assert training_fields("zero3", True)["deepspeed"]["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"] is True
    assert training_fields("zero2", True)["deepspeed"]["zero_optimization"]["stage"] == 2
    fsdp = training_fields("fsdp2", True)
    # transformers' checkpointing, not FSDP's CheckpointWrapper (with it PEFT saved every LoRA adapter empty)
    assert fsdp["fsdp_config"]["version"] == 2 and fsdp["fsdp_config"]["activation_checkpointing"] is False
    assert "gradient_checkpointing" not in fsdp  # train.gradient_checkpointing decides, as for every strategy
    assert training_fields("ddp", True) == {"ddp_find_unused_parameters": False}


def test_full_fine_tuning_under_zero_keeps_fp32_weights_under_autocast(monkeypatch):
    """DeepSpeed's bf16 mode would compute on bf16 weights (another trajectory than DDP/FSDP2 for full FT): full
    fine-tuning in bf16 under ZeRO goes through DeepSpeed's torch_autocast, with the Trainer's bf16 off."""
    import importlib.util
    from types import SimpleNamespace

    from lexfine.train.strategies import autocast_by_deepspeed, zero_autocast

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a))
    assert [zero_autocast(s, "full", True) for s in ("none", "ddp", "zero2", "zero3", "fsdp2")] == [
        False, False, True, True, False]
    assert not zero_autocast("zero3", "lora", True) and not zero_autocast("zero3", "full", False)
    for stage in ("zero2", "zero3"):
        ds = training_fields(stage, True, autocast=True)["deepspeed"]
        assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
        assert ds["bf16"] == {"enabled": "auto"}  # resolved from the Trainer's bf16, which build_args turns off
        assert autocast_by_deepspeed(SimpleNamespace(deepspeed=ds))
        assert "torch_autocast" not in training_fields(stage, True)["deepspeed"]
    assert not autocast_by_deepspeed(SimpleNamespace(deepspeed=None))


def test_zero_without_deepspeed_is_a_clear_error(monkeypatch):
    import importlib.util

    import pytest

    from lexfine.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match="lexfine\\[deepspeed\\]"):
        training_fields("zero3", True)


def test_local_launch_refuses_several_nodes_and_unknown_launchers():
    import pytest

    from lexfine.errors import ConfigError

    with pytest.raises(ConfigError, match="lexfine sweep submit"):
        local_command("/x/c.yaml", 8, num_machines=2)
    with pytest.raises(ConfigError, match="'mpirun'"):
        local_command("/x/c.yaml", 2, launcher="mpirun")


def test_manifest_precision_names_how_the_run_computes():
    from types import SimpleNamespace

    from lexfine.train.strategies import precision

    zero = {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    assert precision(SimpleNamespace(bf16=False, deepspeed=zero)) == "bf16 autocast (DeepSpeed torch_autocast)"
    assert precision(SimpleNamespace(bf16=True, deepspeed={"bf16": {"enabled": "auto"}})).startswith("bf16 (DeepSpeed")
    assert precision(SimpleNamespace(bf16=True, deepspeed=None)) == "bf16 autocast"
    assert precision(SimpleNamespace(bf16=False, deepspeed=None)) == "fp32"
