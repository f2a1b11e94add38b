"""Publish what a GPU session of the miniature study brought back, and regenerate the findings from it.

    python docs/results/smollm2-sjp/publish.py RUNS_TGZ_OR_SWEEP_DIR [...]

Copies every *completed* run directory's small files (config.yaml, manifest.json, metrics.jsonl,
eval/*/summary.json: no weights, no checkpoints, no per-question predictions, no lock files) into
docs/results/smollm2-sjp/runs/, then runs the command whose output is committed here:

    lexfine report docs/results/smollm2-sjp/runs --out docs/results/smollm2-sjp/report
    cp docs/results/smollm2-sjp/report/findings.json docs/results/smollm2-sjp/findings.json

Runs that did not complete in a session (killed when its device time ran out) are not published: the next
session trains them from the start (gpu_session.sh b restores the published runs into the sweep directory, so
`lexfine sweep run` skips them as "completed before").
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEEP = ("config.yaml", "manifest.json", "metrics.jsonl")


def run_dirs(source: Path, scratch: Path) -> list[Path]:
    if source.is_file():
        with tarfile.open(source) as tar:
            tar.extractall(scratch, filter="data")
        source = scratch
    return sorted(p.parent for p in source.rglob("manifest.json") if (p.parent / "config.yaml").is_file())


def publish(run: Path, dest_root: Path) -> bool:
    manifest = json.loads((run / "manifest.json").read_text())
    if manifest.get("status") != "completed":
        return False
    dest = dest_root / run.name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in KEEP:
        if (run / name).is_file():
            shutil.copy2(run / name, dest / name)
    for summary in sorted(run.glob("eval/*/summary.json")):
        (dest / summary.parent.relative_to(run)).mkdir(parents=True, exist_ok=True)
        shutil.copy2(summary, dest / summary.relative_to(run))
    return True


def main(sources: list[str]) -> None:
    dest_root = HERE / "runs"
    published = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, src in enumerate(sources):
            if not Path(src).exists():
                sys.exit(f"publish.py: {src} does not exist (give the runs.tgz a device call brought back, or a "
                         "sweep directory)")
            scratch = Path(tmp) / str(i)
            scratch.mkdir()
            for run in run_dirs(Path(src), scratch):
                if publish(run, dest_root):
                    published.append(run.name)
    print(f"published {len(published)} completed runs into {dest_root}:", *published, sep="\n  ")
    repo = HERE.parents[2]
    rel = HERE.relative_to(repo)
    subprocess.run(["lexfine", "report", str(rel / "runs"), "--out", str(rel / "report")], cwd=repo, check=True)
    shutil.copy2(HERE / "report" / "findings.json", HERE / "findings.json")
    (HERE / "report" / "report.html").unlink(missing_ok=True)  # report.md and the PNGs say the same, unembedded
    print(f"findings: {rel / 'findings.json'}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
