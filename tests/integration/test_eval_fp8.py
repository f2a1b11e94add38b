"""`lexfine eval --fp8`: where it refuses to run (one line); the real torchao conversion on a CPU (torchao's hardware
check bypassed: the FP8 GEMM speed needs a GPU of compute capability >= 8.9, tests/gpu), with padded batches; and,
with the conversion replaced by a recorder, which layers it converts, that a LoRA run is merged first, and that its
results never mix with bf16 ones: own folder, manifest keys and score-cache entries."""

import pytest

from lexfine.eval import fp8
from tests.integration.test_eval_cli import (  # noqa: F401 (fixtures: app, _private_cache)
    _fake_lora_run, _predictions, _private_cache, _summary, app, run_cli)

COMMON = ["--task", "sjp", "--data", "bundled:sjp_fr_heldout", "--limit", 5, "-q"]


def test_refused_where_it_cannot_run(app, monkeypatch):  # noqa: F811
    res = run_cli(app, "smollm2-135m", "--task", "sjp", "--mode", "generate", "--fp8", "--limit", 2)
    assert res.exit_code == 2 and "--fp8 applies to loglik scoring" in res.output
    # this machine: no torchao, or no CUDA GPU
    res = run_cli(app, "smollm2-135m", *COMMON, "--fp8")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "--fp8 needs" in res.output and "drop --fp8" in res.output
    assert len([x for x in res.output.splitlines() if x.startswith("error:")]) == 1
    monkeypatch.setattr(fp8.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(fp8.ConfigError, match="pip install torchao"):
        fp8.check("loglik", "cuda:0")


def test_lora_run_is_merged_and_kept_apart(app, tmp_path, monkeypatch):  # noqa: F811
    converted = []

    def record(layer):  # what would be converted, without converting it (no FP8 GEMM on a CPU)
        names = [name for name, m in layer.named_modules() if fp8.eligible(m, name)]
        converted.append((type(layer).__name__, names))
        return len(names)

    monkeypatch.setattr(fp8, "check", lambda mode, device: None)
    monkeypatch.setattr(fp8, "to_fp8", record)
    monkeypatch.setattr(fp8, "info", lambda n: {"linear_layers": n, "recipe": fp8.RECIPE, "torchao": "test"})
    _, rd, _, _ = _fake_lora_run(tmp_path)

    s8 = _summary(run_cli(app, rd.path, *COMMON, "--fp8"))
    # every decoder layer, its attention and MLP projections, no LoRA parts left (merged), not the LM head
    assert [t for t, _ in converted] == ["ApertusDecoderLayer"] * 4  # the run's 2 layers, then its base's
    assert all(sorted(names) == ["mlp.down_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                                 "self_attn.q_proj", "self_attn.v_proj"] for _, names in converted)
    assert s8["settings"]["fp8"]["linear_layers"] == 12
    m = rd.manifest()
    assert m["evals"]["sjp-loglik-fp8"]["summary"] == "eval/sjp-loglik-fp8/summary.json"
    assert "sjp-loglik" not in m["evals"]
    assert set(m["base_evals"]) == {"sjp-loglik-fp8"}  # the base was scored the same way, and recorded so

    s16 = _summary(run_cli(app, rd.path, *COMMON))  # bf16 afterwards: not served from the FP8 cache entries
    assert s16["settings"]["fp8"] is None and not s16["cached"]
    m = rd.manifest()
    assert set(m["evals"]) == {"sjp-loglik", "sjp-loglik-fp8"} and set(m["base_evals"]) == {"sjp-loglik",
                                                                                             "sjp-loglik-fp8"}
    assert m["base_evals"]["sjp-loglik"]["cached"] is False and m["base_evals"]["sjp-loglik-fp8"]["cached"] is False
    # with the conversion recorded but not done, the merged model scores what the unmerged adapter scores
    merged = _predictions(rd.path / "eval" / "sjp-loglik-fp8" / "summary.json")
    plain = _predictions(rd.path / "eval" / "sjp-loglik" / "summary.json")
    assert [r["id"] for r in merged] == [r["id"] for r in plain]
    for a, b in zip(merged, plain):
        assert list(a["scores"].values()) == pytest.approx(list(b["scores"].values()), abs=1e-3)
    # a second FP8 evaluation finds the base model's FP8 scores in the cache (a run's own scores are not cached)
    again = _summary(run_cli(app, rd.path, *COMMON, "--fp8"))
    assert again["settings"]["fp8"]["linear_layers"] == 12
    assert rd.manifest()["base_evals"]["sjp-loglik-fp8"]["cached"] is True


def test_a_model_passed_in_is_refused(tmp_path):
    from lexfine.errors import ConfigError
    from lexfine.eval.runner import evaluate

    with pytest.raises(ConfigError, match="lexfine eval loads itself"):
        evaluate("smollm2-135m", "sjp", data="bundled:sjp_fr_heldout", limit=2, model=object(), fp8=True,
                 write=False)


def test_real_conversion_keeps_padded_scores_finite_and_close(tmp_path, monkeypatch):
    """torchao's FP8 tensors on a CPU (its hardware check bypassed), batches of cases of different lengths: a padding
    position's all-zero row once got the scale 0 and NaN spread through attention to the real tokens."""
    import json
    from pathlib import Path

    pytest.importorskip("torchao")
    import torchao.quantization.quant_api as quant_api

    from lexfine.config import ModelArgs
    from lexfine.eval.runner import evaluate
    from lexfine.eval.target import resolve_target
    from tests.conftest import tiny_arch

    if not hasattr(quant_api, "_check_hardware_support"):
        pytest.skip("this torchao has no hardware check to bypass")
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    monkeypatch.setattr(fp8, "check", lambda mode, device: None)
    arch = {**tiny_arch(), "hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
    tgt = resolve_target("random:apertus-8b", model_args=ModelArgs(arch_overrides=arch, dtype="bfloat16"))
    common = dict(data="bundled:sjp_fr_heldout", limit=24, use_cache=False, progress=False, batch_size=8)
    ref = evaluate(tgt, "sjp", out=tmp_path / "bf16", **common)
    low = evaluate(tgt, "sjp", out=tmp_path / "fp8", fp8=True, **common)
    assert low["settings"]["fp8"]["linear_layers"] == 12
    rows = [[json.loads(x) for x in (Path(s["summary_path"]).parent / "predictions.jsonl").read_text().splitlines()]
            for s in (ref, low)]
    a = [v for r in rows[0] for v in r["scores"].values()]
    b = [v for r in rows[1] for v in r["scores"].values()]
    assert len(a) == len(b) == 48 and None not in b  # null is how a non-finite score is stored
    assert len({r["prompt_tokens"] for r in rows[0]}) > 8  # lengths differ: batches were padded
    mean_abs = sum(map(abs, a)) / len(a)
    assert sum(abs(x - y) for x, y in zip(a, b)) / len(a) < 0.01 * mean_abs
    assert a != b  # converted for real: FP8 moves the scores a little
