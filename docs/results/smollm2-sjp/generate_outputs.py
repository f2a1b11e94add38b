"""What the runs write when LEXam MCQ-4 is asked in generate mode (the study's chain-of-thought prompt, which asks
for the answer as `###C###`): each output sorted into one kind, per run.

    python docs/results/smollm2-sjp/generate_outputs.py generate.tgz   # the tarball gpu_session.sh poll brings back
    python docs/results/smollm2-sjp/generate_outputs.py                # from the committed generate_outputs.jsonl.gz

With a tarball it first writes generate_outputs.jsonl.gz (every output cut to 120 characters; run, question id,
gold letter, parsed letter), then prints the table that README.md quotes from it.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUTS = HERE / "generate_outputs.jsonl.gz"
KINDS = ("format ###X###", "letter A-D", "roman i-iv", "starts with 'd'", "other")


def kind(output: str) -> str:
    x = output.strip()
    if "###" in x:
        return KINDS[0]
    if re.match(r"^[A-D](\b|$)", x):
        return KINDS[1]
    if re.match(r"^(i|ii|iii|iv)(\b|$)", x):
        return KINDS[2]
    if x.startswith("d"):  # "d", "dismissal", "dismissingdismissing...", "diii": the SJP verdict word
        return KINDS[3]
    return KINDS[4]


def extract(tgz: Path) -> None:
    rows = []
    with tarfile.open(tgz) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not member.name.endswith("-generate/predictions.jsonl"):
                continue
            run = member.name.split("/")[-4]
            for line in tar.extractfile(member).read().decode().splitlines():
                p = json.loads(line)
                rows.append({"run": run, "id": p["id"], "gold": p["gold"], "parsed": p.get("parsed"),
                             "output": p["output"][:120]})
    with gzip.open(OUTPUTS, "wt") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"{len(rows)} outputs -> {OUTPUTS.relative_to(HERE.parents[2])}")


def table() -> str:
    by_run: dict[str, list[dict]] = collections.defaultdict(list)
    with gzip.open(OUTPUTS, "rt") as f:
        for line in f:
            r = json.loads(line)
            by_run[r["run"]].append(r)
    lines = ["| run | n | " + " | ".join(KINDS) + " | most frequent outputs |", "|---" * (len(KINDS) + 3) + "|"]
    for run, rows in sorted(by_run.items()):
        counts = collections.Counter(kind(r["output"]) for r in rows)
        top = collections.Counter(r["output"].strip()[:14] for r in rows).most_common(3)
        shown = ", ".join(f"`{t!r}` {n}" for t, n in top)
        lines.append(f"| {run.removeprefix('smollm2-sjp-').rsplit('-', 1)[0]} | {len(rows)} | "
                     + " | ".join(str(counts[k]) for k in KINDS) + f" | {shown} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        extract(Path(sys.argv[1]))
    print(table())
