"""Which failed trainings a sweep retries by itself: transient GPU failures only.

Runs packed several to a GPU, next to processes the sweep did not start, fail now and then for want of memory at
that moment: a CUDA OOM as a run starts, cuDNN attention that cannot get its workspace (`mha_graph.execute`), a cuBLAS
handle that cannot be allocated, a collective that timed out while a peer waited for memory. Run again, they resume
from their last checkpoint and complete (2026-11-28, 4 x H200: two such runs at step 258/263 of 266 completed in
60 s when the sweep was run again). Everything else (a config or data error, exit code 2; divergence, exit code 65;
an exception in the code) fails the same way every time and is never retried.

The reason is looked for in the manifest's error (what `lexfine train` recorded) and the last lines of the log of
the attempt (what another rank of a multi-process run, or a killed process, left there).
"""

from __future__ import annotations

import re
from pathlib import Path

from lexfine.errors import EXIT_USER_ERROR

TRANSIENT = re.compile(
    r"OutOfMemoryError|CUDA out of memory|CUDA (?:driver )?error: out of memory"
    r"|mha_graph\.execute"
    r"|CUDNN_STATUS_(?:ALLOC_FAILED|EXECUTION_FAILED|INTERNAL_ERROR|MAPPING_ERROR)"
    r"|cuDNN error: .*(?:EXECUTION_FAILED|ALLOC_FAILED)"
    r"|CUBLAS_STATUS_(?:ALLOC_FAILED|NOT_INITIALIZED|EXECUTION_FAILED)"
    r"|Watchdog caught collective operation timeout|NCCL (?:communicator was aborted|.*[Tt]imed? ?out)"
)
LOG_LINES = 40


def _latest_attempt(log: Path | None) -> list[str]:
    if log is None:
        return []
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return text.rsplit("\n=== ", 1)[-1].splitlines()[1:][-LOG_LINES:]  # the runner's "=== <time> <cmd>" header


def transient_reason(code: int, error: str | None, log: Path | None = None) -> str | None:
    """The one line that makes a failed training (exit `code`, manifest `error`) a transient GPU failure worth
    retrying, or None: not transient, never retried."""
    if code == 0 or code == EXIT_USER_ERROR:
        return None
    for line in [*(str(error).splitlines() if error else []), *reversed(_latest_attempt(log))]:
        if TRANSIENT.search(line):
            return line.strip()[:300]
    return None


def plural(n: int) -> str:
    return f"{n} retr{'y' if n == 1 else 'ies'}"
