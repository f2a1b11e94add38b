"""Causal attention of one scoring batch, grouped-query heads (Apertus-8B: 32 query heads, 8 key/value heads, head
dim 128): what each SDPA route costs on this GPU, eager and through inductor, and which kernels it runs.

    python benchmarks/attention_gqa.py                     # GPU; one batch of ~32k tokens (19 rows x 1,680)
    python benchmarks/attention_gqa.py --rows 8 --length 4096

Inputs come as the projections make them ([batch, tokens, heads, dim], transposed to heads-first as transformers
does), so layout copies count. Routes:
  repeat      K/V repeated to 32 heads (transformers' repeat_kv), SDPA picks its kernel (cuDNN on Hopper)
  gqa         SDPA(enable_gqa=True) with 8 K/V heads, SDPA picks (what transformers passes when there is no mask)
  gqa-flash   the same, flash kernel only (it reads grouped heads natively)
  gqa-cudnn   the same, cuDNN kernel only (fails if this torch's cuDNN route takes no grouped heads)
Printed per route: ms per call (median of --iters after warm-up) and the three kernels with the most device time.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=19)
    ap.add_argument("--length", type=int, default=1680)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dev, dt = "cuda", torch.bfloat16
    b, t, h, hk, d = a.rows, a.length, a.heads, a.kv_heads, a.head_dim
    q = torch.randn(b, t, h, d, device=dev, dtype=dt)
    k = torch.randn(b, t, hk, d, device=dev, dtype=dt)
    v = torch.randn(b, t, hk, d, device=dev, dtype=dt)
    backends = {"gqa-flash": [SDPBackend.FLASH_ATTENTION], "gqa-cudnn": [SDPBackend.CUDNN_ATTENTION]}

    def repeat(q, k, v):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        k, v = (x[:, :, None].expand(b, hk, h // hk, t, d).reshape(b, h, t, d) for x in (k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    def gqa(q, k, v):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)

    ref = repeat(q, k, v).float()
    rows = []
    for route in ("repeat", "gqa", "gqa-flash", "gqa-cudnn"):
        fn = repeat if route == "repeat" else gqa
        for mode in ("eager", "compiled"):
            torch._dynamo.reset()
            f = torch.compile(fn) if mode == "compiled" else fn
            try:
                with sdpa_kernel(backends[route]) if route in backends else nullcontext():
                    out = f(q, k, v)
                    err = (out.float() - ref).abs().max().item()
                    for _ in range(3):
                        f(q, k, v)
                    times = []
                    for _ in range(a.iters):
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        f(q, k, v)
                        e.record()
                        e.synchronize()
                        times.append(s.elapsed_time(e))
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        f(q, k, v)
                        torch.cuda.synchronize()
                kern = sorted(((ev.device_time_total, ev.key) for ev in prof.key_averages()
                               if ev.device_time_total > 0), reverse=True)[:3]
                row = {"route": route, "mode": mode, "ms": sorted(times)[len(times) // 2], "max_abs_err": err,
                       "kernels": [(name[:90], round(us / 1000, 3)) for us, name in kern]}
            except Exception as e:  # a route this torch does not offer
                row = {"route": route, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{b} rows x {t} tokens, {h} query / {hk} key-value heads, head dim {d}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    print(f"{'route':<10} {'mode':<9} {'ms/call':>8}  top kernel")
    for r in rows:
        if "error" in r:
            print(f"{r['route']:<10} {r['mode']:<9} {'-':>8}  {r['error'][:80]}")
        else:
            print(f"{r['route']:<10} {r['mode']:<9} {r['ms']:8.3f}  {r['kernels'][0][0][:70]}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"shape": [b, t, h, hk, d], "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
