"""The sweep directory and the sequential local runner.

    <output_dir>/<sweep name>/
        sweep.yaml              copy of the sweep file as last run/submitted
        sweep.jsonl             one row per run: index, run_id, name, run_dir, assignment, status, job ids, ...
        configs/<run id>.yaml   the resolved config each training starts from (what `python -m lexfine.train` reads)
        logs/                   <run id>.train.log, <run id>.eval-<task>.log (local) or SLURM job logs
        slurm/                  generated sbatch scripts (`lexfine sweep submit`)
        <run id>/               the run directories themselves (config.yaml, manifest.json, metrics.jsonl, ...)

Run directories live inside the sweep directory, so one folder holds a whole study (`lexfine report <sweep dir>`).
The run directory stays the truth about a run; sweep.jsonl only adds what a run directory cannot know (job ids).

Training and each evaluation run as separate processes: a crash (or an OOM) in one run cannot take the sweep
down, and a failed evaluation never marks a trained run as failed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from lexfine.config import RunConfig
from lexfine.errors import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_LOCKED
from lexfine.rundir import RunDir, atomic_write_text, now_iso, read_jsonl, write_jsonl
from lexfine.runlock import RunLockedError, describe, lock_holder
from lexfine.sweep.grid import PlannedRun, Sweep

STATE_FILE = "sweep.jsonl"
# The training process only trains: evaluations run afterwards as their own commands (locally and on SLURM).
NO_EVAL = "eval=[]"
# A run whose lock another live process holds (its training exits errors.EXIT_LOCKED): skipped, not failed.
RUNNING_ELSEWHERE = "running elsewhere (locked by another process)"


# ----------------------------------------------------------------------------------------------
# Sweep directory


def config_path(sweep: Sweep, run: PlannedRun) -> Path:
    return sweep.sweep_dir / "configs" / f"{run.run_id}.yaml"


def log_dir(sweep: Sweep) -> Path:
    return sweep.sweep_dir / "logs"


def read_state(sweep_dir: Path) -> dict[str, dict]:
    return {r["run_id"]: r for r in read_jsonl(Path(sweep_dir) / STATE_FILE) if "run_id" in r}


def update_state(sweep_dir: Path, run_id: str, **fields) -> None:
    rows = list(read_state(sweep_dir).values())
    for row in rows:
        if row["run_id"] == run_id:
            row.update(fields, updated=now_iso())
    write_jsonl(Path(sweep_dir) / STATE_FILE, rows)


def prepare(sweep: Sweep, create_run_dirs: bool = True) -> Path:
    """Create the sweep directory: sweep.yaml, resolved configs, planned run directories and sweep.jsonl.
    Existing run directories are left as they are (they may be running, completed or resumable)."""
    d = sweep.sweep_dir
    d.mkdir(parents=True, exist_ok=True)
    if sweep.text is not None:
        atomic_write_text(d / "sweep.yaml", sweep.text)
    old = read_state(d)
    rows = []
    for run in sweep.runs:
        cfg_file = config_path(sweep, run)
        text = run.config.to_yaml()
        if cfg_file.is_file():
            # keep the job shape (nodes, strategy) a submitted job was given: of launch, only the global batch is
            # part of the run id, so the same run id has the same process count
            old_launch = (yaml.safe_load(cfg_file.read_text()) or {}).get("launch")
            if old_launch and old_launch.get("num_processes") == run.config.launch.num_processes:
                text = run.config.model_copy(update={"launch": type(run.config.launch)(**old_launch)}).to_yaml()
        atomic_write_text(cfg_file, text)
        rd = RunDir(run.run_dir)
        if create_run_dirs and not rd.manifest_path.exists():
            rd.create(run.config.to_yaml(), run.run_id)
        row = {k: v for k, v in old.get(run.run_id, {}).items() if k not in ("in_sweep",)}
        row.update(index=run.index, run_id=run.run_id, name=run.name, run_dir=str(run.run_dir),
                   assignment=run.assignment, status=rd.status or "planned")
        row.setdefault("updated", now_iso())
        rows.append(row)
    current = {r.run_id for r in sweep.runs}
    # Runs that left the sweep file keep their row (and job ids), marked as such.
    rows += [{**r, "in_sweep": False} for rid, r in old.items() if rid not in current]
    write_jsonl(d / STATE_FILE, rows)
    return d


# ----------------------------------------------------------------------------------------------
# Commands


def lexfine_command() -> list[str]:
    """How to call the `lexfine` CLI from this Python: the console script next to it, else through -c."""
    exe = Path(sys.executable).parent / "lexfine"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("lexfine")
    if found:
        return [found]
    return [sys.executable, "-c", "from lexfine.cli import main; main()"]


def train_command(sweep: Sweep, run: PlannedRun, launcher: str = "accelerate") -> list[str]:
    cfg = config_path(sweep, run)
    n = run.config.launch.num_processes
    if n > 1:
        from lexfine.train.launch import local_command

        return [*local_command(cfg, n, launcher, run.config.launch.num_machines, run.config.launch.strategy), NO_EVAL]
    return [sys.executable, "-m", "lexfine.train", str(cfg), NO_EVAL]


def eval_args(cfg: RunConfig, entry: str) -> list[str]:
    """`lexfine eval` arguments that evaluate one cfg.eval entry (`task` or `task:mode`) with cfg.eval_options,
    as `lexfine train` would have right after training."""
    task, mode = split_entry(cfg, entry)
    opts = cfg.eval_options
    # sjp@validation names its split (the eval command reads it from the task)
    data, split = (opts.sjp_data, None if "@" in task else opts.sjp_split) if task.startswith("sjp") \
        else (opts.lexam_data, None)
    args = ["--task", task, "--mode", mode]
    if opts.batch_size:  # else the device's default
        args += ["--batch-size", str(opts.batch_size)]
    if data:
        args += ["--data", data]
    if split:
        args += ["--split", split]
    if opts.limit:
        args += ["--limit", str(opts.limit)]
    if opts.max_length:
        args += ["--max-length", str(opts.max_length)]
    return args


def eval_command(run: PlannedRun, entry: str) -> list[str]:
    return [*lexfine_command(), "eval", str(run.run_dir), *eval_args(run.config, entry), "--quiet"]


def split_entry(cfg: RunConfig, entry: str) -> tuple[str, str]:
    task, _, mode = entry.partition(":")
    return task, mode or cfg.eval_options.mode


def has_eval(rd: RunDir, cfg: RunConfig, entry: str) -> bool:
    from lexfine.eval.tasks import eval_key

    task, mode = split_entry(cfg, entry)
    return eval_key(task, mode) in (rd.manifest().get("evals") or {})


def missing_evals(run: PlannedRun, tasks: list[str] | None = None) -> list[str]:
    rd = RunDir(run.run_dir)
    return [t for t in (run.config.eval if tasks is None else tasks) if not has_eval(rd, run.config, t)]


# ----------------------------------------------------------------------------------------------
# Runner


@dataclass
class Outcome:
    run: PlannedRun
    state: str
    """trained | skipped (completed before) | locked (another live process trains it: nothing touched) | diverged |
    interrupted | failed | eval-failed; the sequential and the packed runner use the same words"""
    detail: str = ""
    seconds: float = 0.0
    retries: int = 0
    """Automatic retries after transient GPU failures (sweep/retry.py) in this invocation."""


def _run_logged(cmd: list[str], log: Path, verbose: bool, echo: Callable[[str], None]) -> int:
    import shlex

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n=== {now_iso()} {' '.join(shlex.quote(c) for c in cmd)}\n")
        f.flush()
        if not verbose:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            echo("    " + line.rstrip("\n"))
        return proc.wait()


def _tail(log: Path, n: int = 8) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    last = text.rsplit("\n=== ", 1)[-1]  # the latest attempt only
    lines = [ln for ln in last.splitlines()[1:] if ln.strip()]
    return "\n".join("    | " + ln for ln in lines[-n:])


def _error_line(rd: RunDir, fallback: str) -> str:
    err = rd.manifest().get("error")
    return str(err).splitlines()[0] if err else fallback


def classify_exit(code: int, status: str | None, stopping: bool = False) -> str:
    """What a training process's exit code (lexfine.errors) and its run's status say: completed | diverged (65:
    terminal, not retried) | locked (73: another live process has it; touch nothing) | interrupted (75, or
    stopped by the runner itself: resumable) | failed."""
    if code == 0 and status == "completed":
        return "completed"
    if code == EXIT_DIVERGED or status == "diverged":
        return "diverged"
    if code == EXIT_LOCKED:
        return "locked"
    if code == EXIT_INTERRUPTED or status == "interrupted" or (stopping and code != 0):
        return "interrupted"
    return "failed"


def _train(sweep: Sweep, run: PlannedRun, launcher: str, in_process: bool, verbose: bool,
           echo: Callable[[str], None]) -> tuple[bool, str]:
    rd = RunDir(run.run_dir)
    log = log_dir(sweep) / f"{run.run_id}.train.log"
    if in_process:
        from lexfine.train import run as train_run

        try:
            train_run(run.config.model_copy(update={"eval": []}))
        except RunLockedError:
            return False, RUNNING_ELSEWHERE
        except Exception as e:  # the run directory says failed; the sweep goes on
            return False, _error_line(rd, f"{type(e).__name__}: {e}")
    else:
        cmd = train_command(sweep, run, launcher)
        code = _run_logged(cmd, log, verbose, echo)
        if code == EXIT_LOCKED:  # another process trains this run: it did nothing, and its manifest is not ours
            return False, RUNNING_ELSEWHERE
        kind = classify_exit(code, rd.status)
        if kind in ("diverged", "locked", "interrupted"):  # not failures: never marked failed
            return False, f"{kind}: " + ("another live process holds the run" if kind == "locked" else
                                         _error_line(rd, f"exit code {code}"))
        if code and rd.status != "completed":
            if rd.status in (None, "planned", "running"):
                # Killed before it could say so (OOM killer, segfault): never leave it looking alive.
                rd.set_status("failed", error=f"training process exited with code {code}; log: {log}")
            tail = "" if verbose else _tail(log)
            return False, _error_line(rd, f"exit code {code}") + (f" (log: {log})\n{tail}" if tail else "")
    status = rd.status
    if status != "completed":
        return False, f"status {status!r} after training: " + _error_line(rd, f"see {log}")
    return True, ""


def _evaluate(sweep: Sweep, run: PlannedRun, in_process: bool, verbose: bool,
              echo: Callable[[str], None]) -> list[str]:
    failures = []
    for task in missing_evals(run):
        echo(f"    eval {task} ...")
        log = log_dir(sweep) / f"{run.run_id}.eval-{task.replace(':', '_')}.log"
        if in_process:
            from lexfine.eval import run_configured_evals

            try:
                run_configured_evals(RunDir(run.run_dir), run.config.model_copy(update={"eval": [task]}))
                code = 0
            except Exception as e:
                failures.append(f"eval {task}: {type(e).__name__}: {e}")
                continue
        else:
            code = _run_logged(eval_command(run, task), log, verbose, echo)
        if code or not has_eval(RunDir(run.run_dir), run.config, task):
            failures.append(f"eval {task}: exit code {code} (log: {log})")
    return failures


def run_sweep(sweep: Sweep, *, only: list[PlannedRun] | None = None, retry_failed: bool = True,
              evaluate: bool = True, in_process: bool = False, launcher: str = "accelerate", verbose: bool = False,
              echo: Callable[[str], None] = print, retries: int = 1, retry_delay_s: float = 30.0) -> list[Outcome]:
    """Train and evaluate the sweep's runs one after another: completed runs are skipped, incomplete ones resume
    from their last checkpoint, a failure is recorded and the sweep goes on; a transient GPU failure (sweep/retry.py)
    is retried `retries` times, `retry_delay_s` later. Returns one Outcome per run."""
    from lexfine.sweep.retry import plural, transient_reason

    prepare(sweep)
    runs = only if only is not None else sweep.runs
    outcomes: list[Outcome] = []
    for i, run in enumerate(runs, start=1):
        rd = RunDir(run.run_dir)
        head = f"[{i}/{len(runs)}] {run.name}"
        t0, n = time.perf_counter(), 0
        status = rd.status
        if status == "completed":
            state, detail = "skipped", "completed before"
            echo(f"{head}: completed, skipping training")
        elif status == "diverged":
            outcomes.append(Outcome(run, "diverged", "diverged before (terminal)"))
            echo(f"{head}: diverged before, not retried")
            continue
        elif lock_holder(rd.path):
            outcomes.append(Outcome(run, "locked", RUNNING_ELSEWHERE))
            echo(f"{head}: {RUNNING_ELSEWHERE} ({describe(lock_holder(rd.path) or {})}), skipping")
            continue
        elif status == "failed" and not retry_failed:
            outcomes.append(Outcome(run, "failed", "failed before (use --retry-failed)"))
            echo(f"{head}: failed before, not retried")
            continue
        else:
            ckpt = rd.latest_checkpoint()
            echo(f"{head}: training ({'resuming from ' + ckpt.name if ckpt else run.describe()})")
            update_state(sweep.sweep_dir, run.run_id, status="running", runner="local")
            try:
                while True:
                    ok, detail = _train(sweep, run, launcher, in_process, verbose, echo)
                    reason = None if ok or n >= retries or detail.startswith(("diverged:", "locked:", "interrupted:")) \
                        else transient_reason(1, rd.manifest().get("error"),
                                              None if in_process else log_dir(sweep) / f"{run.run_id}.train.log")
                    if reason is None or detail == RUNNING_ELSEWHERE:
                        break
                    n += 1
                    total = int(read_state(sweep.sweep_dir).get(run.run_id, {}).get("retries") or 0) + 1
                    update_state(sweep.sweep_dir, run.run_id, retries=total, retry_reason=reason)
                    echo(f"{head}: retrying ({n}/{retries}) after transient failure: {reason}")
                    time.sleep(retry_delay_s)  # the memory it lacked may be freed meanwhile
            except KeyboardInterrupt:
                if rd.status in ("running", "planned"):
                    rd.set_status("interrupted", error="interrupted by the user (Ctrl-C); rerun to resume")
                update_state(sweep.sweep_dir, run.run_id, status=rd.status)
                raise
            if detail == RUNNING_ELSEWHERE:
                update_state(sweep.sweep_dir, run.run_id, status=rd.status)
                outcomes.append(Outcome(run, "locked", detail, time.perf_counter() - t0))
                echo(f"{head}: {detail}, skipping")
                continue
            if not ok:
                kind = detail.split(":", 1)[0] if detail.startswith(("diverged:", "locked:", "interrupted:")) \
                    else "failed"
                if n:
                    lines = detail.split("\n", 1)
                    detail = "\n".join([lines[0] + f" (after {plural(n)})", *lines[1:]])
                update_state(sweep.sweep_dir, run.run_id, status=rd.status,
                             error=detail.splitlines()[0] if kind == "failed" else None)
                outcomes.append(Outcome(run, kind, detail, time.perf_counter() - t0, n))
                echo(f"{head}: FAILED: {detail}" if kind == "failed" else f"{head}: {detail}")
                continue
            state, detail = "trained", f"completed after {plural(n)}" if n else ""
        if evaluate:
            fails = _evaluate(sweep, run, in_process, verbose, echo)
            if fails:
                state, detail = "eval-failed", "; ".join(fails)
                echo(f"{head}: evaluation FAILED: {detail}")
        dt = time.perf_counter() - t0
        update_state(sweep.sweep_dir, run.run_id, status=rd.status, error=detail if state == "eval-failed" else None)
        outcomes.append(Outcome(run, state, detail, dt, n if state in ("trained", "eval-failed") else 0))
        if state == "trained":
            m = rd.manifest()
            loss = m.get("final_loss")
            loss = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
            echo(f"{head}: completed in {dt:.0f}s{' after ' + plural(n) if n else ''} (steps {m.get('steps')}, "
                 f"final loss {loss})")
    return outcomes


def summary(outcomes: list[Outcome]) -> str:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.state] = counts.get(o.state, 0) + 1
    line = f"{len(outcomes)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    retried = [o for o in outcomes if o.retries]
    if retried:
        line += "\nretried after transient GPU failures:\n" + "\n".join(
            f"  {o.run.name} ({o.run.run_id}): {o.retries} retr{'y' if o.retries == 1 else 'ies'}, {o.state}"
            for o in retried)
    bad = [o for o in outcomes if o.state in ("failed", "eval-failed")]
    if bad:
        line += "\nfailed:\n" + "\n".join(f"  {o.run.name} ({o.run.run_id}): {o.state}: {o.detail.splitlines()[0]}"
                                          for o in bad)
    return line
