"""lexfine report: from finished runs (run directories, sweeps, W&B exports) to findings, figures and a report."""

from __future__ import annotations

from pathlib import Path


def write_report(inputs: list[Path], out: Path, **opts) -> Path:
    """Collect runs from `inputs`, write findings.json, figures, report.md and report.html into `out`.

    Options: max_lexam_drop (points, default 5), smooth_last (steps, default 20), rank_tolerance (default 0.005),
    figures (default True). Returns the path of report.md.
    """
    from lexfine.report.render import write_report as _write

    return _write(inputs, out, **opts)


__all__ = ["write_report"]
