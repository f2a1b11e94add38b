"""Task registry, targets and the base-score cache."""

import pytest

from lexfine.config import DataArgs
from lexfine.errors import ConfigError, DataError, ModelError
from lexfine.eval import cache
from lexfine.eval.target import resolve_target
from lexfine.eval.tasks import TASKS, fingerprint, get_task, load_cases, split_entry


def test_registry():
    assert set(TASKS) == {"sjp", "lexam_mcq4", "lexam_mcq8", "lexam_mcq16", "lexam_mcq32"}
    assert get_task("lexam_mcq8").labels == list("ABCDEFGH")
    assert get_task("sjp").labels == ["dismissal", "approval"]
    assert get_task("lexam_mcq16").chance_level == pytest.approx(1 / 16)
    with pytest.raises(ConfigError, match="unknown task 'mmlu'"):
        get_task("mmlu")


def test_split_entry():
    assert split_entry("sjp", "loglik") == ("sjp", "loglik")
    assert split_entry("lexam_mcq4:generate", "loglik") == ("lexam_mcq4", "generate")
    with pytest.raises(ConfigError, match="unknown eval mode"):
        split_entry("sjp:beam", "loglik")


def test_sjp_cases_follow_training_filters():
    cases, info = load_cases(get_task("sjp"), "loglik", "bundled:sjp_fr_heldout", DataArgs(legal_areas=["penal law"]))
    assert cases and all(c.groups["legal_area"] == "penal law" for c in cases)
    assert info["split"] == "all"  # a local held-out file is used whole
    with pytest.raises(DataError, match="no SJP rows"):
        load_cases(get_task("sjp"), "loglik", "bundled:sjp_fr_heldout", DataArgs(), split="test")


def test_fingerprint_changes_with_prompt_settings():
    task = get_task("sjp")
    a, _ = load_cases(task, "loglik", "bundled:sjp_fr_heldout", DataArgs(), limit=5)
    b, _ = load_cases(task, "loglik", "bundled:sjp_fr_heldout", DataArgs(), limit=5)
    c, _ = load_cases(task, "loglik", "bundled:sjp_fr_heldout", DataArgs(system_prompt=None), limit=5)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_missing_data_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_cases(get_task("sjp"), "loglik", str(tmp_path / "missing.parquet"), DataArgs())


def test_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("LEXFINE_CACHE", str(tmp_path))
    key = cache.make_key({"model": "m", "task": "sjp"})
    assert key == cache.make_key({"task": "sjp", "model": "m"})  # order-independent
    assert cache.lookup(key) is None
    cache.store(key, {"accuracy": 0.5}, [{"id": "1"}], {"model": "m"})
    assert cache.lookup(key) == ({"accuracy": 0.5}, [{"id": "1"}])
    assert (tmp_path / "eval" / key / "key.json").is_file()


@pytest.mark.parametrize("spec", ["/nonexistent/model", "not a model"])
def test_bad_target(spec):
    with pytest.raises(ModelError):
        resolve_target(spec)


def test_run_without_weights_is_a_one_line_error(tmp_path):
    from lexfine.config import RunConfig
    from lexfine.rundir import RunDir

    rd = RunDir(tmp_path / "r")
    rd.create(RunConfig().to_yaml(), "r")
    with pytest.raises(ModelError, match="no adapter/ or model/"):
        resolve_target(str(rd.path))
