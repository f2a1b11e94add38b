"""Sweeps: a grid of runs from one file, run locally (packed onto the GPUs, or one after another) or on SLURM.

    grid.py     sweep file -> validated, deduplicated list of PlannedRun (stable run ids)
    local.py    sweep directory, sweep.jsonl, the sequential local runner
    pack.py     the packed local runner: jobs on GPU slots, one process each (lexfine sweep run --gpus)
    gpus.py     which GPUs (--gpus auto|none|ids) and their memory
    memory.py   a run's peak GPU memory from its config, the --runs-per-gpu check
    status.py   the status table (state, steps, final loss, eval metrics, wall time)
    slurm.py    sbatch scripts from a profile, submission, job ids
    cli.py      `lexfine sweep plan|run|status|submit`

A sweep never knows more about a run than its run directory (see lexfine.rundir).
"""
