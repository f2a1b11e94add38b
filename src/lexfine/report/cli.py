"""`lexfine report`: registered on the main typer app by lexfine.cli (register(app))."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        inputs: List[Path] = typer.Argument(
            ..., help="Run directories, sweep directories and/or folders of W&B exports (mixable)."),
        out: Path = typer.Option(..., "--out", help="Folder for report.md, report.html, findings.json and PNGs."),
        max_lexam_drop: float = typer.Option(
            5.0, "--max-lexam-drop", help="Recommendation: allowed LEXam accuracy drop from the base model, points."),
        smooth_last: int = typer.Option(
            20, "--smooth-last", help="Final loss = mean of the last this-many logged training losses."),
        rank_tolerance: float = typer.Option(
            0.005, "--rank-tolerance", help="Rank saturation: relative tolerance to the best LoRA loss."),
        no_figures: bool = typer.Option(False, "--no-figures", help="Write findings and text only."),
    ) -> None:
        """Findings (best LR per method and rank, LoRA/full LR ratio, loss gap, rank saturation, diverged runs,
        a recommended run), figures and a report from finished runs. Prints the report path last."""
        from lexfine.errors import LexfineError
        from lexfine.report import write_report

        try:
            md = write_report(inputs, out, max_lexam_drop=max_lexam_drop, smooth_last=smooth_last,
                              rank_tolerance=rank_tolerance, figures=not no_figures)
        except LexfineError as e:
            # one line, no traceback, also when the app runs without lexfine.cli.main's handler (tests, plugins)
            typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None
        typer.echo(f"findings: {md.parent / 'findings.json'}")
        typer.echo(f"html: {md.parent / 'report.html'}")
        typer.echo(str(md))
