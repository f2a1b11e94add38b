import pytest

from lexfine.config import RunConfig, build_config, load_config, parse_override
from lexfine.errors import ConfigError


def test_overrides_coerce_numbers_and_nest():
    cfg = build_config({}, ["train.lr=1e-4", "lora.r=64", "data.languages=[de, fr]", "eval=[sjp]"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.lora.r == 64
    assert cfg.data.languages == ["de", "fr"]
    assert cfg.eval == ["sjp"]


def test_unknown_key_is_one_line_and_lists_allowed():
    with pytest.raises(ConfigError) as e:
        build_config({}, ["lora.rr=8"])
    msg = str(e.value)
    assert "\n" not in msg
    assert "'lora.rr'" in msg and "alpha" in msg and "target_modules" in msg


def test_bad_value_names_key_value_and_allowed():
    with pytest.raises(ConfigError) as e:
        build_config({}, ["method=lorra"])
    msg = str(e.value)
    assert "'method'" in msg and "'lorra'" in msg and "'lora'" in msg and "'full'" in msg


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.lr")


def test_unknown_eval_task():
    with pytest.raises(ConfigError, match="lexam_mcq4"):
        build_config({}, ["eval=[sjp, lexam_mcq5]"])


def test_run_id_is_stable_and_ignores_bookkeeping_keys(tmp_path):
    a = build_config({}, ["train.lr=1e-4"])
    b = build_config({}, ["train.lr=0.0001", f"output_dir={tmp_path}", "eval=[sjp]", "train.logging_steps=5",
                          "launch.strategy=zero3", "train.compile_layers=true", "train.checkpoint_fraction=0.5"])
    c = build_config({}, ["train.lr=2e-4"])
    assert a.run_id() == b.run_id()
    assert a.run_id() != c.run_id()
    assert a.run_id().startswith("run-")


def test_yaml_roundtrip(tmp_path):
    cfg = build_config({"name": "x"}, ["lora.r=8", "method=full"])
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_name_must_be_directory_safe():
    with pytest.raises(ConfigError, match="name"):
        build_config({"name": "../evil"})


def test_every_field_is_documented():
    from lexfine.config import describe_fields

    undocumented = [k for k, _, doc in describe_fields(RunConfig) if not doc.strip()]
    assert undocumented == []


def test_shipped_configs_validate_and_start_with_command():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs" / "exp"
    files = sorted(root.glob("*.yaml"))
    assert files, "no shipped configs"
    for f in files:
        first = f.read_text().splitlines()[0]
        assert first.startswith("# ") and "lexfine" in first, f
        load_config(f)


def test_lora_settings_do_not_change_a_full_finetune_id():
    a = build_config({}, ["method=full", "lora.r=8"])
    b = build_config({}, ["method=full", "lora.r=64"])
    c = build_config({}, ["method=lora", "lora.r=64"])
    d = build_config({}, ["method=lora", "lora.r=8"])
    assert a.run_id() == b.run_id()
    assert c.run_id() != d.run_id()
