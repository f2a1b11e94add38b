"""`lexfine sweep status`: one row per run, read from its run directory (plus job ids from sweep.jsonl, and the GPU
a packed local sweep runs each job on: a `gpu` column while one runs). Under the table: the error of each failed
run, what a job waits for (GPU memory), and the runs that were retried after a transient GPU failure.

    run                        state      steps    final loss  sjp-loglik  lexam_mcq4-loglik  wall time  job
    tiny-lora-r8-lr1e-4-...    completed  2/2      2.1034      0.612       0.305              0:00:41    -
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from lexfine.rundir import RunDir
from lexfine.runlock import effective_status
from lexfine.sweep.grid import Sweep
from lexfine.sweep.local import missing_evals, read_state

# Preferred headline metric of an evaluation (the first one present is shown).
HEADLINE = ("macro_f1", "f1", "accuracy", "acc", "balanced_accuracy")


def _headline(entry: dict) -> float | None:
    for k in HEADLINE:
        if isinstance(entry.get(k), (int, float)):
            return float(entry[k])
    for k, v in entry.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("n", "count"):
            return float(v)
    return None


def _fmt_time(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Live state of queued/running jobs from squeue (empty when squeue is not available)."""
    ids = [j for j in job_ids if j]
    if not ids or not shutil.which("squeue"):
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1].lower()
    return states


def collect(sweep: Sweep, query_slurm: bool = True) -> list[dict]:
    state = read_state(sweep.sweep_dir)
    live = slurm_states([state.get(r.run_id, {}).get("job_id") for r in sweep.runs]) if query_slurm else {}
    rows = []
    for run in sweep.runs:
        rd = RunDir(run.run_dir)
        m = rd.manifest()
        st = state.get(run.run_id, {})
        metrics = rd.train_metrics() if rd.metrics_path.exists() else []
        last = metrics[-1] if metrics else {}
        status = effective_status(rd.path, m) or "new"  # `dead`: says running, but no live process holds the lock
        job = st.get("job_id")
        if job and job in live and status in ("planned", "interrupted", "new", "dead"):
            status = live[job]  # pending / running / requeued ...
        elif status == "completed" and missing_evals(run, sweep.eval):
            status = "trained"  # training done, evaluations outstanding
        steps = m.get("steps") if m.get("steps") is not None else last.get("step")
        total = run.config.train.max_steps if run.config.train.max_steps > 0 else None
        evals = {}
        for key, entry in (m.get("evals") or {}).items():
            if isinstance(entry, dict):
                evals[key] = _headline(entry)
        rows.append({
            "index": run.index, "run": run.name, "run_id": run.run_id, "state": status,
            "steps": steps, "max_steps": total,
            "final_loss": m.get("final_loss") if m.get("final_loss") is not None else last.get("loss"),
            "evals": evals,
            "wall_time_s": m.get("wall_time_s") if m.get("wall_time_s") is not None else last.get("elapsed_s"),
            "job_id": job, "eval_job_id": st.get("eval_job_id"), "gpu": st.get("gpu"), "local_job": st.get("job"),
            "error": m.get("error") if status == "failed" else (
                "no live process holds the run's lock (killed?): rerun to resume" if status == "dead" else None),
            "retries": int(st.get("retries") or 0), "retry_reason": st.get("retry_reason"),
            "waiting": st.get("waiting"),
            "run_dir": str(run.run_dir),
        })
    return rows


def render(rows: list[dict]) -> str:
    eval_keys: list[str] = []
    for r in rows:
        for k in r["evals"]:
            if k not in eval_keys:
                eval_keys.append(k)
    gpu_col = any(r.get("gpu") for r in rows)  # a packed local sweep is running: where each job runs
    header = ["#", "run", "state", "steps", "final loss", *eval_keys, "wall time", "job", *(["gpu"] if gpu_col else [])]
    table = [header]
    for r in rows:
        steps = "-" if r["steps"] is None else (f"{r['steps']}/{r['max_steps']}" if r["max_steps"] else str(r["steps"]))
        loss = "-" if not isinstance(r["final_loss"], (int, float)) else f"{r['final_loss']:.4f}"
        ev = [("-" if r["evals"].get(k) is None else f"{r['evals'][k]:.3f}") for k in eval_keys]
        job = r["job_id"] or "-"
        if r.get("eval_job_id"):
            job += f" (+{r['eval_job_id']})"
        where = [f"{r['gpu']} ({r.get('local_job') or 'train'})" if r.get("gpu") else "-"] if gpu_col else []
        table.append([str(r["index"]), r["run_id"], r["state"], steps, loss, *ev, _fmt_time(r["wall_time_s"]), job,
                      *where])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append("")
    lines.append(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for r in rows:
        if r.get("error"):
            lines.append(f"  {r['run_id']}: {str(r['error']).splitlines()[0][:200]}")
        if r.get("waiting"):
            lines.append(f"  {r['run_id']}: {str(r['waiting'])[:240]}")
        if r.get("retries"):
            n = r["retries"]
            lines.append(f"  {r['run_id']}: {r['state']} after {n} retr{'y' if n == 1 else 'ies'} "
                         f"(transient GPU failure: {str(r.get('retry_reason') or '?')[:160]})")
    return "\n".join(lines)


def status_table(sweep: Sweep, query_slurm: bool = True) -> str:
    return render(collect(sweep, query_slurm))
