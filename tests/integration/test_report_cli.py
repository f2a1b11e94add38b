"""`lexfine report` through typer: registered by lexfine.report.cli.register on an app of our own."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from lexfine.report.cli import register
from lexfine.report.synthetic import loss_curve, write_run


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """A callback keeps `report` a sub-command (a one-command typer app would flatten it)."""

    register(app)
    return app


def test_cli_smoke(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, name="a", rank=8, lr=1e-4, losses=loss_curve(0.8))
    write_run(runs, name="b", rank=8, lr=1e-3, losses=loss_curve(0.7))
    write_run(runs, name="f", method="full", lr=1e-5, losses=loss_curve(0.6))
    out = tmp_path / "out"
    res = CliRunner().invoke(_app(), ["report", str(runs), "--out", str(out), "--smooth-last", "10",
                                      "--max-lexam-drop", "3"])
    assert res.exit_code == 0, res.output
    last = res.stdout.strip().splitlines()[-1]
    assert Path(last) == out / "report.md" and Path(last).is_file()
    f = json.loads((out / "findings.json").read_text())["groups"]["8B-random"]
    assert f["settings"] == {"smooth_last": 10, "rank_tolerance": 0.005, "max_lexam_drop_points": 3.0,
                             "rise_margin": 0.02, "spike_ratio": 0.5, "collapse_share": 0.9,
                             "min_lrs_for_rank_claims": 3}
    assert f["best_lr"] == {"full": 1e-5, "lora": {"8": 1e-3}}
    assert f["lr_ratio_lora_over_full"] == 100.0
    html = (out / "report.html").read_text()
    assert all(f'data-file="{p.name}"' in html for p in out.glob("*.png"))


def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(_app(), ["report", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0 and "input not found" in res.stderr
    (tmp_path / "empty").mkdir()
    res = runner.invoke(_app(), ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.stderr.startswith("error: no runs found") and "Traceback" not in res.output
    res = runner.invoke(_app(), ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "o"),
                                 "--smooth-last", "0"])
    assert res.exit_code == 2 and "--smooth-last" in res.stderr


def test_eval_during_rows_get_their_figure_and_leave_findings_alone(tmp_path):
    from lexfine.rundir import RunDir

    runs = tmp_path / "runs"
    plain = write_run(runs, name="a", rank=8, lr=1e-4, losses=loss_curve(0.8))
    watched = write_run(runs, name="b", rank=8, lr=1e-3, losses=loss_curve(0.7))
    for step, (f1, lexam) in enumerate([(0.4, 0.30), (0.6, 0.28), (0.7, 0.10)]):
        RunDir(watched).append_metrics({"step": step * 10, "epoch": 0.1 * step, "eval/sjp/validation/macro_f1": f1,
                                        "eval/lexam_mcq4/accuracy": lexam, "eval_s": 1.0})
    out = tmp_path / "out"
    res = CliRunner().invoke(_app(), ["report", str(runs), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "8B-random_eval_during.png").stat().st_size > 10_000
    f = json.loads((out / "findings.json").read_text())["groups"]["8B-random"]
    assert f["diverged"] == [] and f["best_lr"]["lora"] == {"8": 1e-3}  # eval rows are not (NaN) losses
    assert plain.is_dir()
