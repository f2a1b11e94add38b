"""SLURM: one sbatch script per run (plus a dependent evaluation job) from a profile YAML, and submission.

Training job: `srun` starts one launcher per node. A single process runs `python -m lexfine.train CFG`; several
run `accelerate launch --num_machines N --num_processes N*G --machine_rank $SLURM_NODEID --main_process_ip
<first host of the nodelist> --main_process_port P -m lexfine.train CFG` (or the torchrun equivalent).
Preemption: `#SBATCH --signal=USR1@120` -> the trainer checkpoints and stops -> the script requeues the job ->
the requeued job resumes. Evaluation: `sbatch --dependency=afterok:<train job>` running `lexfine eval`.

Every value that reaches a script goes through shlex.quote (paths with spaces, quotes, `$` or backticks can
neither break a script nor run anything); `#SBATCH` values must be single tokens without control characters.
The profile's `setup:` lines are shell code by design (module load, source venv/bin/activate, ...).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lexfine.errors import ConfigError, LexfineError
from lexfine.rundir import RunDir, atomic_write_text, now_iso
from lexfine.sweep.grid import PlannedRun, Sweep
from lexfine.sweep.local import NO_EVAL, config_path, eval_args, log_dir, missing_evals, prepare, read_state, update_state
from lexfine.sweep.profile import TOKEN_RE, SlurmProfile, load_profile

TEMPLATES = Path(__file__).parent / "templates"
__all__ = ["load_profile", "SlurmProfile", "submit", "write_scripts", "node_command", "parse_job_id", "resources"]
# ----------------------------------------------------------------------------------------------
# Scripts

q = shlex.quote


def resources(profile: SlurmProfile, run: PlannedRun) -> tuple[int, int]:
    """(nodes, processes per node). The profile decides, unless the sweep sets launch.* for this run."""
    nodes = int(run.assignment.get("launch.num_machines", profile.nodes))
    if "launch.num_processes" in run.assignment:
        total = int(run.assignment["launch.num_processes"])
        if total % nodes:
            raise ConfigError(f"run {run.name}: launch.num_processes={total} is not a multiple of {nodes} nodes")
        return nodes, total // nodes
    return nodes, max(profile.gpus_per_node, 1)


PROFILE_COPY = "profile.yaml"  # <sweep_dir>/slurm/profile.yaml: the profile of the last submission


def for_profile(sweep: Sweep, profile: SlurmProfile) -> Sweep:
    from lexfine.sweep.batch import fit

    """The sweep as the profile's jobs train it: every run gets the job's launch (nodes, processes) and its run id
    is computed from that launch, because the global batch (batch x accumulation x processes) is part of the run
    id. Indices stay those of the sweep file (--only selections keep pointing at the same runs)."""
    runs: list[PlannedRun] = []
    seen: set[str] = set()
    merged = 0
    for run in sweep.runs:
        nodes, per_node = resources(profile, run)
        try:  # the launch of the job; with a sweep's global_batch, grad_accum follows the processes (sweep/batch.py)
            cfg = fit(run.config, sweep.global_batch, nodes * per_node, nodes)
        except ConfigError as e:
            raise ConfigError(f"run {run.name}: {e}") from None
        rid = cfg.run_id()
        if rid in seen:
            merged += 1
            continue
        seen.add(rid)
        runs.append(PlannedRun(run.index, run.name, rid, cfg, run.assignment))
    return dataclasses.replace(sweep, runs=runs, merged=sweep.merged + merged)


def submitted_profile(sweep_dir: Path) -> SlurmProfile | None:
    """The profile the sweep was last submitted with (None: never submitted)."""
    p = Path(sweep_dir) / "slurm" / PROFILE_COPY
    return load_profile(p) if p.is_file() else None


def _directive(opt: str) -> str:
    return f"#SBATCH {opt}"


def _log_option(path: Path) -> tuple[str | None, list[str]]:
    """A #SBATCH --output line when the path is one plain word; otherwise an sbatch argument (argv, no shell)."""
    text = str(path.parent).replace("%", "%%") + "/" + path.name  # % starts a SLURM filename pattern
    if TOKEN_RE.fullmatch(text):
        return _directive(f"--output={text}"), []
    return None, [f"--output={text}"]


def _directives(profile: SlurmProfile, job_name: str, nodes: int, gpus: int, log: Path, train: bool) -> tuple[str, list[str]]:
    ev = profile.eval
    partition = profile.partition if train or ev.partition is None else ev.partition
    lines = [_directive(f"--job-name={job_name}")]
    if profile.account:
        lines.append(_directive(f"--account={profile.account}"))
    if partition:
        lines.append(_directive(f"--partition={partition}"))
    if profile.qos:
        lines.append(_directive(f"--qos={profile.qos}"))
    if profile.constraint:
        lines.append(_directive(f"--constraint={profile.constraint}"))
    if profile.exclusive:
        lines.append(_directive("--exclusive"))
    lines.append(_directive(f"--time={profile.time if train or not ev.time else ev.time}"))
    lines += [_directive(f"--nodes={nodes}"), _directive("--ntasks-per-node=1")]
    if gpus:
        lines.append(_directive(f"--gpus-per-node={gpus}" if profile.gpu_directive == "gpus-per-node" else f"--gres=gpu:{gpus}"))
    if profile.cpus_per_task:
        lines.append(_directive(f"--cpus-per-task={profile.cpus_per_task}"))
    if profile.mem:
        lines.append(_directive(f"--mem={profile.mem}"))
    line, argv = _log_option(log)
    if line:
        lines.append(line)
    lines.append(_directive("--open-mode=append"))  # a requeued job appends to the same log
    if train and profile.signal:
        lines.append(_directive(f"--signal={profile.signal}"))
    if profile.requeue:
        lines.append(_directive("--requeue"))
    extra = profile.sbatch_extra if train or ev.sbatch_extra is None else ev.sbatch_extra
    lines += [_directive(x.strip()) for x in extra]
    return "\n".join(lines), argv


def _setup(profile: SlurmProfile) -> str:
    lines = list(profile.setup)
    for k, v in profile.env.items():
        val = ("1" if v else "0") if isinstance(v, bool) else str(v)
        lines.append(f"export {k}={q(val)}")
    return "\n".join(lines) if lines else "# (none)"


def srun_args(profile: SlurmProfile, nodes: int) -> list[str]:
    args = [f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if profile.cpus_per_task:
        args.append(f"--cpus-per-task={profile.cpus_per_task}")
    if profile.environment:
        args.append(f"--environment={profile.environment}")
    if profile.container_image:
        args.append(f"--container-image={profile.container_image}")
    if profile.container_mounts:
        args.append(f"--container-mounts={','.join(profile.container_mounts)}")
    return [*args, *profile.srun_extra]


def launcher_exe(profile: SlurmProfile, name: str) -> str:
    """`accelerate` / `torchrun` of the job's environment: the one beside `profile.python` when that is a path
    to an environment's python (a venv the job never activates), else the name found on the job's PATH."""
    python = Path(profile.python)
    if python.is_absolute() and (python.parent / name).is_file():
        return str(python.parent / name)
    return name


def node_command(profile: SlurmProfile, cfg: Path, nodes: int, per_node: int, workdir: str,
                 accelerate_config: Path | None = None) -> str:
    """What `bash -c` runs on every node. $SLURM_NODEID, $MASTER_ADDR and $MASTER_PORT expand there."""
    module = ["-m", "lexfine.train", str(cfg), NO_EVAL]
    if nodes * per_node == 1:
        cmd = [profile.python, *module]
        launch = " ".join(q(c) for c in cmd)
    elif profile.launcher == "torchrun":
        launch = (f"{q(launcher_exe(profile, 'torchrun'))} --nnodes {nodes} --node_rank \"$SLURM_NODEID\" --nproc_per_node {per_node} "
                  f"--master_addr \"$MASTER_ADDR\" --master_port \"$MASTER_PORT\" " + " ".join(q(c) for c in module))
    else:
        if accelerate_config is None:
            from lexfine.train.launch import accelerate_config_path

            accelerate_config = accelerate_config_path("ddp")
        launch = (f"{q(launcher_exe(profile, 'accelerate'))} launch --config_file {q(str(accelerate_config))} --num_machines {nodes} "
                  f"--num_processes {nodes * per_node} --machine_rank \"$SLURM_NODEID\" "
                  f"--main_process_ip \"$MASTER_ADDR\" --main_process_port \"$MASTER_PORT\" "
                  + " ".join(q(c) for c in module))
    return f'trap "" USR1; cd {q(workdir)} || exit 1; exec {launch}'


_REQUEUE = """if grep -Eq '^  "status": *"interrupted"' "$RUN_DIR/manifest.json" 2>/dev/null && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "lexfine: checkpoint saved before the time limit or a preemption; requeueing job $SLURM_JOB_ID"
  if scontrol requeue "$SLURM_JOB_ID"; then exit 75; fi
  echo "lexfine: scontrol requeue failed: submit the sweep again to resume" >&2
fi"""


def render(template: str, **values: str) -> str:
    text = (TEMPLATES / template).read_text()

    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"template {template} needs {m.group(1)}")
        return values[m.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", sub, text)


@dataclass
class JobScripts:
    run: PlannedRun
    train: Path
    eval: Path | None
    train_argv: list[str]
    """Extra sbatch arguments (values that cannot be #SBATCH lines)."""
    eval_argv: list[str]


def write_scripts(sweep: Sweep, run: PlannedRun, profile: SlurmProfile, workdir: str) -> JobScripts:
    nodes, per_node = resources(profile, run)
    cfg = run.config.model_copy(update={"launch": run.config.launch.model_copy(
        update={"num_machines": nodes, "num_processes": nodes * per_node})})
    if cfg.run_id() != run.run_id:  # the global batch is part of the run id: bind the sweep first
        raise LexfineError(f"run {run.run_id} was planned for another job shape ({cfg.run_id()} with "
                           f"{nodes} x {per_node} processes): plan it with slurm.for_profile")
    cfg_file = config_path(sweep, run)
    atomic_write_text(cfg_file, cfg.to_yaml())
    d = sweep.sweep_dir / "slurm"
    logs = log_dir(sweep)
    logs.mkdir(parents=True, exist_ok=True)
    acc = None
    if nodes * per_node > 1 and profile.launcher == "accelerate":
        # A copy next to the scripts: the package path on the login node may not exist inside the container.
        from lexfine.train.launch import accelerate_config_path

        acc = d / "accelerate.yaml"
        atomic_write_text(acc, accelerate_config_path(run.config.launch.strategy).read_text())
    gpus = profile.gpus_per_node if "launch.num_processes" not in run.assignment else per_node
    directives, train_argv = _directives(profile, run.name, nodes, gpus, logs / f"{run.run_id}.train-%j.out", True)
    train = d / f"{run.run_id}.train.sbatch"
    atomic_write_text(train, render(
        "train.sbatch", sweep=sweep.name, run_id=run.run_id, directives=directives, setup=_setup(profile),
        workdir=q(workdir), run_dir=q(str(run.run_dir)), nodes=str(nodes), procs_per_node=str(per_node),
        port="$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))" if profile.main_process_port == "auto"
        else str(int(profile.main_process_port)),
        srun_args=" ".join(q(a) for a in srun_args(profile, nodes)),
        node_command=q(node_command(profile, cfg_file, nodes, per_node, workdir, acc)),
        requeue=_REQUEUE if profile.requeue else "# requeue after preemption: off in the profile (requeue: false)",
    ))
    os.chmod(train, 0o755)
    ev, eval_argv = None, []
    if sweep.eval:
        egpus = profile.eval.gpus_per_node if profile.eval.gpus_per_node is not None else profile.gpus_per_node
        directives, eval_argv = _directives(profile, f"{run.name}-eval", 1, egpus,
                                            logs / f"{run.run_id}.eval-%j.out", False)
        lexfine = " ".join(q(w) for w in shlex.split(profile.lexfine))
        steps = [f"{lexfine} eval {q(str(run.run_dir))} " + " ".join(q(a) for a in eval_args(run.config, t)) + " || rc=1"
                 for t in sweep.eval]
        cmd = f"cd {q(workdir)} || exit 1; rc=0; " + "; ".join(steps) + "; exit $rc"
        ev = d / f"{run.run_id}.eval.sbatch"
        atomic_write_text(ev, render(
            "eval.sbatch", sweep=sweep.name, run_id=run.run_id, directives=directives, setup=_setup(profile),
            workdir=q(workdir), tasks=" ".join(re.sub(r"[^A-Za-z0-9_:.-]", "_", t) for t in sweep.eval),
            srun_args=" ".join(q(a) for a in srun_args(profile, 1)), node_command=q(cmd),
        ))
        os.chmod(ev, 0o755)
    return JobScripts(run, train, ev, train_argv, eval_argv)


# ----------------------------------------------------------------------------------------------
# Submission


def parse_job_id(output: str) -> str:
    text = output.strip()
    m = re.match(r"(\d+)(;\S+)?$", text.splitlines()[-1].strip()) if text else None
    m = m or re.search(r"Submitted batch job (\d+)", text)
    if not m:
        raise LexfineError(f"could not read a job id from the sbatch output {text[:200]!r}")
    return m.group(1)


def sbatch(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise LexfineError("sbatch not found: run `lexfine sweep submit` on a SLURM login node (or use --dry-run)") from None
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        raise LexfineError(f"sbatch failed (exit {out.returncode}): {msg[-1] if msg else 'no output'}")
    return parse_job_id(out.stdout)


def _active_jobs(job_ids: list[str]) -> set[str]:
    from lexfine.sweep.status import slurm_states

    return {j for j, s in slurm_states(job_ids).items() if s not in ("completed", "failed", "cancelled", "timeout")}


def submit(sweep: Sweep, profile: SlurmProfile, *, dry_run: bool = False, force: bool = False,
           only: list[PlannedRun] | None = None, workdir: str | None = None,
           echo: Callable[[str], None] = print) -> list[dict]:
    """Write the scripts and submit them (training, then evaluation with afterok). Completed runs with all
    evaluations and runs whose job is still queued are skipped unless `force`. Returns one record per run."""
    if not dry_run and not shutil.which("sbatch"):
        raise LexfineError("sbatch not found: run `lexfine sweep submit` on a SLURM login node (or use --dry-run)")
    sweep = for_profile(sweep, profile)  # run ids from the launch (and global batch) the jobs will use
    if only is not None:
        chosen = {r.index for r in only}
        only = [r for r in sweep.runs if r.index in chosen]
    prepare(sweep, create_run_dirs=not dry_run)
    import yaml

    atomic_write_text(sweep.sweep_dir / "slurm" / PROFILE_COPY, yaml.safe_dump(profile.model_dump(mode="json"),
                                                                                 sort_keys=False))
    workdir = workdir or profile.workdir or os.getcwd()
    runs = only if only is not None else sweep.runs
    state = read_state(sweep.sweep_dir)
    ids = [state.get(r.run_id, {}).get(k) for r in runs for k in ("job_id", "eval_job_id")]
    active = set() if dry_run else _active_jobs(ids)
    records = []
    for i, run in enumerate(runs, start=1):
        head = f"[{i}/{len(runs)}] {run.name}"
        rd = RunDir(run.run_dir)
        done = rd.status == "completed"
        todo_evals = missing_evals(run, sweep.eval)
        job = state.get(run.run_id, {}).get("job_id")
        if not force and done and not todo_evals:
            echo(f"{head}: completed, nothing to submit")
            continue
        if not force and job in active:
            echo(f"{head}: job {job} is still queued or running, not submitted again")
            continue
        scripts = write_scripts(sweep, run, profile, workdir)
        train_cmd = ["sbatch", "--parsable", *scripts.train_argv, str(scripts.train)]
        skip_train = done and not force
        rec = {"run_id": run.run_id, "script": str(scripts.train), "eval_script": str(scripts.eval) if scripts.eval else None}
        echo(f"{head}: {'evaluation only' if skip_train else 'script ' + str(scripts.train)}")
        nodes, per_node = resources(profile, run)
        t = run.config.train
        if not skip_train and nodes * per_node > 1:
            # the global batch grows with the processes: say so, the learning rate depends on it
            echo(f"    {nodes} node(s) x {per_node} processes x batch {t.batch_size} x accumulation {t.grad_accum}"
                 f" = global batch {nodes * per_node * t.batch_size * t.grad_accum}")
        if dry_run:
            if not skip_train:
                echo("    " + shlex.join(train_cmd))
            if scripts.eval:
                echo(f"    eval script {scripts.eval}")
                dep = [] if skip_train else ["--dependency=afterok:<job id of the training job>"]
                echo("    " + shlex.join(["sbatch", "--parsable", *dep, *scripts.eval_argv, str(scripts.eval)]))
            records.append(rec)
            continue
        stale = state.get(run.run_id, {}).get("eval_job_id")
        if stale in active and shutil.which("scancel"):
            # the evaluation job of an earlier, failed training would wait forever on its dependency
            subprocess.run(["scancel", stale], capture_output=True, check=False)
            echo(f"    cancelled the earlier evaluation job {stale}")
        if not skip_train:
            rec["job_id"] = sbatch(train_cmd)
            echo(f"    submitted training job {rec['job_id']}")
        if scripts.eval:
            dep = [f"--dependency=afterok:{rec['job_id']}"] if rec.get("job_id") else []
            rec["eval_job_id"] = sbatch(["sbatch", "--parsable", *dep, *scripts.eval_argv, str(scripts.eval)])
            echo(f"    submitted evaluation job {rec['eval_job_id']}" + (f" (after {rec['job_id']})" if dep else ""))
        update_state(sweep.sweep_dir, run.run_id, submitted=now_iso(), runner="slurm",
                     **{k: v for k, v in rec.items() if k != "run_id"})
        records.append(rec)
    return records
