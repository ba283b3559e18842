"""A model's RMSNorms and gated MLPs, swapped for modules that run decode rows through one C call each.

Between two quantized matmuls of a decoded token, every torch op costs several times its warm microseconds: the
matmuls have just streamed megabytes of codes through the caches, so the interpreter's and torch's code and data
come from DRAM. Two small-op sequences that transformers' Llama, Mistral and Qwen2 run in every block are therefore
done in C for float32 rows fewer than C_ROWS (decode; prefill, other dtypes and autograd keep the torch formula):

- RMSNorm, six torch ops (x.float(), pow, mean, + eps, rsqrt, two multiplies): ~30 us per call in a loop on one
  2048-wide row, about three times that in a decoded token, 45 calls per token of a 22-block model.
  cpu_avx2.rms_norm does it in one pass; on the 1.1B shape (avx2-q8, 2 threads) an in-process A/B took 3.9-4.6 ms
  off each token, 2.5 ms on SmolLM2-135M.
- The gated MLP's silu(gate) * up, two ops on 5632 floats: 5.6 us in a loop, 50-70 us per layer in a decoded
  token. cpu_avx2.silu_mul does it in one pass; the same A/B took 0.9-1.2 ms off each token.

Which modules qualify is discovered, not tabled per model, and a probe on random float32 rows decides:
- a norm is a leaf with one 1-D `weight`, an `eps` or `variance_epsilon` float and nothing else, whose output equals
  RMSNorm's formula; Gemma's x * (1 + w), LayerNorm and look-alikes keep their class;
- a gated MLP has gate_proj / up_proj / down_proj submodules and an act_fn equal to SiLU, and its output equals
  down(silu(gate(x)) * up(x)); Gemma's GELU MLP and GPT-2's / OPT's ungated MLPs keep their class.
A swapped module holds the same Parameter or submodules under the same names, so state_dict() does not change.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import cpu_avx2

log = logging.getLogger(__name__)

C_ROWS = 32  # rows from which a call stays in torch (prefill: torch's vectorised ops run on every thread)


def _c_rows(x: torch.Tensor, *inputs: torch.Tensor) -> bool:
    """x [..., K] is fewer than C_ROWS float32 CPU rows and no input needs a gradient."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() < C_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)))


class RMSNorm(nn.Module):
    """weight * (x * rsqrt(mean(x^2, -1) + eps)), computed in float32 and returned in x's dtype (transformers'
    Llama formula). Few float32 rows on CPU go through the C function."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype == torch.float32 and _c_rows(x, x, w):
            y = cpu_avx2.rms_norm(x, w, self.variance_epsilon)
            if y is not None:
                return y
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return w * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class GatedMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)); the product of few float32 rows on CPU in one C call."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        if _c_rows(g, g, u):
            h = cpu_avx2.silu_mul(g, u)
            if h is not None:
                return self.down_proj(h)
        return self.down_proj(self.act_fn(g) * u)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same in torch for any rows (what the probe compares a module with)."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _norm_for(module: nn.Module) -> RMSNorm | None:
    """An RMSNorm over the weight of a module shaped like one (one 1-D weight, an eps, no other tensors), else None."""
    params = dict(module.named_parameters(recurse=False))
    if list(module.children()) or list(module.buffers(recurse=False)) or list(params) != ["weight"]:
        return None
    if params["weight"].dim() != 1:
        return None
    for attr in ("variance_epsilon", "eps"):
        eps = getattr(module, attr, None)
        if isinstance(eps, float):
            return RMSNorm(params["weight"], eps)
    return None


def _norm_agrees(module: nn.Module, new: RMSNorm) -> bool:
    w = new.weight
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    ref = module(x)
    return ref.shape == x.shape and ref.dtype == x.dtype and torch.allclose(new(x), ref, rtol=1e-5, atol=1e-6)


def _mlp_for(module: nn.Module) -> GatedMLP | None:
    parts = tuple(getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    return GatedMLP(*parts) if all(isinstance(p, nn.Module) for p in parts) else None


def _mlp_agrees(module: nn.Module, new: GatedMLP) -> bool:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    hidden = getattr(new.gate_proj, "in_features", None)
    if tensor is None or hidden is None:
        return False
    t = torch.linspace(-12, 12, 97, device=tensor.device)
    if not torch.allclose(new.act_fn(t), F.silu(t), rtol=1e-6, atol=1e-7):
        return False
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(0)).to(tensor.device)  # the C path's rows
    try:
        ref = module(x)
    except RuntimeError:  # e.g. a model that computes in another dtype
        return False
    return ref.shape == (3, hidden) and torch.allclose(new.reference(x), ref, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def _swap(model: nn.Module, make: Callable, agrees: Callable, kind: type, what: str) -> int:
    """Replace each module that make() builds a `kind` for and whose output agrees with it on a probe; log what was
    swapped and which classes kept their own forward."""
    swapped, kept = 0, set()
    for name, module in list(model.named_modules()):
        new = make(module) if type(module) is not kind else None
        if new is None:
            continue
        if not agrees(module, new):
            kept.add(type(module).__name__)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        swapped += 1
    if swapped:
        log.info("fused: %d %s modules run decode rows in C", swapped, kind.__name__)
    for cls in sorted(kept):
        log.info("fused: %s keeps its own forward (it does not compute %s)", cls, what)
    return swapped


def use_norms(model: nn.Module) -> int:
    """Swap every module of `model` that computes RMSNorm as RMSNorm does for one; returns how many.

    >>> use_norms(model)  # doctest: +SKIP
    45
    """
    return _swap(model, _norm_for, _norm_agrees, RMSNorm, "weight * x / rms(x)")


def use_mlps(model: nn.Module) -> int:
    """Swap every module of `model` that computes down(silu(gate(x)) * up(x)) for a GatedMLP holding the same
    submodules; returns how many.

    >>> use_mlps(model)  # doctest: +SKIP
    22
    """
    return _swap(model, _mlp_for, _mlp_agrees, GatedMLP, "down(silu(gate(x)) * up(x))")
