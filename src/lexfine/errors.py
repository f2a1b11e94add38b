"""User-facing errors: one line naming the bad value and the fix, never a traceback.

Exit codes of `lexfine train` (and of `python -m lexfine.train`), documented in docs/contracts.md:
    0   completed (or already completed: skipped)
    1   failed (a bug or an environment error; the manifest holds the traceback)
    2   a user error (config, data, paths): one line on stderr
    65  diverged: training stopped on non-finite losses; the last finite checkpoint is kept
    73  the run is locked by another live process (another `lexfine train` or sweep runner): nothing was done
    75  interrupted (SIGTERM/SIGUSR1): in training a checkpoint was saved and running the same command again
        resumes; before training nothing was lost; during the evaluations after training the run stays completed
"""

EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 65
EXIT_LOCKED = 73
EXIT_INTERRUPTED = 75


class LexfineError(Exception):
    """An error caused by user input (config, data, paths). The CLI prints it as one line and exits 2."""


class ConfigError(LexfineError):
    pass


class DataError(LexfineError):
    pass


class ModelError(LexfineError):
    pass


def exit_code_for_status(status: str | None) -> int:
    """What `lexfine train` exits with once run() returned, from the run's manifest status."""
    return {"interrupted": EXIT_INTERRUPTED, "diverged": EXIT_DIVERGED}.get(status or "", 0)
