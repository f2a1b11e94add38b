"""A fused xIELU for Apertus.

transformers' Python fallback ("CUDA-fused xIELU not available") runs ~10 elementwise kernels per MLP and keeps
their intermediates for the backward pass. Compiled as one function, forward and backward are each one fused
kernel and only the input is saved. The math is done in float32 and cast back, which is at least as accurate as
the reference (which computes in the weights' dtype).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

_COMPILED: dict[str, object] = {}


def xielu_math(x: torch.Tensor, alpha_p_raw: torch.Tensor, alpha_n_raw: torch.Tensor, beta: float, eps: float):
    alpha_p = F.softplus(alpha_p_raw.float())
    alpha_n = beta + F.softplus(alpha_n_raw.float())
    xf = x.float()
    pos = alpha_p * xf * xf + beta * xf
    neg = (torch.expm1(torch.clamp(xf, max=eps)) - xf) * alpha_n + beta * xf
    return torch.where(xf > 0, pos, neg).to(x.dtype)


def compiled_xielu(backend: str = "inductor"):
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(xielu_math, backend=backend, dynamic=True, fullgraph=True)
    return _COMPILED[backend]


def _fused_forward(self, input: torch.Tensor) -> torch.Tensor:
    fn = compiled_xielu(self._lexfine_backend)
    return fn(input, self.alpha_p, self.alpha_n, self._beta_scalar, self._eps_scalar)


def patch_xielu(model, backend: str = "inductor") -> int:
    """Replace the forward of every xIELU activation in `model`; returns how many were patched."""
    try:
        from transformers.activations import XIELUActivation
    except ImportError:
        return 0
    compiled_xielu(backend)  # built now: created while a compiled layer is traced, it would cost a recompile
    n = 0
    for module in model.modules():
        if isinstance(module, XIELUActivation) and getattr(module, "_xielu_cuda_obj", None) is None:
            module._lexfine_backend = backend
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
