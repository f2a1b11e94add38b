"""train.profile_steps through a real (CPU) training run."""

import gzip
import json

from lexfine.config import validate
from lexfine.train import run


def test_a_run_writes_its_profile_window(tiny_config):
    rd = run(validate(tiny_config(train__profile_steps=[2, 3])))
    s = json.loads((rd.path / "profile" / "summary.json").read_text())
    assert s["steps"] == 2 and s["wall_s"] > 0 and s["real_tokens"] > 0
    assert "by host time" in (rd.path / "profile" / "ops.txt").read_text()
    trace = json.loads(gzip.open(rd.path / "profile" / "trace.json.gz").read())
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    assert rd.manifest()["status"] == "completed"


def test_a_window_the_run_never_reaches_profiles_nothing_and_completes(tiny_config, caplog):
    rd = run(validate(tiny_config(train__profile_steps=[9, 10])))  # 4 steps
    assert rd.manifest()["status"] == "completed" and not (rd.path / "profile").exists()
    assert "never began step 9" in caplog.text
