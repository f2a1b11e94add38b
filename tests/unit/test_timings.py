"""TimingsCallback on a simulated step sequence: warm-up, steady rate, recompiles after warm-up, process start."""

import os
import subprocess
import sys
from types import SimpleNamespace

from lexfine.train import timings


def test_steady_rate_and_recompiles_leave_out_the_warmup(monkeypatch):
    clock = {"t": 0.0, "compiled": 0}
    monkeypatch.setattr(timings.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(timings, "dynamo_compilations", lambda: clock["compiled"])
    written = []
    cb = timings.TimingsCallback(written.append, {"data_prep_s": 1.0, "model_load_s": 2.0}, started=0.0)
    state = SimpleNamespace(max_steps=40, global_step=0)
    cb.on_train_begin(None, state, None)
    assert cb.warmup == 4  # 40 steps: the first 4 are warm-up
    tokens = 0
    for step in range(1, 41):
        clock["t"] += 30.0 if step <= 2 else 1.0  # slow start: compiling
        clock["compiled"] += 3 if step <= 2 else (1 if step == 20 else 0)  # one recompile after warm-up
        tokens += 100 if step <= 4 else 1000
        state.global_step = step
        cb.on_step_end(None, state, None)
        cb.on_log(None, state, None, logs={"loss": 1.0, "num_tokens": tokens})
    cb.on_train_end(None, state, None)
    final = written[-1]
    assert final["recompiles"] == 1 and final["warmup_steps"] == 4
    assert final["steady_tokens_per_s"] == 1000.0  # steps 5-40: 36 x 1000 tokens in 36 s
    assert final["data_prep_s"] == 1.0 and final["first_step_s"] > 0
    assert written[0].keys() == {"data_prep_s", "model_load_s", "train_begin_s", "first_step_s",  # at step 1's end
                                 "compile_s", "compile_cache"}
    assert final["compile_s"] >= written[0]["compile_s"] >= 0
    assert 0 <= written[0]["train_begin_s"] <= written[0]["first_step_s"]


def test_evaluation_during_training_is_left_out_of_the_steady_rate(monkeypatch):
    """An H200 run with eval_during (44 s per evaluation every 20 steps) recorded 2.2k steady tokens/s beside 10.2k
    without it: the evaluations' time was counted as training time."""
    clock = {"t": 0.0}
    monkeypatch.setattr(timings.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(timings, "dynamo_compilations", lambda: 0)
    written = []
    cb = timings.TimingsCallback(written.append, started=0.0)
    state = SimpleNamespace(max_steps=40, global_step=0)
    cb.on_train_begin(None, state, None)
    for step in range(1, 41):
        clock["t"] += 1.0
        state.global_step = step
        cb.on_step_end(None, state, None)
        if step % 10 == 0:  # an evaluation after the step, before the row is logged
            clock["t"] += 50.0
            cb.exclude_time(50.0)
        cb.on_log(None, state, None, logs={"loss": 1.0, "num_tokens": 1000 * step})
    cb.on_train_end(None, state, None)
    assert written[-1]["steady_tokens_per_s"] == 1000.0


def test_warmup_steps():
    assert [timings.warmup_steps(n) for n in (0, 4, 20, 150, 1000)] == [1, 1, 2, 10, 10]


def test_process_start_counts_interpreter_start_up():
    # lexfine.clock imports neither torch nor transformers: the child starts in well under the sleep
    code = "import time; t = time.time(); time.sleep(1.0); " \
           "from lexfine.clock import process_start_time; print(time.time() - process_start_time(), " \
           "time.time() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(),
                         timeout=300)
    age, since_sleep = map(float, out.stdout.split())
    assert since_sleep < age < since_sleep + 30  # the sleep and the interpreter start before it
