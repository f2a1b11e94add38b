"""What a run saves is what it trained: reloading the adapter (or the full weights) from the run directory gives
the same evaluation scores as the in-memory model right after training."""

import json

import pytest

from lexfine.config import validate
from lexfine.eval import evaluate
from lexfine.train import run


@pytest.mark.parametrize("method,lr", [("lora", 1e-3), ("full", 1e-4)])
def test_reloaded_model_scores_like_the_trained_one(tiny_config, tmp_path, method, lr):
    cfg = validate(tiny_config(method=method, train__lr=lr, eval=["sjp"],
                               eval_options={"limit": 8, "max_length": 256, "batch_size": 4}))
    rd = run(cfg)
    in_memory = json.loads((rd.eval_dir("sjp", "loglik") / "summary.json").read_text())
    preds_mem = [json.loads(x) for x in (rd.eval_dir("sjp", "loglik") / "predictions.jsonl").read_text().splitlines()]

    out = tmp_path / "reloaded"
    reloaded = evaluate(rd.path, "sjp", limit=8, max_length=256, batch_size=4, out=out, use_cache=False)
    preds_re = [json.loads(x) for x in (out / "eval" / "sjp-loglik" / "predictions.jsonl").read_text().splitlines()]

    assert reloaded["n"] == in_memory["n"] == 8
    assert [p["id"] for p in preds_re] == [p["id"] for p in preds_mem]
    assert [p["prediction"] for p in preds_re] == [p["prediction"] for p in preds_mem]
    for a, b in zip(preds_re, preds_mem):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-3)
    # and training moved the model: the base model's scores differ
    base = rd.manifest()["base_evals"]["sjp-loglik"]
    assert base is not None


def test_eval_of_a_run_directory_records_the_base_model(tiny_config, capsys):
    """Sweeps evaluate in separate jobs: `lexfine eval RUN` must record base_evals like training does, or the
    report cannot measure knowledge retention."""
    from lexfine.cli import main

    rd = run(validate(tiny_config()))
    assert "base_evals" not in rd.manifest()
    try:
        main(["eval", str(rd.path), "--task", "sjp", "--limit", "4", "--max-length", "256", "-q"])
    except SystemExit as e:
        assert e.code in (0, None)
    m = rd.manifest()
    assert m["evals"]["sjp-loglik"]["accuracy"] is not None
    assert m["base_evals"]["sjp-loglik"]["n"] == 4
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("eval/sjp-loglik/summary.json")
