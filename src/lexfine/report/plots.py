"""Figures for the report (matplotlib, Agg, no pyplot state: safe in tests and on headless nodes).

Conventions kept in every figure so they read at a glance: one colour per LoRA rank (ordinal colormap, the same
rank -> colour map in all figures of a report), black for full fine-tuning, LR on a log axis, the smoothing of
findings.py for every "final loss". A figure whose data are missing is skipped with a reason, never drawn empty.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: reports are written on machines without a display

from matplotlib import colormaps  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from lexfine.report.runs import Run, RunSet  # noqa: E402
from lexfine.report.findings import LEXAM_KEYS, Settings, is_diverged, smoothed_final_loss  # noqa: E402

FULL_COLOR = "black"
LR_MARKERS = "osD^vP*Xh<>"


class Palette:
    def __init__(self, ranks: list[int], lrs: list[float]):
        ranks = sorted(set(ranks))
        # viridis stops at 0.9: its last yellows vanish on a white background
        self.rank = {r: colormaps["viridis"](0.9 * i / max(len(ranks) - 1, 1)) for i, r in enumerate(ranks)}
        lrs = sorted(set(lrs))
        self.lr = {lr: colormaps["plasma"](0.85 * i / max(len(lrs) - 1, 1)) for i, lr in enumerate(lrs)}
        self.marker = {lr: LR_MARKERS[i % len(LR_MARKERS)] for i, lr in enumerate(lrs)}

    def of(self, run: Run):
        return FULL_COLOR if run.method == "full" else self.rank.get(run.rank, "grey")


def _label(run_or_method, rank=None) -> str:
    method = getattr(run_or_method, "method", run_or_method)
    rank = getattr(run_or_method, "rank", rank)
    return "full FT" if method == "full" else f"LoRA r={rank}"


def _lr_label(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-").replace("e+0", "e")


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path


def _series(runs: list[Run]) -> list[tuple[str, int | None]]:
    """(method, rank) lines: LoRA by rank, then full FT."""
    keys = sorted({(r.method, r.rank) for r in runs if r.method == "lora"}, key=lambda k: k[1] or 0)
    if any(r.method == "full" for r in runs):
        keys.append(("full", None))
    return keys


def _mean_by_lr(runs: list[Run], value) -> dict[float, float]:
    """LR -> mean of value(run) over replicates (finite values only)."""
    acc: dict[float, list[float]] = {}
    for r in runs:
        v = value(r)
        if r.lr is not None and v is not None and math.isfinite(v):
            acc.setdefault(r.lr, []).append(v)
    return {lr: sum(v) / len(v) for lr, v in sorted(acc.items())}


def _line(ax, pts: dict[float, float], color, label, full: bool) -> None:
    if pts:
        ax.plot(list(pts), list(pts.values()), marker="s" if full else "o", ls="--" if full else "-", color=color,
                label=label, lw=2 if full else 1.5, ms=5)


def loss_vs_lr(runs, pal, s: Settings, path: Path) -> Path | str:
    ok = [r for r in runs if not is_diverged(r, s)]
    if not ok:
        return "no run with a finite final loss"
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for method, rank in _series(ok):
        sel = [r for r in ok if r.method == method and r.rank == rank]
        pts = _mean_by_lr(sel, lambda r: smoothed_final_loss(r, s.smooth_last))
        _line(ax, pts, FULL_COLOR if method == "full" else pal.rank[rank], _label(method, rank), method == "full")
        if pts:  # the best LR of this line: a hollow ring around its point
            lr = min(pts, key=pts.get)
            ax.plot([lr], [pts[lr]], "o", ms=12, mfc="none", mec=FULL_COLOR if method == "full" else pal.rank[rank])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"final training loss (mean of last {s.smooth_last} steps)")
    ax.set_title("Final loss vs learning rate (ring: best LR of each line)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def curves(runs, pal, s: Settings, path: Path) -> Path | str:
    lora = [r for r in runs if r.method == "lora"]
    full = [r for r in runs if r.method == "full"]
    rows = sorted({r.rank for r in lora}) or [None]
    cols = sorted({r.lr for r in (lora or full) if r.lr is not None}) or [None]
    if not runs:
        return "no runs"
    # the full-FT baseline drawn in every panel: the full run with the lowest final loss
    finite_full = [r for r in full if math.isfinite(smoothed_final_loss(r, s.smooth_last))]
    baseline = min(finite_full, key=lambda r: smoothed_final_loss(r, s.smooth_last)) if finite_full else None
    fig = Figure(figsize=(2.6 * len(cols) + 1, 1.7 * len(rows) + 1.2), layout="constrained")
    axes = fig.subplots(len(rows), len(cols), sharex=True, sharey=True, squeeze=False)
    finite = sorted(x for r in runs for x in r.curve["loss"] if math.isfinite(x))
    # the first steps' high losses would squash the endings, which is where runs differ: clip the top
    lo, q90 = (finite[0], finite[int(0.9 * (len(finite) - 1))]) if finite else (0.0, 1.0)
    hi = min(finite[-1], q90 + 0.6 * (q90 - lo)) if finite else 1.0
    for i, rank in enumerate(rows):
        for j, lr in enumerate(cols):
            ax = axes[i][j]
            sel = [r for r in (lora if lora else full) if r.rank == rank and r.lr == lr]
            if baseline is not None and lora:
                _curve(ax, baseline, FULL_COLOR, s, ls="--", label=f"full FT lr={_lr_label(baseline.lr)}")
            for r in sel:
                _curve(ax, r, pal.of(r), s, label=_label(r))
            if not sel:
                ax.text(0.5, 0.5, "no run", ha="center", va="center", transform=ax.transAxes, color="grey")
            if i == 0:
                ax.set_title(f"lr={_lr_label(lr)}" if lr else "", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"r={rank}" if rank else "loss", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    handles, labels = axes[0][0].get_legend_handles_labels()
    if baseline is not None and lora:
        fig.legend(handles[:1], labels[:1], loc="outside upper right", fontsize=8)
    fig.suptitle(f"Training loss (rolling mean of {s.smooth_last} steps) by rank (rows) and LR (columns)")
    fig.supxlabel("step")
    return _save(fig, path)


def _curve(ax, run: Run, color, s: Settings, ls="-", label=None) -> None:
    c = run.curve
    ax.plot(c["step"], c["loss"], color=color, alpha=0.2, lw=0.6)
    ax.plot(c["step"], c["loss"].rolling(s.smooth_last, min_periods=1).mean(), color=color, lw=1.3, ls=ls,
            label=label)
    if is_diverged(run, s):
        ax.text(0.98, 0.95, "diverged", color="red", ha="right", va="top", transform=ax.transAxes, fontsize=8)


def _eval_value(run: Run, key: str, metric: str) -> float | None:
    return run.evals.get(key, {}).get(metric)


def task_vs_rank(runs, pal, key: str | None, path: Path) -> Path | str:
    if key is None:
        return "no SJP evaluations"
    metrics = [m for m in ("macro_f1", "accuracy") if any(_eval_value(r, key, m) is not None for r in runs)]
    fig = Figure(figsize=(5.5 * len(metrics), 4.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    lora = [r for r in runs if r.method == "lora" and r.rank]
    for ax, metric in zip(axes, metrics):
        for lr in sorted({r.lr for r in lora if r.lr}):
            pts = {}
            for rank in sorted({r.rank for r in lora}):
                vals = [_eval_value(r, key, metric) for r in lora if r.rank == rank and r.lr == lr]
                vals = [v for v in vals if v is not None]
                if vals:
                    pts[rank] = sum(vals) / len(vals)
            if pts:
                ax.plot(list(pts), list(pts.values()), marker=pal.marker[lr], color=pal.lr[lr],
                        label=f"LoRA lr={_lr_label(lr)}")
        for lr, v in _mean_by_lr([r for r in runs if r.method == "full"],
                                 lambda r: _eval_value(r, key, metric)).items():
            ax.axhline(v, color=pal.lr.get(lr, FULL_COLOR), ls="--", lw=1, label=f"full FT lr={_lr_label(lr)}")
        maj = [_eval_value(r, key, "majority_baseline") for r in runs]
        maj = [v for v in maj if v is not None]
        if maj and metric == "accuracy":
            ax.axhline(maj[0], color="grey", ls=":", label="majority class")
        if lora:
            ax.set_xscale("log", base=2)
            ranks = sorted({r.rank for r in lora})
            ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("LoRA rank")
        ax.set_ylabel(f"SJP {metric}")
        ax.set_title(f"SJP {metric} vs rank ({key})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return _save(fig, path)


def lexam_vs_lr(runs, pal, base: dict, path: Path) -> Path | str:
    keys = {}
    for key in LEXAM_KEYS:  # per mode, the first task (mcq4 before mcq8, ...) that has scores
        mode = key.split("-")[1]
        if mode not in keys and any(_eval_value(r, key, "accuracy") is not None for r in runs):
            keys[mode] = key
    if not keys:
        return "no LEXam evaluations"
    fig = Figure(figsize=(5.5 * len(keys), 4.2), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, (mode, key) in zip(axes, sorted(keys.items())):
        for method, rank in _series(runs):
            sel = [r for r in runs if r.method == method and r.rank == rank]
            pts = _mean_by_lr(sel, lambda r: _eval_value(r, key, "accuracy"))
            _line(ax, pts, FULL_COLOR if method == "full" else pal.rank[rank], _label(method, rank),
                  method == "full")
        b = base.get(key, {}).get("accuracy")
        if b is not None:
            ax.axhline(b, color="tab:red", ls=":", lw=1.5, label="base model")
        n = int(key.split("mcq")[1].split("-")[0])
        ax.axhline(1 / n, color="grey", ls=":", lw=1, label=f"chance (1/{n})")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("LEXam accuracy")
        ax.set_title(f"Knowledge retention: {key}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points not dominated when both coordinates are to be maximised, sorted by x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and (q[0], q[1]) != (p[0], p[1])
                                          for q in points)]
    return sorted(front)


def tradeoff(runs, pal, retention: dict, base: dict, path: Path) -> Path | str:
    tkey, metric, lkey = retention.get("task_key"), retention.get("task_metric"), retention.get("lexam_key")
    if not (tkey and lkey):
        return "needs both SJP and LEXam evaluations"
    pts = [(r.evals[lkey]["accuracy"], r.evals[tkey][metric], r.name, r) for r in runs
           if "accuracy" in r.evals.get(lkey, {}) and metric in r.evals.get(tkey, {})]
    if not pts:
        return "no run has both SJP and LEXam scores"
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    seen = set()
    for x, y, _name, r in pts:
        lab = _label(r)
        ax.scatter([x], [y], color=pal.of(r), marker=pal.marker.get(r.lr, "o"), s=40, zorder=3,
                   label=None if lab in seen else lab)
        seen.add(lab)
    collapsed = set(retention.get("collapsed") or [])
    gone = [(x, y) for x, y, n, _r in pts if n in collapsed]
    if gone:
        ax.scatter([x for x, _ in gone], [y for _, y in gone], marker="x", color="black", s=70, zorder=5,
                   label=f"one LEXam answer for >= {retention.get('collapse_share', 0.9):.0%} of questions")
    front = pareto_front([(x, y, n) for x, y, n, _r in pts])
    ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", lw=1.2, drawstyle="steps-post",
            zorder=2, label="Pareto front")
    ax.scatter([p[0] for p in front], [p[1] for p in front], s=160, facecolors="none", edgecolors="tab:red", zorder=4)
    for lr, mk in pal.marker.items():  # marker legend for LRs, drawn off-data
        ax.scatter([], [], marker=mk, color="grey", label=f"lr={_lr_label(lr)}")
    b = base.get(lkey, {}).get("accuracy")
    if b is not None:
        ax.axvline(b, color="tab:red", ls=":", lw=1, label="base model LEXam")
        drop = retention.get("max_drop_points")
        if drop is not None:
            ax.axvspan(b - drop / 100, ax.get_xlim()[1], color="tab:green", alpha=0.07,
                       label=f"LEXam drop <= {drop:g} points")
    ax.set_xlabel(f"LEXam accuracy ({lkey})")
    ax.set_ylabel(f"SJP {metric} ({tkey})")
    ax.set_title("Task skill vs knowledge retention")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _setup_label(r: Run, with_nodes: bool = False) -> str:
    label = f"{r.size or '?'} {_label(r)}" + (f" {r.strategy}" if r.strategy else "") + (f" {r.gpu}" if r.gpu else "")
    if with_nodes:
        label += f" {r.num_nodes or '?'}n/{r.world_size or '?'}p"
    return label


def throughput(runs: list[Run], path: Path) -> Path | str:
    hw = [r for r in runs if r.tokens_per_s and (r.num_nodes or r.world_size or r.gpu)]
    if len({(r.num_nodes, r.world_size, r.gpu) for r in hw}) < 2:
        return "all runs used the same (or unknown) GPU and node count"
    by_nodes = all(r.num_nodes for r in hw)
    x_of = (lambda r: r.num_nodes) if by_nodes else (lambda r: r.world_size or r.num_nodes or 1)
    # throughput does not depend on the LR: a group is one model/method/rank/strategy/GPU over node counts
    groups: dict[str, dict[int, list[float]]] = {}
    for r in hw:
        groups.setdefault(_setup_label(r), {}).setdefault(x_of(r), []).append(r.tokens_per_s)
    series = {k: sorted((x, sum(v) / len(v)) for x, v in g.items()) for k, g in sorted(groups.items())}
    scaling = {k: pts for k, pts in series.items() if len(pts) > 1}
    cmap = colormaps["tab10"]
    if not scaling:  # nothing scales over node counts: compare setups side by side
        fig = Figure(figsize=(8, 0.5 + 0.35 * len(hw)), layout="constrained")
        ax = fig.subplots()
        items = sorted((_setup_label(r, True), r.tokens_per_s) for r in hw)
        ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
        ax.set_xlabel("training tokens/s")
        ax.set_title("Throughput by setup")
        ax.grid(alpha=0.3, axis="x")
        return _save(fig, path)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    for i, (label, pts) in enumerate(series.items()):
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", color=cmap(i % 10), label=label)
        if len(xs) > 1:
            ax.plot(xs, [ys[0] * x / xs[0] for x in xs], ls=":", color=cmap(i % 10), lw=1)
            ax2.plot(xs, [y / (ys[0] * x / xs[0]) for x, y in zip(xs, ys)], marker="o", color=cmap(i % 10),
                     label=label)
    xs_all = sorted({x_of(r) for r in hw})
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xticks(xs_all, [str(x) for x in xs_all])
        a.set_xlabel("nodes" if by_nodes else "processes (GPUs)")
        a.grid(alpha=0.3, which="both")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.set_ylabel("training tokens/s")
    ax.set_title("Throughput (dotted: linear scaling)")
    ax2.axhline(1.0, color="grey", ls=":")
    ax2.set_ylim(0, 1.1)
    ax2.set_ylabel("scaling efficiency")
    ax2.set_title("Efficiency vs the smallest setup of each group")
    ax.legend(fontsize=7)
    return _save(fig, path)


def make_figures(runset: RunSet, findings: dict, out: Path, s: Settings) -> tuple[list[dict], list[dict]]:
    """Write every figure the data allow. Returns (written [{file, title, size}], skipped [{figure, reason}])."""
    pal = Palette([r.rank for r in runset.runs if r.method == "lora" and r.rank],
                  [r.lr for r in runset.runs if r.lr])
    written, skipped = [], []

    def add(name: str, title: str, size: str | None, result) -> None:
        if isinstance(result, Path):
            written.append({"file": result.name, "title": title, "size": size})
        else:
            skipped.append({"figure": name, "reason": result})

    for label, f in findings["groups"].items():
        size = label
        runs = [r for r in runset.runs if r.name in f["runs"]]
        ret = dict(f.get("retention", {}))
        # figures: the selection split first, else the test split, else any SJP evaluation (e.g. split `all`)
        ret["task_key"] = ret.get("selection_key") or ret.get("report_key") or next(
            (k for k in sorted({k for r in runs for k in r.evals}) if k.startswith("sjp-")), None)
        if ret["task_key"] and not ret.get("task_metric"):
            ret["task_metric"] = "macro_f1" if any("macro_f1" in r.evals.get(ret["task_key"], {}) for r in runs) \
                else "accuracy"
        base = dict(runset.base_evals.get(runs[0].size or "unknown", {})) if runs else {}
        if ret.get("lexam_key") and ret.get("lexam_base_accuracy") is not None:
            base[ret["lexam_key"]] = {"accuracy": ret["lexam_base_accuracy"]}  # the base on the same questions
        tag = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in size)
        add(f"{tag}_loss_vs_lr", f"{size}: final loss vs learning rate", size,
            loss_vs_lr(runs, pal, s, out / f"{tag}_loss_vs_lr.png"))
        add(f"{tag}_curves", f"{size}: learning curves", size, curves(runs, pal, s, out / f"{tag}_curves.png"))
        add(f"{tag}_task_vs_rank", f"{size}: SJP task metric vs rank", size,
            task_vs_rank(runs, pal, ret["task_key"], out / f"{tag}_task_vs_rank.png"))
        add(f"{tag}_lexam_vs_lr", f"{size}: LEXam accuracy vs learning rate", size,
            lexam_vs_lr(runs, pal, base, out / f"{tag}_lexam_vs_lr.png"))
        add(f"{tag}_tradeoff", f"{size}: task skill vs knowledge retention", size,
            tradeoff(runs, pal, ret, base, out / f"{tag}_tradeoff.png"))
        from lexfine.report.eval_curves import eval_during_curves

        add(f"{tag}_eval_during", f"{size}: task metric and LEXam accuracy during training", size,
            eval_during_curves(runs, pal, out / f"{tag}_eval_during.png"))
    add("throughput", "Throughput and scaling", None, throughput(runset.runs, out / "throughput.png"))
    return written, skipped
