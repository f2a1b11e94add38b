"""report.md / report.html / figures on synthetic runs: every PNG is referenced, missing data skip cleanly."""

from __future__ import annotations

import base64
import re
import shutil

from lexfine.report import write_report
from lexfine.report.plots import pareto_front
from lexfine.report.synthetic import loss_curve, write_run


def _full_set(root):
    base = {"lexam_mcq4-loglik": {"accuracy": 0.4}, "lexam_mcq4-generate": {"accuracy": 0.3}}
    gb = {"train.grad_accum": 8}  # global batch 4 x 8 x 1 GPU = 32, as the 8-GPU run below: one comparison group
    for rank in (4, 16):
        for lr, final, f1, lex in ((1e-4, 0.8, 0.6, 0.39), (1e-3, 0.7, 0.7, 0.30)):
            write_run(root, name=f"r{rank}", rank=rank, lr=lr, losses=loss_curve(final - rank / 1000),
                      overrides=gb, base_evals=base, evals={"sjp-validation-loglik": {"accuracy": f1 + 0.1, "macro_f1": f1,
                                                             "majority_baseline": 0.76},
                                              "lexam_mcq4-loglik": {"accuracy": lex},
                                              "lexam_mcq4-generate": {"accuracy": lex - 0.1}})
    write_run(root, name="full", method="full", lr=1e-5, losses=loss_curve(0.6), base_evals=base, overrides=gb,
              evals={"sjp-validation-loglik": {"accuracy": 0.8, "macro_f1": 0.72}, "lexam_mcq4-loglik": {"accuracy": 0.2}})
    # the same configuration (global batch 32) on 2 nodes: a throughput/scaling figure
    write_run(root, name="r16", rank=16, lr=1e-3, losses=loss_curve(0.684), num_nodes=2, world_size=8, gpu="H100",
              seed=1, seconds_per_step=0.6)


def test_report_with_all_figures(tmp_path):
    _full_set(tmp_path / "runs")
    out = tmp_path / "out"
    md = write_report([tmp_path / "runs"], out)
    assert md == out / "report.md"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["8B-random_curves.png", "8B-random_lexam_vs_lr.png", "8B-random_loss_vs_lr.png",
                    "8B-random_task_vs_rank.png", "8B-random_tradeoff.png", "throughput.png"]
    html = (out / "report.html").read_text()
    text = md.read_text()
    for name in pngs:
        data = base64.b64encode((out / name).read_bytes()).decode()
        assert f"data:image/png;base64,{data}" in html  # embedded: opens offline
        assert f'data-file="{name}"' in html and f"]({name})" in text
    assert len(re.findall(r"<img ", html)) == len(pngs)
    assert "src=\"http" not in html and "<script" not in html
    assert "| Recommended |" in text and "Loss gap, full FT vs best LoRA" in text
    assert (out / "findings.json").is_file()


def test_missing_evals_skip_figures_cleanly(tmp_path):
    write_run(tmp_path / "runs", name="a", rank=8, lr=1e-4, losses=loss_curve(0.8))
    write_run(tmp_path / "runs", name="b", rank=8, lr=1e-3, losses=loss_curve(0.7))
    out = tmp_path / "out"
    write_report([tmp_path / "runs"], out)
    assert sorted(p.name for p in out.glob("*.png")) == ["8B-random_curves.png", "8B-random_loss_vs_lr.png"]
    text = (out / "report.md").read_text()
    assert "8B-random_task_vs_rank skipped: no SJP evaluations" in text
    assert "8B-random_tradeoff skipped" in text and "throughput skipped" in text
    html = (out / "report.html").read_text()
    assert html.count("<img ") == 2


def test_single_run_like_quickstart(tmp_path):
    """What `lexfine quickstart` hands over: one small LoRA run with loglik evals and its base model's scores."""
    p = write_run(tmp_path / "qs", name="quickstart", model="smollm2-135m", rank=8, lr=2e-4,
                  losses=loss_curve(1.2, first=3.0, steps=40),
                  evals={"sjp-loglik": {"accuracy": 0.7, "macro_f1": 0.5}, "lexam_mcq4-loglik": {"accuracy": 0.27}},
                  base_evals={"sjp-loglik": {"accuracy": 0.6, "macro_f1": 0.4},
                              "lexam_mcq4-loglik": {"accuracy": 0.28}})
    md = write_report([p], tmp_path / "report", figures=True)
    import json

    f = json.loads((tmp_path / "report" / "findings.json").read_text())
    f = f["groups"]
    assert list(f) == ["135M"] and f["135M"]["recommended"]["run"] == p.name
    assert f["135M"]["best_lr_at_grid_edge"]["lora"] == {"8": "single"}
    assert md.is_file() and (tmp_path / "report" / "135M_tradeoff.png").is_file()


def test_stale_pngs_are_removed(tmp_path):
    write_run(tmp_path / "runs", name="a", rank=8, lr=1e-4, losses=loss_curve(0.8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old_figure.png").write_bytes(b"x")
    write_report([tmp_path / "runs"], out, figures=False)
    assert not list(out.glob("*.png"))
    assert "<img" not in (out / "report.html").read_text()


def test_pareto_front():
    pts = [(0.1, 0.9, "a"), (0.2, 0.8, "b"), (0.15, 0.7, "dominated"), (0.3, 0.5, "c"), (0.3, 0.4, "d")]
    assert [p[2] for p in pareto_front(pts)] == ["a", "b", "c"]


def test_the_findings_table_reports_seed_noise(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, name="r8-s42", rank=8, lr=1e-3, losses=loss_curve(0.50),
              evals={"sjp-validation-loglik": {"accuracy": 0.8, "macro_f1": 0.58}})
    write_run(runs, name="r8-s7", rank=8, lr=1e-3, seed=7, losses=loss_curve(0.52),
              evals={"sjp-validation-loglik": {"accuracy": 0.8, "macro_f1": 0.64}})
    write_run(runs, name="r8-lr1e-4", rank=8, lr=1e-4, losses=loss_curve(0.515))
    text = write_report([runs], tmp_path / "out", figures=False).read_text()
    # sd of 0.50 / 0.52 = 0.02 / sqrt(2) = 0.0141
    assert ("| Seed noise | pooled SD of the final loss 0.014 (df 1; replicated: lora r8 lr1e-3: 0.5 / 0.52); "
            "SJP macro_f1 across seeds: lora r8 lr1e-3: 0.58 / 0.64 |") in text
    # runner-up 1e-4 is 0.005 above the two-seed mean 0.51: 0.29 seed standard errors
    assert "runner-up 1e-4" in text and "0.29 seed SE: not resolved" in text

    shutil.rmtree(next(d for d in runs.iterdir() if d.name.startswith("r8-s7")))
    text = write_report([runs], tmp_path / "out", figures=False).read_text()
    assert "| Seed noise | not measured (no configuration of this group has runs of two or more recorded seeds)" in text
    assert "seed SE" not in text
