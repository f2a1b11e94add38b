"""Sweep files -> runs: counts of the shipped grids, stable ids, dedupe, tied groups and every bad-input error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lexfine.config import load_config
from lexfine.errors import ConfigError
from lexfine.sweep.grid import expand, fmt_value, load_sweep

REPO = Path(__file__).resolve().parents[2]
SWEEPS = REPO / "configs" / "sweep"
BASE = {"model": "smollm2-135m", "train": {"max_steps": 2}}


def write(tmp_path: Path, data: dict | str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return p


def sweep(tmp_path: Path, **data):
    data.setdefault("base", BASE)
    data.setdefault("output_dir", str(tmp_path / "sweeps"))
    return load_sweep(write(tmp_path, data))


# ------------------------------------------------------------------------------------------------
# shipped sweep files


def test_reference_study_grid_is_30_lora_plus_3_full():
    s = load_sweep(SWEEPS / "reference_study_8b.yaml")
    lora = [r for r in s.runs if r.config.method == "lora"]
    full = [r for r in s.runs if r.config.method == "full"]
    assert (len(s.runs), len(lora), len(full)) == (33, 30, 3)
    assert {r.config.train.lr for r in lora} == {1e-5, 1e-4, 1e-3}
    assert sorted({r.config.lora.r for r in lora}) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert sorted(r.config.train.lr for r in full) == [1e-6, 1e-5, 1e-4]
    evals = ["sjp@validation", "sjp@test", "lexam_mcq4"]  # select on validation years, report test once
    assert s.eval == evals and all(r.config.eval == evals for r in s.runs)
    # what the study's runs did: alpha 32 at every rank, loss on every token, constant LR without warm-up, one
    # epoch, global batch 128 (planned for one 4-GPU node: 4 x 8 x 4)
    assert {r.config.lora.alpha for r in lora} == {32} and {r.config.data.loss_on for r in s.runs} == {"all"}
    assert all(r.config.train.lr_scheduler == "constant" and r.config.train.warmup_ratio == 0 for r in s.runs)
    assert all(r.config.train.epochs == 1 and r.config.train.max_steps == -1 for r in s.runs)
    assert s.global_batch == 128
    assert all(r.config.train.batch_size * r.config.train.grad_accum * r.config.launch.num_processes == 128
               for r in s.runs)
    assert all(r.config.model == "swiss-ai/Apertus-8B-Instruct-2509" for r in s.runs)  # from base_config
    assert len({r.run_id for r in s.runs}) == 33
    assert any(r.name == "ref8b-lora-r16-lr1e-4" for r in s.runs)
    assert any(r.name == "ref8b-full-lr1e-6" for r in s.runs)


def test_halfdecade_grid_resolves_half_decades():
    s = load_sweep(SWEEPS / "halfdecade_8b.yaml")
    lora = [r for r in s.runs if r.config.method == "lora"]
    full = [r for r in s.runs if r.config.method == "full"]
    assert sorted({r.config.train.lr for r in lora}) == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
    assert len(full) == 5 and len(lora) == 15
    assert {r.config.lora.alpha for r in lora} == {32}  # fixed across ranks: alpha/r keeps its 1/r scaling


def test_global_batch_sets_grad_accum_and_refuses_what_does_not_divide(tmp_path):
    s = sweep(tmp_path, global_batch=16, grid={"train.lr": [1e-4]},
              overrides=["train.batch_size=2", "launch.num_processes=2"])
    assert s.runs[0].config.train.grad_accum == 4
    with pytest.raises(ConfigError, match=r"global_batch 16 is not a multiple of train.batch_size 2 x 3 processes"):
        sweep(tmp_path, global_batch=16, grid={"train.lr": [1e-4]},
              overrides=["train.batch_size=2", "launch.num_processes=3"])
    with pytest.raises(ConfigError, match="global_batch or train.grad_accum, not both"):
        sweep(tmp_path, global_batch=16, grid={"train.lr": [1e-4], "train.grad_accum": [1, 2]})
    with pytest.raises(ConfigError, match="global_batch must be a positive integer"):
        sweep(tmp_path, global_batch="lots", grid={"train.lr": [1e-4]})


def test_tiny_cpu_sweep():
    s = load_sweep(SWEEPS / "tiny_cpu.yaml")
    assert len(s.runs) == 5
    assert all(r.config.train.max_steps == 2 and r.config.data.limit == 16 for r in s.runs)


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")) + sorted((REPO / "configs" / "slurm").glob("*.yaml")))
def test_shipped_yaml_starts_with_its_command(path):
    assert path.read_text().startswith("# lexfine sweep ")


# ------------------------------------------------------------------------------------------------
# expansion


def test_grid_is_a_cartesian_product_in_file_order(tmp_path):
    s = sweep(tmp_path, name="g", grid={"train.lr": [1e-4, 1e-3], "lora.r": [8, 16, 32]})
    assert len(s.runs) == 6
    assert [(r.config.train.lr, r.config.lora.r) for r in s.runs[:3]] == [(1e-4, 8), (1e-4, 16), (1e-4, 32)]
    assert [r.index for r in s.runs] == [1, 2, 3, 4, 5, 6]
    assert s.runs[0].name == "g-lora-r8-lr1e-4"
    assert s.runs[0].run_dir == tmp_path / "sweeps" / "g" / s.runs[0].run_id


def test_nested_and_dotted_keys_are_the_same(tmp_path):
    a = sweep(tmp_path, name="n", grid={"train": {"lr": [1e-4]}})
    b = sweep(tmp_path, name="n", grid={"train.lr": [1e-4]})
    assert a.runs[0].run_id == b.runs[0].run_id


def test_run_ids_are_stable_and_match_the_written_config(tmp_path):
    a = sweep(tmp_path, name="st", grid={"train.lr": [1e-4, 3e-5], "lora.r": [4]})
    b = sweep(tmp_path, name="st", grid={"train.lr": [1e-4, 3e-5], "lora.r": [4]})
    assert [r.run_id for r in a.runs] == [r.run_id for r in b.runs]
    for r in a.runs:  # what `python -m lexfine.train` reads back gives the same id
        p = tmp_path / f"{r.run_id}.yaml"
        p.write_text(r.config.to_yaml())
        assert load_config(p).run_id() == r.run_id
    # growing a list keeps the ids of the runs that were there (a resumed sweep finds them)
    c = sweep(tmp_path, name="st", grid={"train.lr": [1e-4, 3e-5, 1e-3], "lora.r": [4]})
    assert {r.run_id for r in a.runs} <= {r.run_id for r in c.runs}
    # output_dir and eval do not change what is trained: same ids
    d = sweep(tmp_path, name="st", grid={"train.lr": [1e-4, 3e-5], "lora.r": [4]}, eval=["sjp"],
              output_dir=str(tmp_path / "elsewhere"))
    assert [r.run_id for r in a.runs] == [r.run_id for r in d.runs]


def test_lora_keys_do_not_multiply_full_runs(tmp_path):
    s = sweep(tmp_path, name="d", grid={"method": ["lora", "full"], "lora.r": [8, 16], "train.lr": [1e-4, 1e-3]})
    assert len(s.runs) == 6 and s.merged == 2
    names = [r.name for r in s.runs]
    assert "d-full-lr1e-4" in names and "d-lora-r16-lr1e-3" in names
    full = [r for r in s.runs if r.config.method == "full"]
    assert all("lora.r" not in r.assignment for r in full)


def test_variants_with_their_own_sub_grids(tmp_path):
    s = sweep(tmp_path, name="v", variants=[
        {"method": "lora", "lora.r": [4, 8], "train.lr": [1e-4, 1e-3]},
        {"method": "full", "train.lr": [1e-6, 1e-5, 1e-4]},
    ], grid={"train.seed": [1, 2]})
    assert len(s.runs) == (4 + 3) * 2
    assert s.runs[0].name == "v-lora-r4-lr1e-4-seed1"
    assert {r.config.train.lr for r in s.runs if r.config.method == "full"} == {1e-6, 1e-5, 1e-4}


def test_tied_keys_vary_together(tmp_path):
    s = sweep(tmp_path, name="t", tied={"lora.r": [8, 16], "lora.alpha": [16, 32]}, grid={"train.lr": [1e-4]})
    assert [(r.config.lora.r, r.config.lora.alpha) for r in s.runs] == [(8, 16), (16, 32)]
    assert s.runs[0].name == "t-lora-r8-lr1e-4-a16"
    # `tied:` as a list is the same as variants
    s2 = sweep(tmp_path, name="t", tied=[{"lora.r": 8, "lora.alpha": 16}, {"lora.r": 16, "lora.alpha": 32}],
               grid={"train.lr": [1e-4]})
    assert [r.run_id for r in s2.runs] == [r.run_id for r in s.runs]


def test_overrides_and_base_config_relative_to_the_sweep_file(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "base.yaml").write_text(yaml.safe_dump({"model": "smollm2-135m", "train": {"lr": 1e-4}}))
    (tmp_path / "sw").mkdir()
    p = write(tmp_path / "sw", {"name": "o", "base_config": "../exp/base.yaml", "overrides": ["train.max_steps=3"],
                                "grid": {"lora.r": [4]}, "output_dir": str(tmp_path / "out")})
    s = load_sweep(p)
    assert s.runs[0].config.train.max_steps == 3 and s.runs[0].config.train.lr == 1e-4
    assert s.text == p.read_text()


def test_fmt_value():
    assert [fmt_value(v) for v in (1e-4, 3e-5, 1.0e-3, 0.05, 1.5e-6, 2.0, True, "x")] == \
        ["1e-4", "3e-5", "1e-3", "0.05", "1.5e-6", "2", "true", "x"]


# ------------------------------------------------------------------------------------------------
# bad input: one line, before anything runs


BAD = [
    ({"grid": {"train.lrr": [1e-4]}}, "unknown config key 'train.lrr'"),
    ({"grid": {"lorra.r": [4]}}, "unknown config key 'lorra.r'"),
    ({"grid": {"train.lr.x": [1]}}, "has no key"),
    ({"grid": {}}, "grid is empty"),
    ({}, "grid is empty"),
    ({"grid": {"train.lr": []}}, "empty list"),
    ({"grid": {"train.lr": 1e-4}}, "must map to a list"),
    ({"grid": ["train.lr"]}, "grid must map"),
    ({"grid": {"train.lr": [1e-4]}, "variants": [{"method": "full", "train.lr": [1e-5]}]}, "also a grid key"),
    ({"variants": [{"method": "full", "lora.r": 8}]}, "conflicting tied values"),
    ({"variants": [{"lora.r": 8, "lora": {"r": 16}}]}, "conflicting values for 'lora.r'"),
    ({"variants": []}, "non-empty list"),
    ({"variants": [{}]}, "non-empty mapping"),
    ({"variants": [{"train.lr": []}]}, "empty list"),
    ({"tied": {"train.lr": [1e-4, 1e-3], "lora.r": [4, 8, 16]}}, "conflicting tied values"),
    ({"tied": {"train.lr": [1e-4]}, "grid": {"train.lr": [1e-3]}}, "also set by grid"),
    ({"grid": {"name": ["a", "b"]}}, "cannot vary per run"),
    ({"grid": {"output_dir": ["a"]}}, "cannot vary per run"),
    ({"grid": {"lora": [4]}}, "is a config section"),
    ({"grid": {"train.lr": [-1.0]}}, "bad value for 'train.lr'"),
    ({"grid": {"method": ["lora", "qlora"]}}, "bad value for 'method'"),
    ({"grid": {"train.lr": [1e-4]}, "gridd": {}}, "unknown sweep key 'gridd'"),
    ({"grid": {"train.lr": [1e-4]}, "eval": ["sjpp"]}, "unknown task 'sjpp'"),
    ({"grid": {"train.lr": [1e-4]}, "eval": "sjp"}, "eval must be a list"),
    ({"grid": {"train.lr": [1e-4]}, "name": "bad name"}, "sweep name"),
    ({"grid": {"train.lr": [1e-4]}, "base_config": "nope.yaml"}, "not both"),
    ({"grid": {"train.lr": [1e-4]}, "base": {"trian": {}}}, "unknown config key 'trian'"),
    ({"grid": {"train.lr": [1e-4]}, "overrides": ["train.lrr=1"]}, "unknown config key 'train.lrr'"),
    ({"grid": {"train.lr": [1e-4]}, "overrides": "train.lr=1"}, "overrides must be"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m for _, m in BAD])
def test_bad_sweep_files_fail_with_one_line(tmp_path, data, message):
    with pytest.raises(ConfigError) as e:
        sweep(tmp_path, **data)
    text = str(e.value)
    assert message in text and "\n" not in text
    assert not (tmp_path / "sweeps").exists()  # nothing was written


def test_missing_base_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_sweep(write(tmp_path, {"base_config": "missing.yaml", "grid": {"train.lr": [1e-4]}}))


def test_repeated_key_in_yaml_is_a_conflict(tmp_path):
    p = write(tmp_path, "base: {model: smollm2-135m}\nvariants:\n  - {method: full, train.lr: [1e-5], train.lr: [1e-4]}\n")
    with pytest.raises(ConfigError, match="appears twice") as e:
        load_sweep(p)
    assert "\n" not in str(e.value)


def test_missing_sweep_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="sweep file not found"):
        load_sweep(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(write(tmp_path, "grid: [unclosed\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_sweep(write(tmp_path, "- a\n- b\n"))


def test_expand_in_memory_defaults():
    s = expand({"grid": {"train.lr": [1e-4]}}, default_name="my sweep")
    assert s.name == "my_sweep" and s.output_dir.name == "sweeps"
