"""Where an Apertus MLP's xIELU spends its GPU time in scoring, and whether a hand-written kernel saves any (issue 19).

In an FP8 batch of `lexfine eval --fp8`, inductor's kernel for xIELU fused with the per-row FP8 scaling of
down_proj's input took 14% of the GPU time (docs/performance.md). Two suspected costs: inductor computes the softplus
of xIELU's two learned scalars again for every element, and its looped reduction computes the activation twice per
row. This benchmark times, on one MLP of the real architecture (random weights) and T tokens (a prompt batch of SJP
scoring holds ~32k), with CUDA events (median of --reps after a warm-up that compiles):

  act bf16  compiled xielu_math (what scoring runs) | compiled, the two coefficients passed in precomputed |
            Triton, one program per row, coefficients precomputed (libdevice expm1, as inductor; +fast: exp - 1)
  act fp8   compiled xielu_math + torchao's per-row scaling (what `--fp8` runs) | the same, coefficients passed in |
            Triton: xIELU, the row's maximum, the FP8 row and its scale in one program per row (chunk: columns held
            at once; 32768 holds the 8B's whole row and reads it once), scale rounded to bf16 as torchao's is
  mlp fp8   the whole MLP as `--fp8` compiles it (torchao FP8 linears, compiled xIELU): the activation's share

with how far the Triton FP8 rows and scales are from the compiled path's. Needs a CUDA GPU, Triton and torchao.

    python benchmarks/xielu_kernels.py --tokens 32768 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

FP8_MAX = 448.0
FLOOR = 1e-12  # lexfine.eval.fp8.ACTIVATION_FLOOR


@triton.jit
def _act(x, ap, an, beta, eps, FAST: tl.constexpr):
    xn = tl.minimum(x, eps)
    if FAST:  # ex2.approx: not what inductor computes; the bound on what a cheaper expm1 would save
        em1 = tl.exp(xn) - 1.0
    else:
        em1 = libdevice.expm1(xn)
    return tl.where(x > 0, ap * x * x + beta * x, (em1 - x) * an + beta * x)


@triton.jit
def _xielu_kernel(x_ptr, y_ptr, coef_ptr, n_cols, beta, eps, BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
                  FAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ap = tl.load(coef_ptr)
    an = tl.load(coef_ptr + 1)
    for c in range(CHUNKS):
        cols = c * BLOCK + tl.arange(0, BLOCK)
        m = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * n_cols + cols, _act(x, ap, an, beta, eps, FAST).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _xielu_fp8_kernel(x_ptr, q_ptr, s_ptr, coef_ptr, n_cols, beta, eps, floor, FMAX: tl.constexpr,
                      BLOCK: tl.constexpr, CHUNKS: tl.constexpr, FAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ap = tl.load(coef_ptr)
    an = tl.load(coef_ptr + 1)
    if CHUNKS == 1:  # the whole row in registers: read once
        cols = tl.arange(0, BLOCK)
        m = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=m, other=0.0)
        y = _act(x.to(tl.float32), ap, an, beta, eps, FAST).to(x.dtype).to(tl.float32)  # the bf16 activation
        amax = tl.max(tl.where(m, tl.abs(y), 0.0), axis=0)
        scale = (tl.maximum(amax, floor) / FMAX).to(tl.bfloat16).to(tl.float32)  # torchao divides in bf16
        tl.store(q_ptr + row * n_cols + cols, tl.clamp(y / scale, -FMAX, FMAX).to(q_ptr.dtype.element_ty), mask=m)
    else:  # chunk by chunk: the row's maximum, then the row again (from L2) to scale and store it
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(CHUNKS):
            cols = c * BLOCK + tl.arange(0, BLOCK)
            m = cols < n_cols
            x = tl.load(x_ptr + row * n_cols + cols, mask=m, other=0.0)
            y = _act(x.to(tl.float32), ap, an, beta, eps, FAST).to(x.dtype).to(tl.float32)
            acc = tl.maximum(acc, tl.where(m, tl.abs(y), 0.0))
        scale = (tl.maximum(tl.max(acc, axis=0), floor) / FMAX).to(tl.bfloat16).to(tl.float32)
        for c in range(CHUNKS):
            cols = c * BLOCK + tl.arange(0, BLOCK)
            m = cols < n_cols
            x = tl.load(x_ptr + row * n_cols + cols, mask=m, other=0.0)
            y = _act(x.to(tl.float32), ap, an, beta, eps, FAST).to(x.dtype).to(tl.float32)
            tl.store(q_ptr + row * n_cols + cols, tl.clamp(y / scale, -FMAX, FMAX).to(q_ptr.dtype.element_ty),
                     mask=m)
    tl.store(s_ptr + row, scale)


def _grid(x: torch.Tensor, chunk: int) -> tuple[int, int, int, int, int]:
    n = x.shape[-1]
    block = min(triton.next_power_of_2(n), chunk)
    return x.numel() // n, n, block, triton.cdiv(n, block), max(4, min(32, block // 1024))


def xielu_rows(x, coef, beta, eps, chunk=2048, fast=False):
    rows, n, block, chunks, warps = _grid(x, chunk)
    y = torch.empty_like(x)
    _xielu_kernel[(rows,)](x, y, coef, n, beta, eps, BLOCK=block, CHUNKS=chunks, FAST=fast, num_warps=warps)
    return y


def xielu_fp8_rows(x, coef, beta, eps, chunk=2048, fast=False):
    rows, n, block, chunks, warps = _grid(x, chunk)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    _xielu_fp8_kernel[(rows,)](x, q, s, coef, n, beta, eps, FLOOR, FMAX=FP8_MAX, BLOCK=block, CHUNKS=chunks,
                               FAST=fast, num_warps=warps)
    return q, s


def coefficients(act) -> torch.Tensor:
    """[alpha_p, alpha_n] of a transformers XIELUActivation in float32, as lexfine.kernels.xielu.xielu_math has them."""
    import torch.nn.functional as F

    return torch.cat([F.softplus(act.alpha_p.float()).reshape(1),
                      (act._beta_scalar + F.softplus(act.alpha_n.float())).reshape(1)])


def xielu_from_coefficients(x, coef, beta: float, eps: float):
    xf = x.float()
    pos = coef[0] * xf * xf + beta * xf
    neg = (torch.expm1(torch.clamp(xf, max=eps)) - xf) * coef[1] + beta * xf
    return torch.where(xf > 0, pos, neg).to(x.dtype)


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="apertus-8b")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args()

    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8
    from transformers import AutoConfig
    from transformers.models.apertus.modeling_apertus import ApertusMLP

    from lexfine import models
    from lexfine.eval import fp8
    from lexfine.kernels.xielu import patch_xielu, xielu_math

    cfg = AutoConfig.from_pretrained(models.KNOWN_ARCHS[a.arch])
    cfg.dtype = torch.bfloat16
    torch.manual_seed(0)
    rows_out: list[dict] = []
    tokens = a.tokens

    def row(group: str, name: str, ms: float, **extra) -> None:
        r = {"group": group, "variant": name, "tokens": tokens, "ms": round(ms, 4), **extra}
        rows_out.append(r)
        print(json.dumps(r), flush=True)

    mlp = ApertusMLP(cfg).to("cuda", torch.bfloat16).eval()
    act = mlp.act_fn
    beta, eps = act._beta_scalar, act._eps_scalar
    x = torch.randn(tokens, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        h = mlp.up_proj(x)
        coef = coefficients(act)
        n = h.shape[-1]

        now = torch.compile(xielu_math, dynamic=False)
        once = torch.compile(xielu_from_coefficients, dynamic=False)
        y_now = now(h, act.alpha_p, act.alpha_n, beta, eps)
        row("act bf16", "compiled xielu_math (what scoring runs)",
            timed(lambda: now(h, act.alpha_p, act.alpha_n, beta, eps), a.reps))
        row("act bf16", "compiled, coefficients passed in", timed(lambda: once(h, coef, beta, eps), a.reps))
        for chunk in (1024, 2048, 32768):
            for fast in (False, True):
                y = xielu_rows(h, coef, beta, eps, chunk, fast)
                row("act bf16", f"triton, chunk {chunk}{' +fast' if fast else ''}",
                    timed(lambda: xielu_rows(h, coef, beta, eps, chunk, fast), a.reps),
                    differing_from_compiled=float((y != y_now).float().mean()))

        def scaled(y):
            scale = _choose_scale_float8(y, block_size=[1, n], hp_value_lb=FLOOR)
            return _quantize_affine_float8(y, scale), scale

        now8 = torch.compile(lambda t: scaled(xielu_math(t, act.alpha_p, act.alpha_n, beta, eps)), dynamic=False)
        once8 = torch.compile(lambda t: scaled(xielu_from_coefficients(t, coef, beta, eps)), dynamic=False)
        q_now, s_now = now8(h)
        s_now = s_now.reshape(-1, 1)
        row("act fp8", "compiled xielu_math + torchao per-row scaling (what --fp8 runs)", timed(lambda: now8(h),
                                                                                                a.reps))
        row("act fp8", "compiled, coefficients passed in", timed(lambda: once8(h), a.reps))
        for chunk in (1024, 2048, 32768):
            for fast in (False, True):
                q, s = xielu_fp8_rows(h, coef, beta, eps, chunk, fast)
                row("act fp8", f"triton, chunk {chunk}{' +fast' if fast else ''}",
                    timed(lambda: xielu_fp8_rows(h, coef, beta, eps, chunk, fast), a.reps),
                    rows_differing_from_compiled=float((q.float() != q_now.float()).float().mean()),
                    scale_max_rel_diff=float(((s - s_now).abs() / s_now).max()),
                    dequantized_max_abs_diff=float((q.float() * s - q_now.float() * s_now).abs().max()))

        layer = torch.nn.Module()
        layer.mlp = mlp
        fp8.to_fp8(layer)
        patch_xielu(layer)
        mlp_now = torch.compile(layer.mlp, dynamic=False)
        row("mlp fp8", "torchao FP8 linears + compiled xIELU (what --fp8 runs)", timed(lambda: mlp_now(x), a.reps))

    print()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; {tokens} tokens, "
          f"{a.arch} MLP ({cfg.hidden_size} -> {n})")
    base: dict[str, float] = {}
    for r in rows_out:
        base.setdefault(r["group"], r["ms"])
        print(f"{r['group']:9s} {r['ms']:8.3f} ms  x{base[r['group']] / r['ms']:.2f}  {r['variant']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
