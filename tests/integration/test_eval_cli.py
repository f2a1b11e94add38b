"""`lexfine eval` through the real command line: embedded SmolLM2 on bundled SJP and LEXam rows, a LoRA run
directory (tiny random Apertus + adapter), and one-line user errors."""

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lexfine.eval.cli import register
from tests.conftest import tiny_arch

TINY = tiny_arch()


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()

    @app.callback()
    def main():  # a group, so that `eval` is a sub-command as in lexfine's own app
        pass

    register(app)
    return app


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # base-model scores are cached under $LEXFINE_CACHE/eval; keep the embedded model where it already is
    from lexfine import models

    models_dir = models.cache_dir() / "models"
    monkeypatch.setenv("LEXFINE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    if models_dir.is_dir():
        (tmp_path / "cache" / "models").symlink_to(models_dir)


def run_cli(app, *args):
    result = CliRunner().invoke(app, ["eval", *map(str, args)])
    return result


def _summary(result) -> dict:
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.name == "summary.json" and path.is_file()
    return json.loads(path.read_text())


def _predictions(summary_path: Path) -> list[dict]:
    return [json.loads(x) for x in (summary_path.parent / "predictions.jsonl").read_text().splitlines()]


def test_sjp_split_task_writes_its_own_folder(app, tmp_path):
    """sjp@validation (the bundled held-out cases are 2015-2016) goes to eval/sjp-validation-loglik, next to a plain
    sjp evaluation; a split that contradicts --split is a one-line error."""
    res = run_cli(app, "smollm2-135m", "--task", "sjp@validation", "--data", "bundled:sjp_fr_heldout",
                  "--out", tmp_path / "out", "--limit", 2, "--max-length", 128, "-q")
    s = _summary(res)
    assert Path(res.stdout.strip().splitlines()[-1]) == tmp_path / "out" / "eval" / "sjp-validation-loglik" / "summary.json"
    assert s["settings"]["split"] == "validation" and s["n"] == 2
    bad = run_cli(app, "smollm2-135m", "--task", "sjp@validation", "--split", "test", "--out", tmp_path / "o2")
    assert bad.exit_code == 2 and "names split 'validation' but --split is 'test'" in bad.output
    assert "Traceback" not in bad.output


def test_sjp_loglik_embedded(app, tmp_path):
    res = run_cli(app, "smollm2-135m", "--task", "sjp", "--data", "bundled:sjp_fr_heldout", "--mode", "loglik",
                  "--out", tmp_path / "out", "--limit", 20, "--max-length", 384, "-q")
    s = _summary(res)
    path = tmp_path / "out" / "eval" / "sjp-loglik" / "summary.json"
    assert Path(res.stdout.strip().splitlines()[-1]) == path
    for key in ("task", "mode", "n", "accuracy", "macro_f1", "majority_baseline", "parse_failures", "by_language",
                "balanced_accuracy", "per_class", "confusion_matrix", "accuracy_ci95", "macro_f1_ci95",
                "by_legal_area", "by_year", "chance_level"):
        assert key in s, key
    assert s["n"] == 20 and s["parse_failures"] == 0 and s["mode"] == "loglik"
    assert s["by_language"]["fr"]["n"] == 20 and {"n", "accuracy", "macro_f1"} <= set(s["by_language"]["fr"])
    assert s["truncated"] > 0 and s["prompt_tokens_max"] <= 384
    preds = _predictions(path)
    assert len(preds) == s["n"]
    for p in preds:
        assert {"id", "gold", "prediction", "correct", "scores", "language", "legal_area", "year"} <= set(p)
        assert p["prediction"] == max(p["scores"], key=p["scores"].get)
        # the length-normalised variant: each summed score divided by its answer's SmolLM2 token count
        for lab, n in {"dismissal": 5, "approval": 3}.items():
            assert p["scores_length_normalized"][lab] == pytest.approx(p["scores"][lab] / n, abs=2e-5)
        norm = p["scores_length_normalized"]
        assert p["prediction_length_normalized"] == max(norm, key=norm.get)
    assert s["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / 20)
    assert s["headline_scoring"] == "sum" and s["candidate_tokens"] == {"dismissal": 5, "approval": 3}
    ln = s["length_normalized"]
    assert ln["accuracy"] == pytest.approx(sum(p["prediction_length_normalized"] == p["gold"] for p in preds) / 20)
    assert ln["identical_to_sum"] is False and {"macro_f1", "accuracy_ci95", "macro_f1_ci95"} <= set(ln)
    # the second evaluation of the same model comes from the base-score cache, with the same numbers
    again = _summary(run_cli(app, "smollm2-135m", "--task", "sjp", "--data", "bundled:sjp_fr_heldout",
                             "--out", tmp_path / "out2", "--limit", 20, "--max-length", 384, "-q"))
    assert again["cached"] and again["accuracy"] == s["accuracy"]
    assert again["length_normalized"] == s["length_normalized"]


def test_compiled_scoring_gives_the_eager_scores(app, tmp_path):
    common = ["--task", "sjp", "--data", "bundled:sjp_fr_heldout", "--limit", 6, "--max-length", 256, "-q", "--no-cache"]
    eager = _summary(run_cli(app, "smollm2-135m", *common, "--out", tmp_path / "eager"))
    compiled = _summary(run_cli(app, "smollm2-135m", *common, "--compile", "--out", tmp_path / "compiled"))
    assert compiled["compiled_layers"] is True and eager["compiled_layers"] is False
    a, b = (_predictions(tmp_path / d / "eval" / "sjp-loglik" / "summary.json") for d in ("eager", "compiled"))
    assert [p["id"] for p in a] == [p["id"] for p in b]
    for x, y in zip(a, b):
        assert x["prediction"] == y["prediction"]
        assert list(x["scores"].values()) == pytest.approx(list(y["scores"].values()), abs=2e-3)
    assert "applies to loglik" in run_cli(app, "smollm2-135m", "--task", "sjp", "--mode", "generate", "--compile",
                                          "--limit", 2).output
    # where the time went, from process start (the pytest process here), in each summary
    for s in (eager, compiled):
        t = s["timing"]
        assert t["model_load_s"] > 0 and t["prompts_s"] >= 0 and 0 < t["first_batch_s"] <= t["seconds"]
        assert t["since_process_start_s"] >= t["model_load_s"] + t["prompts_s"] + t["seconds"] + t["data_s"]
        assert 0 < t["called_s"] < t["since_process_start_s"] - t["seconds"]
        assert "fp8_convert_s" not in t and set(t["compile_cache"]) >= {"fxgraph_hits", "fxgraph_misses"}
    assert compiled["timing"]["compile_s"] > 0


def test_timing_line_says_where_the_time_went():
    from lexfine.eval.cli import timing_line

    t = {"seconds": 372.8, "prompt_tokens_per_s": 51554.5, "prompts_s": 6.04, "first_batch_s": 17.16,
         "model_load_s": 5.1, "fp8_convert_s": 2.0, "since_process_start_s": 410.64, "compile_s": 12.3,
         "called_s": 9.3, "data_s": 1.2}
    assert timing_line(t) == ("time: 410.6 s from process start: start-up 9.3 s, data 1.2 s, model 5.1 s, "
                              "FP8 conversion 2.0 s, prompts 6.0 s, scoring 372.8 s (first batch 17.2 s, compiling "
                              "12.3 s), 51.6k prompt tokens/s")
    assert timing_line({**t, "model_load_s": None, "compile_s": 0, "first_batch_s": None, "called_s": None}) == (
        "time: 410.6 s from process start: data 1.2 s, FP8 conversion 2.0 s, prompts 6.0 s, scoring 372.8 s, "
        "51.6k prompt tokens/s")
    assert timing_line({"seconds": 1.0, "examples_per_s": 2.0}) == ""  # a summary cached before these fields


def test_failed_compilation_falls_back_to_eager_scores(app, tmp_path, monkeypatch, caplog):
    from contextlib import contextmanager

    from lexfine.eval import loglik

    @contextmanager
    def broken(model, backend=None):
        raise RuntimeError("inductor cannot lower this")
        yield 0

    monkeypatch.setattr(loglik, "compiled_layers", broken)
    common = ["--task", "sjp", "--data", "bundled:sjp_fr_heldout", "--limit", 3, "--max-length", 256, "-q", "--no-cache"]
    with caplog.at_level("WARNING", logger="lexfine.eval"):
        s = _summary(run_cli(app, "smollm2-135m", *common, "--compile", "--out", tmp_path))
    assert s["compiled_layers"] is False and s["n"] == 3
    assert "compiled scoring failed (RuntimeError: inductor cannot lower this); scoring eagerly" in caplog.text
    rows = _predictions(tmp_path / "eval" / "sjp-loglik" / "summary.json")
    assert len(rows) == 3 and all(r["prediction"] in ("approval", "dismissal") for r in rows)


def test_lexam_loglik_and_generate_embedded(app, tmp_path):
    s = _summary(run_cli(app, "smollm2-135m", "--task", "lexam_mcq4", "--out", tmp_path, "--limit", 20,
                         "--max-length", 768, "-q"))
    assert s["n"] == 20 and s["parse_failures"] == 0 and s["scoring"] == "first_token"
    assert s["chance_level"] == 0.25 and set(s["by_language"]) <= {"de", "en"} and "by_area" in s
    assert len(_predictions(tmp_path / "eval" / "lexam_mcq4-loglik" / "summary.json")) == 20
    g = _summary(run_cli(app, "smollm2-135m", "--task", "lexam_mcq4", "--mode", "generate", "--out", tmp_path,
                         "--limit", 3, "--max-new-tokens", 8, "--max-length", 768, "-q"))
    assert g["n"] == 3 and g["parse_failures"] + round(g["accuracy_parsed"] is not None) >= 0
    assert g["parse_failure_rate"] == g["parse_failures"] / 3
    rows = _predictions(tmp_path / "eval" / "lexam_mcq4-generate" / "summary.json")
    assert all("output" in r and r["parsed"] == (r["prediction"] is not None) for r in rows)


def _fake_lora_run(tmp_path):
    """A run directory as training leaves it: config.yaml, manifest.json, adapter/ (+ tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lexfine import models
    from lexfine.config import build_config
    from lexfine.rundir import RunDir

    cfg = build_config({"name": "t", "model": "random:apertus-8b",
                        "model_args": {"arch_overrides": TINY, "dtype": "float32"},
                        "train": {"max_length": 256}, "eval": ["sjp", "lexam_mcq4"],
                        "eval_options": {"limit": 4, "batch_size": 4}, "output_dir": str(tmp_path / "runs")})
    rd = RunDir(cfg.run_dir())
    rd.create(cfg.to_yaml(), cfg.run_id())
    rd.set_status("completed")
    tok = models.load_tokenizer(cfg.model, cfg.model_args)
    base = models.load_model(cfg.model, cfg.model_args, tokenizer=tok)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False))  # non-zero B: the adapter changes scores
    model.save_pretrained(rd.adapter_dir)
    tok.save_pretrained(rd.adapter_dir)
    return cfg, rd, model, tok


def test_run_directory_and_configured_evals(app, tmp_path):
    from lexfine.eval import run_configured_evals

    cfg, rd, model, tok = _fake_lora_run(tmp_path)
    s = _summary(run_cli(app, rd.path, "--task", "sjp", "--data", "bundled:sjp_fr_heldout", "--limit", 5, "-q"))
    assert s["weights"] == "adapter" and s["n"] == 5 and s["settings"]["max_length"] == 256
    assert rd.manifest()["evals"]["sjp-loglik"]["summary"] == "eval/sjp-loglik/summary.json"

    out = run_configured_evals(rd, cfg, model=model, tokenizer=tok)
    assert set(out["evals"]) == set(out["base_evals"]) == {"sjp-loglik", "lexam_mcq4-loglik"}
    m = rd.manifest()
    assert set(m["base_evals"]) == {"sjp-loglik", "lexam_mcq4-loglik"}
    assert m["evals"]["lexam_mcq4-loglik"]["n"] == 4
    trained = _predictions(rd.eval_dir("sjp", "loglik") / "summary.json")
    assert len(trained) == 4
    # the in-memory model scores what the adapter loaded from disk scores
    disk = _summary(run_cli(app, rd.path, "--task", "sjp", "--data", "bundled:sjp_fr_heldout", "--limit", 4, "-q"))
    assert disk["accuracy"] == m["evals"]["sjp-loglik"]["accuracy"]
    # base scores: computed with the adapter switched off, then cached for the next run of the sweep
    assert not out["base_evals"]["sjp-loglik"]["cached"]
    again = run_configured_evals(rd, cfg, model=model, tokenizer=tok)
    assert again["base_evals"]["sjp-loglik"]["cached"]
    assert again["base_evals"] == {k: {**v, "cached": True} for k, v in out["base_evals"].items()}


def test_adapter_on_a_different_base_is_a_one_line_error(app, tmp_path):
    _, rd, _, _ = _fake_lora_run(tmp_path)
    res = run_cli(app, rd.path, "--task", "sjp", "--base", "smollm2-135m", "--limit", 2)
    assert res.exit_code == 2
    assert "does not fit base model" in res.output or "trained on" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("args,match", [
    (["smollm2-135m", "--task", "sjp", "--data", "/nonexistent/sjp.parquet"], "data file not found"),
    (["smollm2-135m", "--task", "mmlu"], "unknown task 'mmlu'"),
    (["/nonexistent/model", "--task", "sjp"], "unknown model"),
    (["smollm2-135m", "--task", "sjp", "--mode", "beam"], "unknown eval mode"),
])
def test_user_errors_exit_2_with_one_line(app, args, match):
    res = run_cli(app, *args)
    assert res.exit_code == 2, res.output
    assert match in res.output and "Traceback" not in res.output
    assert len([x for x in res.output.splitlines() if x.startswith("error:")]) == 1


def test_registered_on_lexfine_app():
    from lexfine.cli import app as lexfine_app

    res = CliRunner().invoke(lexfine_app, ["eval", "--help"])
    assert res.exit_code == 0 and "--task" in res.output


def test_data_parallel_on_cpu_scores_each_case_once(tmp_path):
    """torchrun with 2 CPU processes (gloo): the same predictions as one process, each case exactly once."""
    import os
    import shutil
    import subprocess
    import sys

    from lexfine import models
    from lexfine.config import ModelArgs

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    args = ModelArgs(arch_overrides=TINY, dtype="float32")
    tok = models.load_tokenizer("random:apertus-8b", args)
    models.load_model("random:apertus-8b", args, tokenizer=tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    common = [str(tmp_path / "model"), "--task", "sjp", "--limit", "11", "--batch-size", "2", "-q", "--no-cache",
              "--max-length", "256"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("one", [sys.executable, "-m"]), ("two", ["torchrun", "--nproc_per_node", "2", "-m"])):
        res = subprocess.run([*launcher, "lexfine.eval", *common, "--out", str(tmp_path / name)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.strip().splitlines()[-1].endswith("summary.json")  # printed once, by rank 0
        assert len(res.stdout.strip().splitlines()) == 1
    one, two = (_predictions(tmp_path / n / "eval" / "sjp-loglik" / "summary.json") for n in ("one", "two"))
    assert [r["id"] for r in one] == [r["id"] for r in two] and len({r["id"] for r in two}) == 11
    for a, b in zip(one, two):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    summary = json.loads((tmp_path / "two" / "eval" / "sjp-loglik" / "summary.json").read_text())
    assert summary["settings"]["world_size"] == 2


def test_data_parallel_eval_of_a_run_records_the_base_model(tiny_config, tmp_path):
    """torchrun, 2 CPU processes, a run directory: the run AND its base model are scored data-parallel (every
    rank takes part in both; rank 0 alone would wait forever in the base model's gather), then all ranks exit."""
    import os
    import shutil
    import subprocess

    from lexfine.config import validate
    from lexfine.train import run

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    rd = run(validate(tiny_config(train__max_steps=1, data__limit=4)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["torchrun", "--nproc_per_node", "2", "-m", "lexfine.eval", str(rd.path), "--task", "sjp",
                          "--limit", "6", "--batch-size", "2", "-q", "--max-length", "256"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = rd.manifest()
    summary = json.loads((rd.path / "eval" / "sjp-loglik" / "summary.json").read_text())
    assert summary["n"] == 6 and summary["settings"]["world_size"] == 2
    assert "sjp-loglik" in manifest["evals"] and manifest["base_evals"]["sjp-loglik"]["accuracy"] is not None


def test_a_model_target_takes_another_tokenizer(app, tmp_path):
    """--tokenizer: a random architecture scored with a tokenizer of the user's choosing (e.g. the real model's);
    refused for runs, which carry their own."""
    from lexfine import models
    from lexfine.config import ModelArgs

    config = json.loads(models.architecture_config(models.resolve("random:apertus-8b"),
                                                   ModelArgs(arch_overrides=TINY)).to_json_string())
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    tok_dir = tmp_path / "tok"
    models.load_tokenizer("random:apertus-8b", ModelArgs()).save_pretrained(tok_dir)
    spec = f"random:{tmp_path / 'tiny.json'}"
    common = ["--limit", 2, "--batch-size", 2, "--max-length", 256, "-q", "--out", tmp_path / "out"]
    summary = _summary(run_cli(app, spec, "--tokenizer", tok_dir, *common))
    assert summary["n"] == 2
    missing = run_cli(app, spec, "--tokenizer", tmp_path / "nothing-here", *common)
    assert missing.exit_code == 2 and "nothing-here" in missing.output
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: r\n")
    (run_dir / "manifest.json").write_text("{}")
    refused = run_cli(app, run_dir, "--tokenizer", tok_dir, *common)
    assert refused.exit_code == 2 and "--tokenizer is for model targets" in refused.output


def test_eval_output_carries_no_import_time_notes_of_optional_packages(tmp_path):
    """`lexfine eval` in a fresh process: with torchao installed, transformers imports it, and torchao's notes (C
    extensions built for another torch, no Triton) and torch's deprecation notes about its types must not reach the
    output, nor PEFT's deprecation warning when it loads an adapter; the result line must."""
    import subprocess
    import sys

    pytest.importorskip("torchao")
    res = subprocess.run([sys.executable, "-m", "lexfine.cli", "eval", "smollm2-135m", "--task", "sjp", "--data",
                          "bundled:sjp_fr_heldout", "--limit", "2", "-q", "--no-cache", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    noise = [line for line in res.stderr.splitlines()
             if "torchao" in line or "_pytree" in line or "is_gradient_checkpointing" in line]
    assert not noise, res.stderr
    assert "sjp-loglik: n=2" in res.stderr
