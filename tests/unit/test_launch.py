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
