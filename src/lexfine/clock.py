"""When this process started, for timings measured from process start (training's manifest, evaluation's summary)."""

from __future__ import annotations

import os
import time

import lexfine


def process_start_time() -> float:
    """This process's start as a Unix time: from /proc (10 ms resolution), else when lexfine was first imported."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22; the name in (...) may hold spaces
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        if age >= 0:
            return time.time() - age
    except (OSError, ValueError, IndexError):
        pass
    return lexfine.IMPORTED_AT


def since_process_start() -> float:
    return time.time() - process_start_time()
