"""Evaluation on GPUs: bf16 scoring equals the naive computation; data-parallel evaluation scores every case once.

Run on a GPU machine: `python -m pytest tests/gpu/test_eval_gpu.py` (LEXFINE_TEST_TOKENIZER=<dir> when the
embedded model is not installed there)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import tiny_arch

TOKENIZER = os.environ.get("LEXFINE_TEST_TOKENIZER")
TINY = tiny_arch()


def _tiny_args(dtype="bfloat16"):
    from lexfine.config import ModelArgs

    return ModelArgs(arch_overrides=TINY, dtype=dtype, tokenizer=TOKENIZER)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["packed", "cached"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bf16_cuda_scores_match_naive_fp32(strategy, compiled):
    from contextlib import nullcontext

    from lexfine import models
    from lexfine.eval.loglik import Case, compiled_layers, score_cases

    bf16 = models.load_model("random:apertus-8b", _tiny_args()).cuda().eval()
    fp32 = models.load_model("random:apertus-8b", _tiny_args("float32")).cuda().eval()
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(5, 40000, (n,), generator=g).tolist()  # noqa: E731
    cands = [rand(3), rand(5)]
    cases = [Case(rand(n), cands) for n in (40, 300, 7, 129)]
    with compiled_layers(bf16) if compiled else nullcontext():  # inductor
        got = score_cases(bf16, cases, batch_size=4, progress=False, strategy=strategy, min_rows=2 if compiled else 1)
    with torch.no_grad():
        for case, row in zip(cases, got):
            for cand, score in zip(case.candidates, row):
                ids = torch.tensor([case.prompt + cand], device="cuda")
                logp = torch.log_softmax(fp32(ids).logits[0].float(), -1)
                ref = sum(float(logp[len(case.prompt) - 1 + j, t]) for j, t in enumerate(cand))
                assert score == pytest.approx(ref, rel=3e-2, abs=0.3)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["packed", "cached"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_queueing_a_batch_never_makes_the_host_wait_for_the_gpu(strategy, compiled):
    """Building and queueing a batch (copies in, the passes, the scores gathered and copied out) must not synchronise
    with the GPU, or the GPU idles while the host builds the next batch: CUDA's sync debug mode raises on any
    synchronising call (a pageable copy, .item(), float() of a device tensor, ...) made meanwhile. Not `expanded`
    (the fallback for flash-attention models): its 2D padding mask goes through transformers' mask code, which asks
    the GPU whether the mask is all ones (masking_utils, H200, sixth session)."""
    from contextlib import nullcontext

    import lexfine.eval.loglik as ll
    from lexfine import models

    model = models.load_model("random:apertus-8b", _tiny_args()).cuda().eval()
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(5, 40000, (n,), generator=g).tolist()  # noqa: E731
    cands = [rand(3), rand(5)]
    batches = [[ll.Case(rand(n), cands) for n in pair] for pair in ((77, 50), (31, 12))]
    fn = {"packed": ll._score_batch, "cached": ll._score_batch_cached, "expanded": ll._score_expanded}[strategy]
    cuda = torch.device("cuda")
    with ll.compiled_layers(model) if compiled else nullcontext(), torch.inference_mode():
        want = [fn(model, b, 0, cuda).tolist() for b in batches]  # first run: compiles (which may synchronise)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fetches = [ll._Fetch(fn(model, b, 0, cuda), [0, 1], [2, 2]) for b in batches]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        got = [x for f in fetches for row in f.rows() for x in row]
    assert got == pytest.approx([x for w in want for x in w], abs=1e-3)


@pytest.mark.multigpu
def test_data_parallel_eval_scores_each_case_exactly_once(tmp_path):
    from lexfine import models

    tok = models.load_tokenizer("random:apertus-8b", _tiny_args())
    model = models.load_model("random:apertus-8b", _tiny_args("float32"), tokenizer=tok)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    env = {**os.environ, "LEXFINE_CACHE": str(tmp_path / "cache")}
    common = [str(tmp_path / "model"), "--task", "lexam_mcq4", "--limit", "37", "--batch-size", "4", "-q",
              "--no-cache", "--max-length", "512"]
    single = subprocess.run([sys.executable, "-m", "lexfine.eval", *common, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    dp = subprocess.run(["torchrun", "--nproc_per_node", "2", "-m", "lexfine.eval", *common,
                         "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert dp.returncode == 0, dp.stderr[-3000:]
    rows = {}
    for name in ("one", "two"):
        path = tmp_path / name / "eval" / "lexam_mcq4-loglik" / "predictions.jsonl"
        rows[name] = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows["two"]) == 37 and len({r["id"] for r in rows["two"]}) == 37
    assert [r["id"] for r in rows["one"]] == [r["id"] for r in rows["two"]]
    for a, b in zip(rows["one"], rows["two"]):
        for k in a["scores"]:
            assert a["scores"][k] == pytest.approx(b["scores"][k], abs=0.05)  # bf16, other batch neighbours
    summary = json.loads((tmp_path / "two" / "eval" / "lexam_mcq4-loglik" / "summary.json").read_text())
    assert summary["settings"]["world_size"] == 2 and summary["n"] == 37
