"""The `lexfine` command line: one typer app; heavy imports happen inside the commands."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from lexfine.errors import EXIT_USER_ERROR, LexfineError

app = typer.Typer(
    help="Fine-tune LLMs on a domain task and measure what it costs in general knowledge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from lexfine import __version__

        typer.echo(f"lexfine {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Fine-tune LLMs on a domain task and measure what it costs in general knowledge."""


config_app = typer.Typer(help="Inspect configuration keys and resolved configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

# Sub-commands owned by other packages; each module exposes register(app).
PLUGINS = ("lexfine.eval.cli", "lexfine.sweep.cli", "lexfine.report.cli")


def _setup_logging() -> None:
    from lexfine import logs

    logs.setup()


@app.command()
def train(
    config: Path = typer.Argument(..., help="Experiment YAML (e.g. configs/exp/sjp_lora_apertus8b.yaml)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides: train.lr=1e-4 lora.r=64 ..."),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", help="Same as launch.num_processes=N."),
    strategy: Optional[str] = typer.Option(None, "--strategy", "--accelerate-config",
                                           help="Same as launch.strategy: none, ddp, zero2, zero3 or fsdp2."),
    launcher: str = typer.Option("accelerate", help="For launch.num_processes > 1: accelerate or torchrun."),
    force: bool = typer.Option(False, "--force", help="Delete an existing run directory (even a completed one) first."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, print the run directory and stop."),
) -> None:
    """Train one run (LoRA or full). Re-running the same command resumes it; a completed run is skipped.
    The last line printed is the run directory."""
    import shutil

    from lexfine.config import load_config
    from lexfine.train.launch import in_distributed_launch, local_command, shell

    extra = list(overrides or [])
    if num_processes is not None:
        extra.append(f"launch.num_processes={num_processes}")
    if strategy is not None:
        extra.append(f"launch.strategy={strategy}")
    cfg = load_config(config, extra)
    rd_path = cfg.run_dir()
    if force and rd_path.exists() and not dry_run and not in_distributed_launch():
        from lexfine.runlock import RunLockedError, lock_holder

        holder = lock_holder(rd_path)
        if holder:  # never delete a run that is training
            raise RunLockedError(rd_path, holder)
        typer.echo(f"--force: deleting {rd_path}", err=True)
        shutil.rmtree(rd_path)
    if dry_run:
        typer.echo(cfg.to_yaml())
        typer.echo(rd_path)
        return
    _setup_logging()
    from lexfine.errors import EXIT_DIVERGED, exit_code_for_status
    from lexfine.rundir import RunDir

    if cfg.launch.num_processes > 1 and not in_distributed_launch():
        from lexfine.quantize import check_runtime
        from lexfine.runlock import RunLock

        rd = RunDir(rd_path)
        if rd.status == "completed":  # skipped before any process starts (each would only find it completed)
            typer.echo(f"run {cfg.run_id()} is already completed: {rd_path} (`lexfine train --force` trains it again)",
                       err=True)
            typer.echo(rd.path)
            return
        check_runtime(cfg)
        cmd = local_command(rd.config_path, cfg.launch.num_processes, launcher, cfg.launch.num_machines,
                            cfg.launch.strategy)
        with RunLock(rd.path) as lock:  # held here; the launched processes inherit it (LEXFINE_RUN_LOCK)
            rd.create(cfg.to_yaml(), cfg.run_id())  # after the command is known to be valid
            typer.echo(f"launching: {shell(cmd)}", err=True)
            code = _call_forwarding_signals(cmd, lock.child_env())
        code = exit_code_for_status(rd.status) or code
        if code == EXIT_DIVERGED:  # the launcher reports a failed child as 1: say what happened
            typer.secho(f"error: {rd.manifest().get('error')}", err=True, fg=typer.colors.RED)
        if code:
            raise typer.Exit(code)
        typer.echo(rd.path)
        return
    from lexfine.errors import EXIT_INTERRUPTED
    from lexfine.train import run
    from lexfine.train.launch import pin_single_process
    from lexfine.train.signals import Interrupted

    pin_single_process(cfg.launch.num_processes)
    try:
        rd = run(cfg)
    except Interrupted as e:  # SIGTERM/SIGUSR1 outside the training loop (typer would turn it into exit 130)
        typer.echo(f"error: {e}; the run directory says what was kept: {rd_path}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    typer.echo(rd.path)
    if exit_code_for_status(rd.status):
        typer.echo(f"run {rd.status}: {rd.manifest().get('error') or ''}", err=True)
        raise typer.Exit(exit_code_for_status(rd.status))


def _call_forwarding_signals(cmd: list[str], env: dict) -> int:
    """Run the launcher in its own process group. SIGTERM/SIGUSR1 sent to this process reach the training processes
    as SIGUSR1 (checkpoint and stop at the next step); the launcher ignores SIGUSR1 (its default action would kill
    it, and a launcher's SIGTERM handling kills its workers after a short grace). SIGINT is passed on as is."""
    import signal
    import subprocess

    def ignore_usr1():
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the training processes install their own handler

    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=ignore_usr1)

    def forward(signum, frame):
        try:
            os.killpg(proc.pid, signal.SIGINT if signum == signal.SIGINT else signal.SIGUSR1)
        except ProcessLookupError:
            pass

    forwarded = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    previous = {s: signal.signal(s, forward) for s in forwarded}
    try:
        return proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A completed run directory, or <run>@best: the checkpoint "
                                             "eval_during.select kept."),
    out: Path = typer.Option(..., "--out", help="Where to write a standalone Hugging Face model directory."),
    merge: bool = typer.Option(True, help="LoRA runs: merge the adapter into the base weights."),
) -> None:
    """Write a run's model as a standalone Hugging Face directory (LoRA merged into the base by default)."""
    from lexfine.export import export_run

    typer.echo(export_run(run_dir, out, merge=merge))


@app.command()
def quickstart(
    out: Path = typer.Option(Path("quickstart"), help="Folder for the run, its evaluations and the report."),
    steps: int = typer.Option(20, help="Training steps (4 cases each)."),
    eval_limit: int = typer.Option(40, help="Cases per evaluation (SJP and LEXam), before and after."),
) -> None:
    """Fine-tune the embedded SmolLM2-135M with LoRA on bundled SJP cases (CPU, a few minutes), evaluate SJP and
    LEXam MCQ-4 before and after, and write a report."""
    from lexfine.quickstart import run_quickstart

    _setup_logging()
    typer.echo(run_quickstart(out, steps=steps, eval_limit=eval_limit))


@config_app.command("keys")
def config_keys(prefix: str = typer.Argument("", help="Only keys starting with this, e.g. lora.")) -> None:
    """Every config key with its default and documentation."""
    from lexfine.config import describe_fields

    for key, default, doc in describe_fields():
        if key.startswith(prefix):
            typer.echo(f"{key} = {default}\n    {' '.join(doc.split())}")


@config_app.command("show")
def config_show(
    config: Optional[Path] = typer.Argument(None, help="Experiment YAML (none: the defaults)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides."),
) -> None:
    """Print the fully resolved config and its run directory."""
    from lexfine.config import load_config

    cfg = load_config(config, overrides or [])
    t = cfg.train
    typer.echo(cfg.to_yaml() + f"# global batch: {cfg.global_batch} (train.batch_size {t.batch_size} x train.grad_accum "
               f"{t.grad_accum} x launch.num_processes {cfg.launch.num_processes}; part of the run id)\n"
               f"# run directory: {cfg.run_dir()}")


def _register_plugins() -> None:
    for name in PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue  # that part of lexfine is not installed in this build
            raise
        module.register(app)


_register_plugins()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2 (or the error's own exit_code,
    errors.py), not a traceback."""
    from lexfine import compile_cache
    from lexfine.errors import EXIT_LOCKED, EXIT_USER_ERROR

    compile_cache.adopt()  # before torch's inductor is imported: compiled kernels outlive the run (compile_cache.py)
    try:
        app(args=argv)
    except LexfineError as e:
        from lexfine.rundir import redact
        from lexfine.runlock import RunLockedError

        typer.secho(f"error: {redact(str(e))}", err=True, fg=typer.colors.RED)
        sys.exit(getattr(e, "exit_code", EXIT_LOCKED if isinstance(e, RunLockedError) else EXIT_USER_ERROR))
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
