"""`lexfine sweep plan|run|status|submit SWEEP.yaml`: registered on the main app by `register(app)`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lexfine.errors import LexfineError

sweep_app = typer.Typer(
    help="Grids of runs from one sweep file: plan them, run them locally (packed onto the GPUs, or one after "
         "another), or submit to SLURM.",
    no_args_is_help=True,
)

SWEEP_ARG = typer.Argument(..., help="Sweep YAML (e.g. configs/sweep/tiny_cpu.yaml).")
ONLY_OPT = typer.Option(None, "--only", help="Only these runs: run id, run name, glob (*lr1e-4*) or index; repeatable.")


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _load(path: Path, profile: Optional[Path] = None, submitted: bool = False):
    """The sweep; with a SLURM profile (given, or with `submitted` the one of its last submission) its run ids are
    those of the jobs: the global batch, and so the run id, depends on the job's process count."""
    from lexfine.sweep.grid import load_sweep

    sweep = load_sweep(path)
    if profile is None and not submitted:
        return sweep
    from lexfine.sweep.slurm import for_profile, load_profile, submitted_profile

    prof = load_profile(profile) if profile is not None else submitted_profile(sweep.sweep_dir)
    return for_profile(sweep, prof) if prof is not None else sweep


def _select(sweep, only: Optional[List[str]]):
    if not only:
        return None
    chosen = []
    for pattern in only:
        found = sweep.find(pattern)
        if not found:
            raise LexfineError(f"--only {pattern!r} matches no run of sweep {sweep.name!r} (see `lexfine sweep plan`)")
        chosen += [r for r in found if r not in chosen]
    return chosen  # in the order of the patterns: the first ones start first


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


@sweep_app.command("plan")
def plan(
    sweep_file: Path = SWEEP_ARG,
    json_out: bool = typer.Option(False, "--json", help="One JSON object per run instead of the table."),
    slurm_profile: Optional[Path] = typer.Option(None, "--slurm-profile", "-p",
                                                 help="Plan the runs as this profile's jobs train them (run ids "
                                                      "include the global batch, which depends on the GPU count)."),
) -> None:
    """Print the runs a sweep file expands to (validated; nothing is written)."""
    try:
        import json

        from lexfine.rundir import RunDir

        sweep = _load(sweep_file, slurm_profile)
        if json_out:
            for r in sweep.runs:
                typer.echo(json.dumps({"index": r.index, "run_id": r.run_id, "name": r.name, "run_dir": str(r.run_dir),
                                       "assignment": r.assignment, "eval": list(r.config.eval)}))
            return
        width = max(len(r.run_id) for r in sweep.runs)
        for r in sweep.runs:
            state = RunDir(r.run_dir).status or "new"
            typer.echo(f"{r.index:>3}  {r.run_id.ljust(width)}  {state:<11}  {r.describe()}")
        methods: dict[str, int] = {}
        for r in sweep.runs:
            methods[r.config.method] = methods.get(r.config.method, 0) + 1
        merged = f"; {sweep.merged} duplicate combinations merged" if sweep.merged else ""
        typer.echo(f"\nsweep {sweep.name}: {len(sweep.runs)} runs ("
                   + ", ".join(f"{n} {m}" for m, n in methods.items()) + f"){merged}")
        typer.echo(f"sweep directory: {_rel(sweep.sweep_dir)}   evaluations: {', '.join(sweep.eval) or 'none'}")
    except LexfineError as e:
        _fail(e)


@sweep_app.command("run")
def run(
    sweep_file: Path = SWEEP_ARG,
    only: Optional[List[str]] = typer.Option(None, "--only", help="Only these runs: run id, run name, glob "
                                             "(*lr1e-4*) or index; repeatable. Runs start in the order of the "
                                             "patterns (put the most important grid points first)."),
    gpus: str = typer.Option("auto", "--gpus", help="GPUs to pack runs onto, one process per run with its own "
                             "CUDA_VISIBLE_DEVICES: auto (every visible GPU; on a machine without one, runs go one "
                             "after another), none (one after another), or ids such as 0,1. A run with "
                             "launch.num_processes=k takes k GPUs at once."),
    runs_per_gpu: int = typer.Option(1, "--runs-per-gpu", min=1, help="Runs side by side on each GPU (small "
                                     "models). Above 1, a memory check refuses what does not fit: estimated peak "
                                     "per run x N vs the GPU's memory (docs/slurm.md)."),
    gpu_memory_per_run: Optional[float] = typer.Option(None, "--gpu-memory-per-run", min=0.1, help="GiB one run "
                                                       "needs (e.g. a measured peak_gpu_memory_gib), instead of "
                                                       "the estimate, for the --runs-per-gpu check and the "
                                                       "free-memory gate: a job starts only on a GPU with that much "
                                                       "memory free (nvidia-smi), else it waits."),
    gpu_wait: float = typer.Option(10.0, "--gpu-wait", min=0.0, help="GPU packing: minutes a job may wait for a "
                                   "GPU with --gpu-memory-per-run GiB free while nothing of the sweep runs (other "
                                   "processes hold the memory) before it fails with the reason."),
    retries: int = typer.Option(1, "--retries", min=0, help="Automatic retries of a run whose training failed "
                                "with a transient GPU failure (CUDA out of memory, cuDNN/cuBLAS allocation "
                                "failures); it resumes from its last checkpoint. 0: none. Other failures are "
                                "never retried."),
    retry_failed: bool = typer.Option(True, "--retry-failed/--skip-failed", help="Train runs that failed before again."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Train only; skip the evaluations."),
    in_process: bool = typer.Option(False, "--in-process", help="Train and evaluate in this process, one run "
                                    "after another (faster start; a crash stops the sweep). Default: one process "
                                    "per run."),
    launcher: str = typer.Option("accelerate", help="Runs with launch.num_processes > 1: accelerate or torchrun."),
    progress_every: float = typer.Option(60.0, "--progress-every", min=0.1, help="GPU packing: seconds between "
                                         "progress lines (done / running / queued, elapsed)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="One after another: stream training output "
                                 "(always in logs/)."),
) -> None:
    """Train and evaluate the runs locally, packed onto the GPUs on a GPU machine, else one after another. GPU
    packing: --gpus auto|none|0,1 (one process per run, each with its own CUDA_VISIBLE_DEVICES; a run with
    launch.num_processes=k takes k GPUs), --runs-per-gpu N (N runs side by side per GPU; refused when N x the
    estimated peak memory of a run exceeds the GPU's), --gpu-memory-per-run GiB (a measured peak instead of the
    estimate; with it, or with the estimate, a job starts only where nvidia-smi says that much is free, waiting up to
    --gpu-wait minutes while nothing of the sweep runs), --progress-every S; evaluations run as jobs of their own on
    free GPUs. --retries N (default 1): a training that fails with a transient GPU failure (CUDA out of memory,
    cuDNN/cuBLAS allocation failures) is queued again and resumes from its last checkpoint. Completed runs are
    skipped, incomplete ones resume from their last checkpoint, failures are listed at the end (exit code 1). Ctrl-C or
    SIGTERM: running trainings save a checkpoint and stop (exit code 75; run the same command to resume)."""
    from lexfine.errors import EXIT_INTERRUPTED

    try:
        from lexfine.sweep.gpus import select
        from lexfine.sweep.local import run_sweep, summary

        sweep = _load(sweep_file)
        chosen = _select(sweep, only)
        explicit = gpus.strip().lower() != "auto"
        if in_process and explicit and gpus.strip().lower() not in ("none", "cpu"):
            raise LexfineError(f"--in-process runs one run at a time in this process; drop --gpus {gpus} or "
                               "--in-process")
        devices = [] if in_process else select(gpus)
        if runs_per_gpu > 1 and not devices:
            raise LexfineError(f"--runs-per-gpu {runs_per_gpu} needs GPUs, and none is visible (--gpus {gpus}); "
                               "drop it to run one after another")
        typer.echo(f"sweep {sweep.name}: {len(chosen or sweep.runs)} runs in {_rel(sweep.sweep_dir)}")
        if devices:
            from lexfine.sweep.pack import run_packed

            outcomes = run_packed(sweep, devices, runs_per_gpu, only=chosen, retry_failed=retry_failed,
                                  evaluate=not no_eval, launcher=launcher, gpu_memory_per_run=gpu_memory_per_run,
                                  progress_s=progress_every, echo=typer.echo, retries=retries,
                                  gpu_wait_s=gpu_wait * 60)
        else:
            outcomes = run_sweep(sweep, only=chosen, retry_failed=retry_failed, evaluate=not no_eval,
                                 in_process=in_process, launcher=launcher, verbose=verbose, echo=typer.echo,
                                 retries=retries)
    except LexfineError as e:
        _fail(e)
    except KeyboardInterrupt:
        typer.secho("interrupted: run the same command again to resume", err=True)
        raise typer.Exit(130)
    typer.echo("\n" + summary(outcomes))
    typer.echo(f"status: lexfine sweep status {sweep_file}")
    if any(o.state in ("failed", "eval-failed") for o in outcomes):
        raise typer.Exit(1)
    if any(o.state in ("interrupted", "not-started") for o in outcomes):
        raise typer.Exit(EXIT_INTERRUPTED)


@sweep_app.command("status")
def status(
    sweep_file: Path = SWEEP_ARG,
    json_out: bool = typer.Option(False, "--json", help="One JSON object per run instead of the table."),
    no_slurm: bool = typer.Option(False, "--no-slurm", help="Do not ask squeue about queued jobs."),
) -> None:
    """A table of the sweep's runs: state, steps, final loss, evaluation metrics, wall time, SLURM job. A submitted
    sweep is shown with the run ids of its jobs (the profile of the last submission is kept in its slurm/ folder)."""
    try:
        import json

        from lexfine.sweep.status import collect, render

        sweep = _load(sweep_file, submitted=True)
        rows = collect(sweep, query_slurm=not no_slurm)
        if json_out:
            for row in rows:
                typer.echo(json.dumps(row))
        else:
            typer.echo(render(rows))
    except LexfineError as e:
        _fail(e)


@sweep_app.command("submit")
def submit(
    sweep_file: Path = SWEEP_ARG,
    slurm_profile: Path = typer.Option(..., "--slurm-profile", "-p",
                                       help="Cluster profile YAML (e.g. configs/slurm/cscs_alps.yaml)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write the scripts and print the sbatch commands; submit nothing."),
    only: Optional[List[str]] = ONLY_OPT,
    force: bool = typer.Option(False, "--force", help="Submit completed runs and runs with a queued job again."),
    workdir: Optional[Path] = typer.Option(None, help="Working directory of the jobs (default: the profile's, else here)."),
) -> None:
    """Write one sbatch script per run (and a dependent evaluation job) and submit them to SLURM."""
    try:
        from lexfine.sweep.slurm import load_profile
        from lexfine.sweep.slurm import submit as do_submit

        sweep = _load(sweep_file)
        profile = load_profile(slurm_profile)
        chosen = _select(sweep, only)
        typer.echo(f"sweep {sweep.name}: {len(chosen or sweep.runs)} runs; scripts in {_rel(sweep.sweep_dir / 'slurm')}")
        records = do_submit(sweep, profile, dry_run=dry_run, force=force, only=chosen,
                            workdir=str(workdir.absolute()) if workdir else None, echo=typer.echo)
    except LexfineError as e:
        _fail(e)
    if dry_run:
        typer.echo(f"\ndry run: {len(records)} training scripts written, nothing submitted")
    else:
        typer.echo(f"\nsubmitted {len(records)} runs; job ids in {_rel(sweep.sweep_dir / 'sweep.jsonl')}")
        typer.echo(f"status: lexfine sweep status {sweep_file}")


def register(app: typer.Typer) -> None:
    app.add_typer(sweep_app, name="sweep")
