"""The benchmarks' CPU modes run end to end and print their tables (the GPU figures come from the same code)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_throughput_tiny_prints_rows_and_ratio(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/train_throughput.py"), "--tiny", "--rows", "0,3,5",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["setup"][:10] for r in rows] == ["reference ", "+ loss on ", "+ ckpt on "]
    assert all(r["error"] is None and r["tokens_per_s"] > 0 for r in rows)
    assert rows[2]["ckpt"] == 0.5625
    assert "x ref" in res.stdout and "reference" in res.stdout


def test_batch_lengths_cover_the_distribution_and_start_at_the_worst_case():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_throughput import batch_lengths

    grouped = batch_lengths(21, 4, 4096, grouped=True, seed=1)
    plain = batch_lengths(21, 4, 4096, grouped=False, seed=1)
    assert grouped[0] == plain[0] == [4096] * 4
    assert sorted(n for b in grouped for n in b) == sorted(n for b in plain for n in b)  # same draws
    def real_share(batches):  # real tokens / padded tokens
        return sum(sum(b) for b in batches) / sum(len(b) * max(b) for b in batches)

    assert real_share(grouped[1:]) > 0.9 > 0.75 > real_share(plain[1:])  # grouping removes most padding
    assert grouped == batch_lengths(21, 4, 4096, grouped=True, seed=1)  # the same for every row


def test_eval_speed_tiny_prints_the_comparison(tmp_path):
    out = tmp_path / "eval.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/eval_speed.py"), "--tiny", "--cases", "6",
                          "--lexam-cases", "4", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "vs generate" in res.stdout and "projected" in res.stdout
    assert out.is_file() and out.stat().st_size > 0


def test_multigpu_scaling_mode_times_a_shipped_config_on_one_process(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/multigpu.py"), "--out", str(tmp_path),
                          "--scaling", str(ROOT / "src/lexfine/configs/quickstart.yaml"), "--model", "smollm2-135m",
                          "--gpus", "1", "--steps", "3"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("ROW "))[4:])
    assert row["rc"] == 0 and row["tokens_per_s_per_gpu"] > 0 and row["save_s"] is not None
    assert "tok/s/GPU" in res.stdout


def test_data_prep_prints_serial_parallel_and_cached_rows(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from data_prep import main

    # 0: every row gave one Dataset, and the eval prompts of every worker count were the same
    assert main(["--limit", "6", "--workers", "1,2", "--max-length", "2048", "--eval-prompts"]) == 0
    out = capsys.readouterr().out
    assert "cold, serial" in out and "cold, parallel" in out and "DIFFERS" not in out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    cached = next(r for r in rows if r.startswith("| cached (second run)    | - |"))
    assert cached.endswith("True |")
    assert [r.split("|")[2].strip() for r in rows if r.startswith("| bare tokenizers encode")] == ["1", "2"]
    assert [r.split("|")[2].strip() for r in rows if r.startswith("| eval prompts")] == ["1", "2"]


def test_multigpu_prints_its_table_and_json_when_the_budget_allows_no_run(tmp_path):
    """A time-limited device call still gets a table (rows skipped for the budget) and the JSON rows."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/multigpu.py"), "--out", str(tmp_path), "--budget", "0",
                          "--json", str(tmp_path / "rows.json")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(r["method"], r["gpus"]) for r in rows] == [("lora", 1)] + [("lora", 2)] * 4 + [("full", 1)] + [("full", 2)] * 4
    assert all(r["rc"] is None and r["check"] == "skipped: budget" for r in rows)
    assert "max rel dloss" in res.stdout and res.stdout.count("skipped: budget") >= 10
