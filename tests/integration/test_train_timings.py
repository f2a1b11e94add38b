"""manifest.json `timings` of a real `python -m lexfine.train` process, and the tokenized cache across runs."""

import json
import os
import subprocess
import sys
import time

import yaml

from lexfine import models
from lexfine.config import validate
from lexfine.rundir import RunDir
from lexfine.train.sft import load_dataset


def test_manifest_times_the_run_from_process_start(tiny_config, tmp_path):
    tree = tiny_config()
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "lexfine.train", str(path)], capture_output=True, text=True,
                         env=os.environ.copy(), timeout=600)
    wall = time.time() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    m = RunDir(out.stdout.strip().splitlines()[-1]).manifest()
    t = m["timings"]
    assert list(t) == ["data_prep_s", "model_load_s", "train_begin_s", "first_step_s", "compile_s", "compile_cache",
                       "warmup_steps", "steady_tokens_per_s", "recompiles"]
    assert 0 < t["data_prep_s"] < wall and 0 < t["model_load_s"] < wall
    # process start (interpreter and imports included) to the end of step 1: everything before it, within the
    # process's own lifetime
    assert t["data_prep_s"] + t["model_load_s"] < t["train_begin_s"] < t["first_step_s"] < wall
    assert t["warmup_steps"] == 1  # 4 steps: only step 1 is left out
    assert t["steady_tokens_per_s"] > 0 and t["recompiles"] == 0  # nothing compiled on a CPU by default
    assert 0 <= t["compile_s"] < t["first_step_s"]  # the xIELU kernel compiles with aot_eager on a CPU
    assert t["compile_cache"]["fxgraph_hits"] == t["compile_cache"]["fxgraph_misses"] == 0  # no inductor
    rows = [json.loads(r) for r in (RunDir(out.stdout.strip().splitlines()[-1]).metrics_path.read_text().splitlines())]
    elapsed = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    tokens = rows[-1]["num_tokens"] - rows[0]["num_tokens"]
    assert abs(t["steady_tokens_per_s"] - tokens / elapsed) / (tokens / elapsed) < 0.2  # steps 2-4 from metrics
    assert m["data"]["cache_hit"] is False and m["data"]["prep_s"] <= t["data_prep_s"]

    # the next run of a sweep (another learning rate, same data) prepares nothing: the recipe's data step hits the
    # cache the first process wrote
    cfg = validate(tiny_config(train__lr=5e-4))
    assert cfg.run_id() != m["run_id"]
    _, stats = load_dataset(cfg, models.load_tokenizer(models.resolve(cfg.model), cfg.model_args))
    assert stats.cache_hit and stats.as_dict()["examples"] == m["data"]["examples"]
