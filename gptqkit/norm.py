"""RMSNorm of decode rows in C, swapped in for the model's own RMSNorm modules where they compute the same thing.

transformers' Llama, Mistral and Qwen2 normalise with six torch ops (x.float(), pow, mean, + eps, rsqrt, two
multiplies); on one row of a 2048-wide model that is ~30 us per call on 2 cores in a loop, and about three times
that inside a decoded token, where the matmuls before it have streamed megabytes of codes through the caches. A
22-block model makes 45 calls per token. cpu_avx2.rms_norm does the same in one pass on the caller's thread: on the
1.1B shape (avx2-q8, 2 threads) an in-process A/B took 3.9-4.6 ms off each token, 2.5 ms on SmolLM2-135M.

Which modules are norms is discovered, not tabled per model: a leaf module with one 1-D `weight`, an `eps` or
`variance_epsilon` float and nothing else, whose output on random rows equals this module's formula within float32
rounding. Gemma's norm (x * (1 + w)), LayerNorm (mean subtracted, bias) and anything else fail that probe and keep
their class. The swapped module keeps the same Parameter under the same name, so state_dict() does not change.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .kernels import cpu_avx2

log = logging.getLogger(__name__)

C_ROWS = 32  # rows from which a call stays in torch (prefill: torch's vectorised ops run on every thread)


class RMSNorm(nn.Module):
    """weight * (x * rsqrt(mean(x^2, -1) + eps)), computed in float32 and returned in x's dtype (transformers'
    Llama formula). Few float32 rows on CPU go through the C function."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu"
                and x.numel() < C_ROWS * x.shape[-1]
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            y = cpu_avx2.rms_norm(x, w, self.variance_epsilon)
            if y is not None:
                return y
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return w * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _eps(module: nn.Module) -> float | None:
    """The epsilon of a module shaped like an RMSNorm (one 1-D weight, an eps, no other tensors), else None."""
    params = dict(module.named_parameters(recurse=False))
    if list(module.children()) or list(module.buffers(recurse=False)) or list(params) != ["weight"]:
        return None
    if params["weight"].dim() != 1:
        return None
    for attr in ("variance_epsilon", "eps"):
        eps = getattr(module, attr, None)
        if isinstance(eps, float):
            return eps
    return None


@torch.no_grad()
def use(model: nn.Module) -> int:
    """Swap every module of `model` that computes RMSNorm exactly as RMSNorm does (see the module docstring) for
    one; returns how many were swapped.

    >>> use(model)  # doctest: +SKIP
    45
    """
    swapped, kept = 0, set()
    for name, module in list(model.named_modules()):
        eps = _eps(module) if type(module) is not RMSNorm else None
        if eps is None:
            continue
        w = module.weight
        new = RMSNorm(w, eps)
        x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
        ref = module(x)
        if ref.shape != x.shape or ref.dtype != x.dtype or not torch.allclose(new(x), ref, rtol=1e-5, atol=1e-6):
            kept.add(type(module).__name__)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        swapped += 1
    if swapped:
        log.info("norms: %d RMSNorm modules run decode rows in C", swapped)
    for cls in sorted(kept):
        log.info("norms: %s keeps its own forward (it does not compute weight * x / rms(x))", cls)
    return swapped
