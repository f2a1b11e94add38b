"""The reference study's exported W&B runs (../shared/data/seed_runs): the report must find what the data say.

Skipped where ../shared/data is absent. Expected values are those of the exported histories (mean of the last 20
logged losses), not of the study's write-up.
"""

from __future__ import annotations

import base64
import json
import re

import pytest

from lexfine.report import write_report


@pytest.fixture(scope="module")
def study(shared_data, tmp_path_factory):
    seed = shared_data / "seed_runs"
    if not (seed / "history").is_dir():
        pytest.skip("../shared/data/seed_runs/history is not present")
    out = tmp_path_factory.mktemp("study_report")
    md = write_report([seed], out)
    return seed, out, md, json.loads((out / "findings.json").read_text())


def test_8b_learning_rates(study):
    f = study[3]["groups"]["8B"]
    assert f["best_lr"]["full"] == pytest.approx(1e-4)
    lora = f["best_lr"]["lora"]
    assert sorted(int(r) for r in lora) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert all(lr == pytest.approx(1e-3) for lr in lora.values())
    assert f["lr_ratio_lora_over_full"] == pytest.approx(10)
    assert f["lr_ratio_median_over_ranks"] == pytest.approx(10)
    assert f["rank_independent"] is True
    # both optima sit at the top of the decade grid: the data cannot exclude higher LRs
    assert f["best_lr_at_grid_edge"]["full"] == "high"
    assert set(f["best_lr_at_grid_edge"]["lora"].values()) == {"high"}


def test_8b_loss_gap_and_rank_saturation(study):
    f = study[3]["groups"]["8B"]
    fl = f["final_loss"]
    assert fl["full_best"] == pytest.approx(0.675, abs=0.005)  # ~0.68
    assert fl["lora_best"] == pytest.approx(0.757, abs=0.005)  # ~0.76
    assert -0.12 < f["loss_gap_full_vs_best_lora"] < -0.09  # full FT ~10% lower
    per_rank = {int(k): v for k, v in fl["lora_best_per_rank"].items()}
    high = [v for r, v in per_rank.items() if r >= 32]
    assert (max(high) - min(high)) / min(high) < 0.005
    assert f["rank_saturation"]["rank"] == 32
    assert f["rank_saturation"]["all_at_or_above_within_tolerance"] is True
    assert f["diverged"] == []


def test_8b_runs_and_evals(study):
    f = study[3]["groups"]["8B"]
    names = set(f["runs"])
    assert not any("checkpoint" in n for n in names)  # the _checkpoint- exports are evaluations, not runs
    assert len([n for n in names if "nnodes" not in n]) == 33  # 30 LoRA + 3 full grid runs
    # the newest evaluation of the final checkpoint wins (batch re-evaluation), not the earlier single one
    assert f["runs"]["lr1e-4_r1_lora_8B"]["lexam_accuracy"] == pytest.approx(268 / 1655, abs=1e-6)
    assert f["retention"]["lexam_key"] == "lexam_mcq4-generate"
    assert f["retention"]["lexam_base_accuracy"] == pytest.approx(0.2707, abs=1e-3)
    # the study scored SJP on the test years only: no run is selected (choosing on test would be optimistic)
    rec = f["recommended"]
    assert rec["run"] is None and rec["criterion"] == "no_validation_split"
    best = rec["best_on_test"]["run"]
    assert rec["best_on_test"]["split"] == "test" and f["runs"][best]["lexam_drop_points"] <= 5
    assert f["runs"][best]["lr"] <= 1e-5  # every LR >= 1e-4 run lost > 10 LEXam points (generate mode)


def test_no_healthy_study_run_is_flagged_diverged(study):
    findings = study[3]
    assert findings["diverged"] == [] and findings["not_completed"] == {}
    assert sum(len(g["runs"]) for g in findings["groups"].values()) == 40  # 33 grid + 5 scaling 8B, 2 70B


def test_70b_findings_are_computed_from_what_exists(study):
    f = study[3]["groups"]["70B"]
    # only two 70B LoRA r64 lr1e-4 scaling runs (2 and 8 nodes) were exported; no 70B full FT run
    assert f["best_lr"] == {"full": None, "lora": {"64": pytest.approx(1e-4)}}
    assert f["loss_gap_full_vs_best_lora"] is None and f["lr_ratio_lora_over_full"] is None
    assert f["recommended"]["run"] in f["runs"] and f["recommended"]["criterion"] == "lowest_loss"
    assert {s["num_nodes"] for s in f["throughput"]["scaling"]} == {2, 8}


def test_html_references_every_png_and_findings_are_byte_identical(study, tmp_path):
    seed, out, md, _ = study
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"8B_loss_vs_lr.png", "8B_curves.png", "8B_task_vs_rank.png", "8B_lexam_vs_lr.png", "8B_tradeoff.png",
            "throughput.png"} <= set(pngs)
    html = (out / "report.html").read_text()
    for name in pngs:
        assert f'data-file="{name}"' in html
        assert base64.b64encode((out / name).read_bytes()).decode() in html
    assert len(re.findall(r"<img ", html)) == len(pngs)
    again = write_report([seed], tmp_path / "again", figures=False)
    assert (out / "findings.json").read_bytes() == (again.parent / "findings.json").read_bytes()
