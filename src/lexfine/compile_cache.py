"""Where torch.compile's output persists between runs: lexfine's cache folder, unless the user chose a folder.

Inductor writes its compiled graphs (FX graph and AOTAutograd caches), the Triton kernels they launch and its C++
builds under $TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_<user>. On a cluster /tmp is node-local and
under SLURM often a per-job folder, so every run of a sweep would compile from nothing: on one H200 the shipped
8B LoRA config reached the end of step 1 72 s after process start with an empty cache and 45 s with a warm one
(docs/performance.md, "Start-up, the compile cache, ..."). The lexfine CLI entry points therefore point it at
`compile/inductor` in lexfine's cache folder ($LEXFINE_CACHE, default ~/.cache/lexfine; a cluster's home is
usually shared by its nodes; ~30 MB for the 8B config). A TORCHINDUCTOR_CACHE_DIR the user set is kept (set it to a
node-local folder where the shared file system is slow or has no working file locks). The entries are keyed by
the torch and Triton versions, the GPU and the traced graph, and written atomically, so concurrent runs (several
nodes, packed runs on one GPU) can share the folder; deleting it only costs the next run a cold compilation.

They also set TORCHINDUCTOR_VEC_ISA_OK=0 unless it is set: otherwise inductor probes which CPU vector instruction
sets work, in every process, by building a test library per instruction set and loading each in a new Python
process that imports torch (24 s of a warm start on the H200 host, cProfile). lexfine compiles with inductor only
on a GPU (CPU runs use aot_eager), where the answer only decides whether a stray CPU kernel is vectorised.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "TORCHINDUCTOR_CACHE_DIR"
VEC_ISA_ENV = "TORCHINDUCTOR_VEC_ISA_OK"


def default_dir() -> Path:
    from lexfine.models import cache_dir

    return cache_dir() / "compile" / "inductor"


def _can_create(path: Path) -> bool:
    """Whether `path` is, or can be made, a folder this process writes to (its nearest existing part decides)."""
    for p in (path, *path.parents):
        if p.exists():
            return p.is_dir() and os.access(p, os.W_OK | os.X_OK)
    return False


def adopt() -> str | None:
    """Set $TORCHINDUCTOR_CACHE_DIR to lexfine's compile cache and $TORCHINDUCTOR_VEC_ISA_OK to 0, each unless it is
    set; return the folder in use (None: torch's default). Call it before torch's inductor is imported (it reads
    both once, at import). A cache folder that cannot be written (a read-only home) leaves torch's default."""
    if not os.environ.get(ENV) and _can_create(folder := default_dir()):
        os.environ[ENV] = str(folder)
    if not os.environ.get(VEC_ISA_ENV):
        os.environ[VEC_ISA_ENV] = "0"
    return in_use()


def in_use() -> str | None:
    """The folder compiled kernels go to in this process (None before anything resolved it)."""
    return os.environ.get(ENV) or None


def stats() -> dict:
    """This process's compilation so far: seconds in Dynamo's frame compilations (tracing, AOTAutograd and
    inductor, loading from the caches included) and the cache hits and misses of the compiled graphs."""
    try:
        from torch._dynamo.utils import compilation_time_metrics, counters
    except Exception:  # torch without Dynamo
        return {}
    hits = {
        "fxgraph_hits": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_misses": counters["inductor"]["fxgraph_cache_miss"],
        "aotautograd_hits": counters["aot_autograd"]["autograd_cache_hit"],
        "aotautograd_misses": counters["aot_autograd"]["autograd_cache_miss"],
    }
    return {"compile_s": round(sum(compilation_time_metrics.get("_compile.compile_inner", [])), 2),
            "compile_cache": {k: int(v) for k, v in hits.items()}}
