import json
import math

from lexfine.rundir import RunDir, atomic_write_json, read_jsonl


def test_atomic_json_writes_null_for_nan(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_json(p, {"loss": math.nan, "ok": 1.5})
    assert json.loads(p.read_text()) == {"loss": None, "ok": 1.5}
    assert not list(tmp_path.glob(".*tmp"))


def test_metrics_truncate_on_resume_and_cut_lines(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.create("name: r\n", "r-1")
    for s in range(1, 6):
        rd.append_metrics({"step": s, "loss": 1.0 / s})
    with open(rd.metrics_path, "a") as f:
        f.write('{"step": 6, "lo')  # a line cut by a kill
    assert [r["step"] for r in read_jsonl(rd.metrics_path)] == [1, 2, 3, 4, 5]
    rd.truncate_metrics_after(3)
    assert [r["step"] for r in rd.metrics()] == [1, 2, 3]


def test_latest_checkpoint_needs_trainer_state(tmp_path):
    from tests.unit.test_checkpoints import make_ckpt

    rd = RunDir(tmp_path)
    make_ckpt(rd.checkpoints, 10)
    (rd.checkpoints / "checkpoint-20").mkdir()  # half-written: no trainer_state.json
    assert rd.latest_checkpoint().name == "checkpoint-10"


def test_status_and_evals(tmp_path):
    rd = RunDir(tmp_path / "r")
    rd.create("name: r\n", "r-1")
    assert rd.status == "planned" and RunDir.is_run_dir(rd.path)
    rd.set_status("completed", steps=3)
    summary = rd.eval_dir("sjp", "loglik") / "summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text("{}")
    rd.record_eval("sjp", "loglik", summary, {"accuracy": 0.7})
    m = rd.manifest()
    assert m["status"] == "completed" and m["steps"] == 3
    assert m["evals"]["sjp-loglik"] == {"summary": "eval/sjp-loglik/summary.json", "accuracy": 0.7}
