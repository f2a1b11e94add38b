"""A full disk (or an exhausted quota) during training becomes one line: which path is full, and that the
checkpoints already complete are kept, so freeing space and running the same command resumes the run.

Checkpoints are written by the Trainer (torch/safetensors), metrics.jsonl and the manifest by lexfine: any of them
can hit ENOSPC, and the error may arrive wrapped (safetensors reports `IoError(Os { code: 28, kind: StorageFull })`,
a failure while marking the run failed chains onto the first one). The whole exception chain is searched.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

from lexfine.errors import LexfineError

CODES = (errno.ENOSPC, errno.EDQUOT)
TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull", "QuotaExceeded")


class DiskFullError(LexfineError):
    """No space (or quota) left where the run writes."""


def disk_full_cause(exc: BaseException) -> BaseException | None:
    """The exception in `exc`'s chain (itself, __cause__, __context__) that says the disk is full, if any."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in CODES:
            return e
        if any(t in str(e) for t in TEXTS):
            return e
        todo += [e.__cause__, e.__context__]
    return None


def message(cause: BaseException, run_dir: str | Path) -> str:
    path = getattr(cause, "filename", None) or run_dir
    reason = os.strerror(cause.errno) if isinstance(cause, OSError) and cause.errno in CODES else "no space left"
    return (f"{reason} while writing {str(path)!r}: the last complete checkpoint in "
            f"{str(Path(run_dir) / 'checkpoints')!r} is kept; free space there (or set output_dir to another disk "
            "and copy the run directory) and run the same command again to resume")


@contextmanager
def full_disk_is_one_line(run_dir: str | Path):
    """Re-raise a full-disk error from the block as DiskFullError (exit code 2 through the CLI)."""
    try:
        yield
    except LexfineError:
        raise
    except Exception as e:
        cause = disk_full_cause(e)
        if cause is None:
            raise
        raise DiskFullError(message(cause, run_dir)) from None
