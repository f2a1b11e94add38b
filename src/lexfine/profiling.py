"""Where the time of a window of steps goes: torch.profiler over steps FIRST..LAST (1-based, inclusive), written to a
folder (shared by training, `train.profile_steps`, and evaluation, `LEXFINE_EVAL_PROFILE`):

    summary.json   wall time of the window, device (GPU) busy time by kernel family (matmul, attention,
                   Triton/inductor, elementwise and other), busy fraction, steps, tokens
    ops.txt        the operators and kernels with the most device time, then the most host (CPU) time
    trace.json.gz  the Chrome/Perfetto trace (open in ui.perfetto.dev)

A diagnostic: it slows the profiled steps a little and changes nothing they compute. A failure to write it is a
warning, never an error of the work it watches.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger("lexfine")

# kernel-name fragments -> family (first match wins); names are CUDA kernel names as the profiler reports them
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
FAMILIES = (
    ("attention", ("flash", "fmha", "attention", "cudnn_generated_fort_native_sdpa", "sdpa")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "sm80_", "cublas", "wgmma", "splitk")),
    ("triton", ("triton_",)),
    ("copy/elementwise", ("elementwise", "vectorized", "copy", "memcpy", "memset", "fill", "cat", "index")),
)


def family(kernel_name: str) -> str:
    name = kernel_name.lower()
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other"


def summarize(trace_events: list[dict], wall_s: float, steps: int, tokens: float | None) -> dict:
    """Device busy time by kernel family from a Chrome trace's events (kernels, memcpys, memsets; `dur` in us)."""
    busy: dict[str, float] = {}
    for e in trace_events:
        if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES:
            fam = "copy/elementwise" if e["cat"] != "kernel" else family(str(e.get("name", "")))
            busy[fam] = busy.get(fam, 0.0) + float(e.get("dur", 0.0)) / 1e6
    total = sum(busy.values())
    return {
        "steps": steps,
        "wall_s": round(wall_s, 4),
        "s_per_step": round(wall_s / steps, 4) if steps else None,
        "device_busy_s": round(total, 4),
        "device_busy_fraction": round(total / wall_s, 4) if wall_s > 0 else None,
        "device_s_by_family": {k: round(v, 4) for k, v in sorted(busy.items(), key=lambda kv: -kv[1])},
        "real_tokens": tokens,
        "tokens_per_s": round(tokens / wall_s, 1) if tokens and wall_s > 0 else None,
    }


class ProfileWindow:
    """`begin(step, tokens)` before each step and `end(step, tokens)` after it (steps counted from 1): the profiler runs
    from the start of step `first` to the end of step `last`, then `out_dir` is written."""

    def __init__(self, out_dir: Path, first: int, last: int):
        self.out_dir = Path(out_dir)
        self.first, self.last = first, last
        self.prof = None
        self.t0 = None
        self.tokens0 = 0.0
        self.done = False

    def begin(self, step: int, tokens: float = 0.0) -> None:
        if self.done or self.prof is not None or step != self.first:
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        _sync()
        self.prof = profile(activities=activities, record_shapes=False, with_stack=False)
        self.prof.__enter__()
        self.t0 = time.perf_counter()
        self.tokens0 = float(tokens or 0)

    def end(self, step: int, tokens: float = 0.0, force: bool = False) -> None:
        """After step `step`; `force`: the work ended inside the window, keep what was recorded."""
        if self.prof is None or (step < self.last and not force):
            return
        _sync()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        prof, self.prof, self.done = self.prof, None, True
        steps = min(step, self.last) - self.first + 1
        try:
            self.write(prof, wall, steps, (float(tokens or 0) - self.tokens0) or None)
        except Exception as e:  # a diagnostic must never fail the work it watches
            log.warning("profile: could not write %s: %s", self.out_dir, e)

    def write(self, prof, wall: float, steps: int, tokens: float | None) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        raw = self.out_dir / "trace.json"
        prof.export_chrome_trace(str(raw))
        events = json.loads(raw.read_text()).get("traceEvents", [])
        with open(raw, "rb") as src, gzip.open(self.out_dir / "trace.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        summary = summarize(events, wall, steps, tokens)
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        ka = prof.key_averages()
        text = [f"# steps {self.first}-{self.first + steps - 1}: {json.dumps(summary)}", ""]
        if summary["device_busy_s"] > 0:
            text += ["## by device time", ka.table(sort_by="self_device_time_total", row_limit=40,
                                                   max_name_column_width=90), ""]
        text += ["## by host time", ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90)]
        (self.out_dir / "ops.txt").write_text("\n".join(text) + "\n")
        log.info("profile of steps %d-%d: %s", self.first, self.first + steps - 1, json.dumps(summary))


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
