"""`lexfine sweep plan|status` through the real typer app, the sweep directory and the status table."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from lexfine.cli import app
from lexfine.rundir import RunDir, atomic_write_json
from lexfine.sweep.grid import load_sweep
from lexfine.sweep.local import prepare, read_state, update_state
from lexfine.sweep.status import collect, render
from tests.slurm_fakes import install

runner = CliRunner()


@pytest.fixture
def sweep_file(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "c", "output_dir": str(tmp_path / "sweeps"), "eval": ["sjp"],
                                 "base": {"model": "smollm2-135m", "train": {"max_steps": 4}},
                                 "grid": {"train.lr": [1e-4, 1e-3], "lora.r": [4]}}))
    return p


def test_help_everywhere():
    for args in (["sweep", "--help"], *[["sweep", c, "--help"] for c in ("plan", "run", "status", "submit")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0 and "Usage" in res.output


def test_plan_prints_runs_and_writes_nothing(sweep_file, tmp_path):
    res = runner.invoke(app, ["sweep", "plan", str(sweep_file)])
    assert res.exit_code == 0, res.output
    sweep = load_sweep(sweep_file)
    assert all(r.run_id in res.output for r in sweep.runs)
    assert "2 runs (2 lora)" in res.output
    assert not (tmp_path / "sweeps").exists()
    res = runner.invoke(app, ["sweep", "plan", str(sweep_file), "--json"])
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert [r["run_id"] for r in rows] == [r.run_id for r in sweep.runs]


def test_bad_sweep_is_one_line_exit_2(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("grid: {train.lrr: [1]}\n")
    for cmd in ("plan", "run", "status"):
        res = runner.invoke(app, ["sweep", cmd, str(p)])
        assert res.exit_code == 2
        assert "unknown config key 'train.lrr'" in res.output and res.output.strip().count("\n") == 0


def test_only_must_match(sweep_file):
    res = runner.invoke(app, ["sweep", "run", str(sweep_file), "--only", "nothing-like-this"])
    assert res.exit_code == 2 and "matches no run" in res.output


def test_prepare_keeps_job_ids_and_run_dirs(sweep_file):
    sweep = load_sweep(sweep_file)
    d = prepare(sweep)
    assert (d / "sweep.yaml").read_text() == sweep_file.read_text()
    first = sweep.runs[0]
    assert RunDir(first.run_dir).status == "planned"
    assert (d / "configs" / f"{first.run_id}.yaml").is_file()
    update_state(d, first.run_id, job_id="77")
    RunDir(first.run_dir).set_status("running")
    prepare(sweep)
    assert read_state(d)[first.run_id]["job_id"] == "77"
    assert RunDir(first.run_dir).status == "running"  # an existing run directory is left alone


def test_status_table(sweep_file, tmp_path, monkeypatch):
    sweep = load_sweep(sweep_file)
    prepare(sweep)
    done, queued = sweep.runs
    rd = RunDir(done.run_dir)
    rd.append_metrics({"step": 4, "loss": 1.5, "elapsed_s": 10.0})
    rd.set_status("completed", steps=4, final_loss=1.25, wall_time_s=3725.0)
    m = rd.manifest()
    m["evals"] = {"sjp-loglik": {"summary": "eval/sjp-loglik/summary.json", "macro_f1": 0.61, "accuracy": 0.7}}
    atomic_write_json(rd.manifest_path, m)
    update_state(sweep.sweep_dir, queued.run_id, job_id="1003", eval_job_id="1004")
    fakes = install(tmp_path)
    monkeypatch.setenv("PATH", fakes.env()["PATH"])
    monkeypatch.setenv("FAKE_SLURM_LOG", str(fakes.log))
    monkeypatch.setenv("FAKE_SQUEUE_OUT", "1003 PENDING")
    rows = collect(sweep)
    assert rows[0]["state"] == "completed" and rows[0]["evals"] == {"sjp-loglik": 0.61}
    assert rows[1]["state"] == "pending" and rows[1]["job_id"] == "1003"
    text = render(rows)
    header, first, second = text.splitlines()[:3]
    assert "sjp-loglik" in header and "final loss" in header and "wall time" in header
    assert "4/4" in first and "1.2500" in first and "0.610" in first and "1:02:05" in first
    assert "pending" in second and "1003 (+1004)" in second
    res = runner.invoke(app, ["sweep", "status", str(sweep_file), "--no-slurm"])
    assert res.exit_code == 0 and "2 runs: 1 completed, 1 planned" in res.output


def test_eval_job_arguments_parse_with_and_without_a_batch_size():
    """Separate eval jobs (local subprocesses, SLURM) get `lexfine eval` arguments the CLI accepts; without
    eval_options.batch_size the device's default applies (no `--batch-size None`)."""
    from lexfine.config import build_config
    from lexfine.eval.cli import eval_command
    from lexfine.sweep.local import eval_args

    for extra, expected in (([], None), (["eval_options.batch_size=16"], 16)):
        args = eval_args(build_config({}, ["model=smollm2-135m", "eval=[sjp]", *extra]), "sjp")
        assert "None" not in args
        ctx = typer_main(eval_command).make_context("eval", ["RUN", *args])
        assert ctx.params["batch_size"] == expected and ctx.params["task"] == "sjp"


def typer_main(fn):
    import typer

    one = typer.Typer(add_completion=False)
    one.command()(fn)
    return typer.main.get_command(one)  # a single command: the click command itself
