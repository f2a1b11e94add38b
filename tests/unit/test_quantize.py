"""lora.quantize (QLoRA): the config key, where it is refused, the BitsAndBytesConfig it builds and the runtime
checks — none of it needs bitsandbytes installed or a model loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lexfine import quantize
from lexfine.config import build_config, describe_fields
from lexfine.errors import ConfigError, ModelError


def test_config_keys_lists_quantize_with_its_choices():
    rows = {k: (default, doc) for k, default, doc in describe_fields() if k.startswith("lora.")}
    default, doc = rows["lora.quantize"]
    assert default == '"none"'
    for choice in ("none", "nf4", "fp4", "int8"):
        assert choice in doc
    assert "double quantization" in doc and "bfloat16" in doc


@pytest.mark.parametrize("q", ["nf4", "fp4", "int8"])
def test_quantize_is_accepted_for_lora(q):
    assert build_config({}, [f"lora.quantize={q}"]).lora.quantize == q
    assert build_config({}, [f"lora.quantize={q}", "launch.strategy=ddp"]).launch.strategy == "ddp"
    assert build_config({}, [f"lora.quantize={q}", "launch.strategy=zero2"]).launch.strategy == "zero2"


def test_quantize_with_full_finetuning_is_refused_at_config_time():
    with pytest.raises(ConfigError) as e:
        build_config({}, ["method=full", "lora.quantize=nf4"])
    msg = str(e.value)
    assert "\n" not in msg and "lora.quantize=nf4 needs method=lora" in msg


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_quantize_with_sharded_strategies_is_refused(strategy):
    with pytest.raises(ConfigError, match=f"lora.quantize=nf4 is not supported with launch.strategy={strategy}.*"
                                          "bnb_4bit_quant_storage"):
        build_config({}, ["lora.quantize=nf4", f"launch.strategy={strategy}"])


def test_quantize_with_a_random_model_is_accepted():
    """random: models are built quantized layer by layer (quantize.build_random_quantized), so the 70B never has to
    exist in bf16: the measurement QLoRA is for (70B on one GPU) needs no 140 GB checkpoint on disk."""
    with pytest.raises(ConfigError, match=r"lora.quantize=nf4 with model='random:apertus-70b'.*set eval=\[\]"):
        build_config({}, ["model=random:apertus-70b", "lora.quantize=nf4", "eval=[sjp]"])
    cfg = build_config({}, ["model=random:apertus-70b", "lora.quantize=nf4", "eval=[]"])
    assert cfg.lora.quantize == "nf4" and cfg.run_id() != build_config({}, ["model=random:apertus-70b", "eval=[]"]).run_id()


def test_bad_choice_lists_the_choices():
    with pytest.raises(ConfigError, match="'lora.quantize'.*'none', 'nf4', 'fp4' or 'int8'"):
        build_config({}, ["lora.quantize=nf3"])


def test_quantize_changes_the_run_id_and_none_keeps_the_old_ids():
    none, nf4, fp4 = (build_config({}, [f"lora.quantize={q}"]) for q in ("none", "nf4", "fp4"))
    assert len({none.run_id(), nf4.run_id(), fp4.run_id()}) == 3
    # Unquantized runs hash as before the key existed, so they keep their directories (and resume).
    import hashlib
    import json

    from lexfine.config import ID_EXCLUDE

    payload = none.model_dump(mode="json", exclude=ID_EXCLUDE)
    del payload["lora"]["quantize"]
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    assert none.run_hash() == hashlib.sha256(blob.encode()).hexdigest()[:8]


def test_sweep_over_quantize_plans_two_distinct_runs(tmp_path):
    from lexfine.sweep.grid import load_sweep

    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "q", "base": {"model": "smollm2-135m", "train": {"max_steps": 2}},
                                 "output_dir": str(tmp_path / "sweeps"), "grid": {"lora.quantize": ["none", "nf4"]}}))
    s = load_sweep(p)
    assert [r.config.lora.quantize for r in s.runs] == ["none", "nf4"]
    assert len({r.run_id for r in s.runs}) == 2
    assert "lora.quantize=nf4" in s.runs[1].describe()


@pytest.mark.parametrize("q", ["nf4", "fp4"])
def test_four_bit_config(q):
    import torch

    c = quantize.bnb_config(q)
    assert c.load_in_4bit and not c.load_in_8bit
    assert c.bnb_4bit_quant_type == q
    assert c.bnb_4bit_use_double_quant is True
    assert c.bnb_4bit_compute_dtype == torch.bfloat16


def test_eight_bit_config_and_none():
    c = quantize.bnb_config("int8")
    assert c.load_in_8bit and not c.load_in_4bit
    assert quantize.bnb_config("none") is None


def test_runtime_check_without_bitsandbytes(monkeypatch):
    monkeypatch.setattr(quantize.importlib.util, "find_spec", lambda name: None)
    quantize.check_runtime(build_config({}, []))  # none: nothing to check
    with pytest.raises(ModelError) as e:
        quantize.check_runtime(build_config({}, ["lora.quantize=nf4"]))
    assert str(e.value) == "lora.quantize=nf4 needs bitsandbytes: pip install bitsandbytes (or set lora.quantize=none)"


def test_runtime_check_refuses_a_device_bitsandbytes_does_not_support(monkeypatch):
    monkeypatch.setattr(quantize.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(quantize, "quantize_device", lambda: "cpu")
    monkeypatch.setattr(quantize, "bnb_devices", lambda option="": {"cuda"})
    with pytest.raises(ModelError, match=r"lora.quantize=int8 needs a CUDA GPU: .* does not support 'cpu' "
                                         r"\(supports: cuda\)"):
        quantize.check_runtime(build_config({}, ["lora.quantize=int8"]))
    monkeypatch.setattr(quantize, "bnb_devices", lambda option="": {"cuda", "cpu"})
    quantize.check_runtime(build_config({}, ["lora.quantize=int8"]))  # a CPU backend: allowed


def test_runtime_check_reports_a_broken_bitsandbytes(monkeypatch, tmp_path):
    (tmp_path / "bitsandbytes").mkdir()
    (tmp_path / "bitsandbytes" / "__init__.py").write_text("raise OSError('libbitsandbytes_cuda126.so: not found')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "bitsandbytes", raising=False)
    with pytest.raises(ModelError, match="lora.quantize=nf4 needs a working bitsandbytes, but importing it failed: libbitsandbytes_cuda126.so: not found; reinstall"):
        quantize.check_runtime(build_config({}, ["lora.quantize=nf4"]))


def test_slurm_scripts_of_a_quantize_sweep_train_each_run_with_its_setting(tmp_path, monkeypatch):
    from lexfine.sweep.slurm import submit
    from tests.slurm_fakes import install
    from tests.unit.test_slurm import make

    fakes = install(tmp_path)
    monkeypatch.setenv("PATH", fakes.env()["PATH"])
    sw, prof, _, _ = make(tmp_path, grid={"lora.quantize": ["none", "nf4"]}, profile={"nodes": 1, "gpus_per_node": 1})
    records = submit(sw, prof, dry_run=True, workdir=str(tmp_path), echo=lambda s: None)
    configs = [sw.sweep_dir / "configs" / f"{r.run_id}.yaml" for r in sw.runs]
    for rec, cfg_path, q in zip(records, configs, ["none", "nf4"], strict=True):
        assert f"python -m lexfine.train {cfg_path} " in Path(rec["script"]).read_text()
        assert yaml.safe_load(cfg_path.read_text())["lora"]["quantize"] == q
