"""The eval_during figure: task metric and LEXam accuracy against the optimizer step, one line per run, so that a
sweep shows when forgetting sets in at each learning rate. Reads the eval/ rows of each run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from lexfine.report.collect import Run


def eval_rows(run: Run) -> list[dict]:
    """The eval_during rows of a lexfine run (step + eval/ keys), by step; [] for other sources."""
    path = Path(run.path or "") / "metrics.jsonl"
    if not run.path or not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "step" in r and any(k.startswith("eval/") for k in r):
            rows.append(r)
    return sorted(rows, key=lambda r: r["step"])


def _pick(keys: set[str], lexam: bool) -> str | None:
    """LEXam: the accuracy of the smallest mcq task; task: SJP macro-F1 (validation first), else its accuracy."""
    if lexam:
        found = sorted((k for k in keys if k.startswith("eval/lexam_mcq") and k.endswith("/accuracy")),
                       key=lambda k: int(k.split("mcq")[1].split("/")[0]))
        return found[0] if found else None
    for suffix in ("/macro_f1", "/accuracy"):
        found = sorted((k for k in keys if k.startswith("eval/sjp/") and k.endswith(suffix)),
                       key=lambda k: ("/validation/" not in k, k))
        if found:
            return found[0]
    return None


def eval_during_curves(runs: list[Run], pal, path: Path) -> Path | str:
    from matplotlib.figure import Figure

    from lexfine.report.plots import _label, _lr_label, _save

    data = [(r, rows) for r in runs if (rows := eval_rows(r))]
    if not data:
        return "no eval_during rows (set eval_during.every_steps)"
    keys = {k for _, rows in data for row in rows for k in row}
    panels = [k for k in (_pick(keys, False), _pick(keys, True)) if k]
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, key in zip(axes, panels):
        for run, rows in sorted(data, key=lambda d: (d[0].method, d[0].rank or 0, d[0].lr or 0)):
            pts = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
            if not pts:
                continue
            lr = f", lr {_lr_label(run.lr)}" if run.lr else ""
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=pal.marker.get(run.lr, "o"), ms=3,
                    color=pal.lr.get(run.lr, "grey"), ls="--" if run.method == "full" else "-",
                    label=f"{_label(run)}{lr}")
        ax.set_xlabel("optimizer step (0 = base model)")
        ax.set_ylabel(key.removeprefix("eval/"))
        ax.set_title(("Knowledge retention: " if "lexam" in key else "Task skill: ") + key.removeprefix("eval/"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
