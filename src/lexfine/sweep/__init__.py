"""Sweeps: a grid of runs from one file, run locally one after another or submitted to SLURM.

    grid.py     sweep file -> validated, deduplicated list of PlannedRun (stable run ids)
    local.py    sweep directory, sweep.jsonl, the sequential local runner
    status.py   the status table (state, steps, final loss, eval metrics, wall time)
    slurm.py    sbatch scripts from a profile, submission, job ids
    cli.py      `lexfine sweep plan|run|status|submit`

A sweep never knows more about a run than its run directory (see lexfine.rundir).
"""
