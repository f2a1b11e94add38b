"""report.md and report.html from findings and figures.

Both are rendered from one list of blocks, so they always say the same thing. The HTML embeds every PNG as a
base64 data URI (it opens offline, e-mailed alone) and still names each file, so a reader can find the PNG.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any

from lexfine.errors import LexfineError
from lexfine.report.collect import RunSet, collect
from lexfine.report.findings import Settings, compute, is_diverged, smoothed_final_loss, to_json


def _num(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _lr(x: Any) -> str:
    return "n/a" if x is None else f"{x:.0e}".replace("e-0", "e-").replace("e+0", "e")


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def _edge_note(edge: str | None) -> str:
    return {"high": " (highest LR tried: the optimum may be higher)", "low": " (lowest LR tried: may be lower)",
            "single": " (only LR tried)"}.get(edge or "", "")


def _resolution_text(res: dict | None) -> str:
    """'runner-up 1e-5 2.2 SE above, paired; 0.9 seed SE: not resolved' from a best_lr_resolution entry."""
    if not res or res.get("z") is None:
        return ""
    verdict = "resolved" if res["resolved"] else "not resolved"
    seed = f"; {_num(res['seed_z'], 2)} seed SE" if res.get("seed_z") is not None else ""
    basis = res.get("basis", "unpaired")
    return f"runner-up {_lr(res['runner_up_lr'])} {_num(res['z'], 2)} SE above, {basis}{seed}: {verdict}"


def _resolved_note(res: dict | None) -> str:
    text = _resolution_text(res)
    return f" ({text})" if text else ""


def _config_label(c: dict) -> str:
    return ("full" if c["method"] == "full" else f"{c['method']} r{c['rank']}") + f" lr{_lr(c['lr'])}"


def _across_seeds(configs: list[dict], key: str) -> str:
    """'lora r16 lr1e-3: 0.5817 / 0.6443; ...' over the configurations that have `key`."""
    return "; ".join(f"{_config_label(c)}: " + " / ".join(_num(v) for v in c[key]) for c in configs if c.get(key))


def _seed_noise_text(noise: dict | None) -> str:
    if not noise:
        return ("not measured (no configuration of this group has runs of two or more recorded seeds): the "
                "SE-based z's below cover only the batch-to-batch noise within one run")
    configs = noise["configurations"]
    text = (f"pooled SD of the final loss {_num(noise['pooled_sd'], 2)} (df {noise['df']}; replicated: "
            f"{_across_seeds(configs, 'final_losses')})")
    if any(c.get("task_metric_validation") for c in configs):
        text += f"; SJP {noise.get('task_metric') or 'task metric'} across seeds: " + _across_seeds(
            configs, "task_metric_validation")
    if any(c.get("lexam_accuracy") for c in configs):
        text += "; LEXam accuracy across seeds: " + _across_seeds(configs, "lexam_accuracy")
    return text


def _gap_note(f: dict) -> str:
    """'; 0.38 SE, 0.004 seed SE: not resolved' (loss_gap_resolution; findings without it: from loss_gap_z)."""
    gap = f.get("loss_gap_resolution") or {}
    z = gap.get("z", f.get("loss_gap_z"))
    if z is None:
        return ""
    resolved = gap.get("resolved", abs(z) >= 2)
    seed = f", {_num(abs(gap['seed_z']), 2)} seed SE" if gap.get("seed_z") is not None else ""
    return f"; {_num(abs(z), 2)} SE{seed}: {'resolved' if resolved else 'not resolved'}"


def _findings_rows(f: dict) -> list[list[str]]:
    best, edges = f["best_lr"], f["best_lr_at_grid_edge"]
    res = f.get("best_lr_resolution") or {}
    lora = best["lora"]
    rows = [["Completed runs", f"{f['n_runs']} ({len(f['diverged'])} diverged)"],
            ["Final loss (smoothing)", f["smoothing"]],
            ["Divergence rule", f["divergence_rule"]],
            ["Seed noise", _seed_noise_text(f.get("seed_noise"))],
            ["Best LR, full FT", _lr(best["full"]) + _edge_note(edges["full"]) + _resolved_note(res.get("full"))]]
    if lora:
        values = sorted({v for v in lora.values() if v is not None})
        ranks = sorted(int(k) for k in lora)
        if len(values) == 1:
            lora_edges = {e for e in edges["lora"].values()}
            note = _edge_note(lora_edges.pop()) if len(lora_edges) == 1 else ""
            per_rank = [f"r{rk}: {_resolution_text((res.get('lora') or {}).get(str(rk)))}" for rk in ranks
                        if _resolution_text((res.get("lora") or {}).get(str(rk)))]
            rows.append(["Best LR, LoRA", f"{_lr(values[0])} at every rank ({', '.join(map(str, ranks))}){note}"
                         + (f"; {'; '.join(per_rank)}" if per_rank else "")])
        else:
            rows.append(["Best LR, LoRA", ", ".join(f"r{rk}: {_lr(lora[str(rk)])}"
                                                    + _resolved_note((res.get("lora") or {}).get(str(rk)))
                                                    for rk in ranks)])
    else:
        rows.append(["Best LR, LoRA", "n/a (no LoRA runs)"])
    spread = f.get("best_lr_spread") or {}
    rows += [
        ["LoRA / full FT best-LR ratio", f"{_num(f['lr_ratio_lora_over_full'])} (best LoRA configuration's LR); "
                                         f"median over ranks: {_num(f['lr_ratio_median_over_ranks'])}"],
        ["Best LR independent of rank", ("n/a (fewer than two ranks with enough LRs)" if f["rank_independent"] is None
                                         else ("yes" if f["rank_independent"] else "no")
                                         + f" (max/min over ranks {', '.join(f'r{rk}' for rk in f.get('rank_independence_ranks', []))}: "
                                         f"{_num(spread.get('max_over_min'))})")
         + "".join(f"; r{rk} left out: {why}" for rk, why in (f.get("rank_independence_excluded") or {}).items())],
    ]
    fl = f["final_loss"]
    rows.append(["Final loss, best full FT / best LoRA",
                 f"{_num(fl['full_best'])} (lr {_lr(fl['full_best_lr'])}) / {_num(fl['lora_best'])} "
                 f"(r{fl['lora_best_rank']}, lr {_lr(fl['lora_best_lr'])})"])
    rows.append(["Loss gap, full FT vs best LoRA", _pct(f["loss_gap_full_vs_best_lora"])
                 + ("" if f["loss_gap_full_vs_best_lora"] is None else " (relative; negative: full FT lower)")
                 + _gap_note(f)])
    sat = f.get("rank_saturation")
    if sat:
        rows.append(["Rank saturation", f"r{sat['rank']}: smallest rank within {100 * sat['tolerance']:g}% of the "
                     f"best LoRA loss; ranks >= {sat['rank']} spread {100 * sat['spread_at_or_above']:.2f}%"
                     + ("" if sat["all_at_or_above_within_tolerance"] else " (some higher ranks fall outside)")
                     + (f"; ranks compared: {', '.join(f'r{rk}' for rk in sat['ranks'])} (left out, not tried at "
                        f"the best rank's LRs: {', '.join(f'r{rk}' for rk in sat['ranks_left_out'])})"
                        if sat.get("ranks_left_out") else "")
                     + (f"; within 2 seed SE of the best rank: {', '.join(f'r{rk}' for rk in sat['ranks_within_seed_noise'])}"
                        if sat.get("ranks_within_seed_noise") is not None else "")])
    rows.append(["Diverged runs", ", ".join(f"{n} ({f['runs'][n]['divergence']})" for n in f["diverged"]) or "none"])
    rec = f["recommended"]
    rows.append(["Recommended", f"**{rec['run']}**: {rec['why']}" if rec["run"] else rec["why"]])
    return rows


def _loss_grid(runset: RunSet, names: set[str], s: Settings) -> tuple[list[str], list[list[str]]] | None:
    runs = [r for r in runset.runs if r.name in names and r.lr is not None and not is_diverged(r, s)]
    lrs = sorted({r.lr for r in runs})
    lines = sorted({(r.method, r.rank) for r in runs}, key=lambda k: (k[0] == "full", k[1] or 0))
    if not lrs or not lines:
        return None
    rows = []
    for method, rank in lines:
        cells: dict[float, float] = {}
        for lr in lrs:
            vals = [smoothed_final_loss(r, s.smooth_last) for r in runs
                    if r.method == method and r.rank == rank and r.lr == lr]
            vals = [v for v in vals if math.isfinite(v)]
            if vals:
                cells[lr] = sum(vals) / len(vals)
        best = min(cells, key=cells.get) if cells else None
        rows.append(["full FT" if method == "full" else f"LoRA r={rank}"] + [
            ("**" + _num(cells[lr]) + "**" if lr == best else _num(cells[lr])) if lr in cells else "" for lr in lrs])
    return ["", *[f"lr {_lr(lr)}" for lr in lrs]], rows


def _run_rows(f: dict) -> tuple[list[str], list[list[str]]]:
    ret = f.get("retention") or {}
    head = ["run", "method", "rank", "lr", "final loss", "diverged"]
    splits = [(k, f"SJP {ret['task_metric']} ({sp})") for k, sp in (("task_metric_validation", "validation"),
                                                                     ("task_metric_test", "test"))
              if ret.get("selection_key" if sp == "validation" else "report_key")]
    head += [h for _k, h in splits]
    if ret.get("lexam_key"):
        head += ["LEXam acc", "LEXam drop (pts)"]
    rows = []
    for name, r in sorted(f["runs"].items(), key=lambda kv: (kv[1]["method"], kv[1]["rank"] or 0,
                                                             kv[1]["lr"] or 0, kv[0])):
        row = [name, r["method"], _num(r["rank"]), _lr(r["lr"]), _num(r["final_loss"]),
               r["divergence"] or "" if r["diverged"] else ""]
        row += [_num(r.get(k)) for k, _h in splits]
        if ret.get("lexam_key"):
            acc = _num(r.get("lexam_accuracy"))
            if r.get("lexam_collapsed"):
                acc += f" (one answer: {100 * r['lexam_top_answer_share']:.1f}%)"
            row += [acc, _num(r.get("lexam_drop_points"), 3)]
        rows.append(row)
    return head, rows


def build_blocks(runset: RunSet, findings: dict, figures: list[dict], skipped: list[dict], s: Settings) -> list:
    b: list = [("h", 1, "lexfine report")]
    groups = findings["groups"]
    b.append(("p", f"Inputs: {', '.join('`' + i + '`' for i in runset.inputs)}. {len(runset.runs)} runs in "
                   f"{len(groups)} comparison group(s): {', '.join('`' + g + '`' for g in groups)}. Only completed "
                   "runs that share everything but the LR, rank, method and seed are compared; replicates (other "
                   f"seeds) are averaged. Final loss everywhere: {s.describe()}. Every number below is computed by "
                   "`lexfine report` from these inputs; definitions in docs/report.md."))
    if findings.get("mixed"):
        b.append(("p", f"**Mixed inputs**: {findings['mixed']}."))
    if findings["not_completed"]:
        b.append(("p", "Not compared (status not completed): " + ", ".join(
            f"{n} ({st})" for n, st in sorted(findings["not_completed"].items())) + "."))
    for size, f in groups.items():
        b.append(("h", 2, f"Group {size}"))
        b.append(("table", ["Finding", "Value"], _findings_rows(f)))
        grid = _loss_grid(runset, set(f["runs"]), s)
        if grid:
            b.append(("h", 3, "Final training loss by configuration (bold: best LR of the row)"))
            b.append(("table", *grid))
        ret = f.get("retention") or {}
        if ret.get("lexam_key") or ret.get("selection_key") or ret.get("report_key"):
            base = ret.get("lexam_base_accuracy")
            b.append(("p", f"Task metric: {ret.get('task_metric') or 'none'}; selection on "
                           f"{ret.get('selection_key') or 'no validation evaluation'}, reported on "
                           f"{ret.get('report_key') or 'no test evaluation'}; "
                           f"retention: {ret.get('lexam_key') or 'none'} (base model: {_num(base)}), allowed drop "
                           f"{ret['max_drop_points']:g} points."))
        b.append(("h", 3, "Runs"))
        b.append(("table", *_run_rows(f)))
        for fig in figures:
            if fig["size"] == size:
                b.append(("img", fig["file"], fig["title"]))
    for fig in figures:
        if fig["size"] is None:
            b.append(("h", 2, fig["title"]))
            b.append(("img", fig["file"], fig["title"]))
    notes = [f"figure {x['figure']} skipped: {x['reason']}" for x in skipped] + runset.notes
    if notes:
        b.append(("h", 2, "Notes"))
        b.append(("ul", notes))
    return b


def to_markdown(blocks: list) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            out.append("#" * blk[1] + " " + blk[2])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in blk[1]))
        elif kind == "table":
            head, rows = blk[1], blk[2]
            esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
            lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    t = html.escape(str(text))
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:left}th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%}"
        "figcaption{color:#555;font-size:0.9em}code{background:#f3f3f3;padding:0 3px}")


def to_html(blocks: list, out: Path) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>lexfine report</title>',
             f"<style>{_CSS}</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            parts.append(f"<h{blk[1]}>{_inline(blk[2])}</h{blk[1]}>")
        elif kind == "p":
            parts.append(f"<p>{_inline(blk[1])}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in blk[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(c)}</th>" for c in blk[1])
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in blk[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((out / blk[1]).read_bytes()).decode("ascii")
            name = html.escape(blk[1])
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(blk[2])}" '
                         f'data-file="{name}"><figcaption>{_inline(blk[2])} (<a href="{name}">{name}</a>)'
                         "</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(inputs: list[str | Path], out: str | Path, *, max_lexam_drop: float = 5.0, smooth_last: int = 20,
                 rank_tolerance: float = 0.005, figures: bool = True) -> Path:
    """Collect runs, compute findings, draw figures; write findings.json, report.md, report.html into `out`."""
    from lexfine.rundir import atomic_write_text

    if smooth_last < 1:
        raise LexfineError(f"--smooth-last must be >= 1, not {smooth_last}")
    if max_lexam_drop < 0:
        raise LexfineError(f"--max-lexam-drop must be >= 0 points, not {max_lexam_drop:g}")
    s = Settings(smooth_last=smooth_last, rank_tolerance=rank_tolerance, max_lexam_drop=max_lexam_drop)
    runset = collect(list(inputs))
    findings = compute(runset, s)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LexfineError(f"cannot create output folder {str(out)!r}: {e.strerror or e}") from None
    for old in out.glob("*.png"):  # a figure from an earlier report of other data must not linger
        old.unlink()
    written, skipped = [], []
    if figures:
        from lexfine.report.plots import make_figures

        written, skipped = make_figures(runset, findings, out, s)
    atomic_write_text(out / "findings.json", to_json(findings))
    blocks = build_blocks(runset, findings, written, skipped, s)
    atomic_write_text(out / "report.html", to_html(blocks, out))
    md = out / "report.md"
    atomic_write_text(md, to_markdown(blocks))
    return md
