"""The gated MLP's silu(gate) * up for decode rows in one C call, swapped in for the model's own MLP modules where
they compute down(silu(gate(x)) * up(x)).

Llama, Mistral and Qwen2 compute their MLP as `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with SiLU. Between
the gate/up and the down matmuls of a decoded token, those two torch ops on 5632 floats take far longer than
their warm few microseconds (5.6 us in a loop, 50-70 us per layer in a decoded token), because the matmuls have
just streamed megabytes of codes through the caches; cpu_avx2.silu_mul is one pass on the caller's thread. On the
1.1B shape (avx2-q8, 2 threads) an in-process A/B took 0.9-1.2 ms off each token.

Which modules are such MLPs is discovered, not tabled per model: a module with gate_proj, up_proj and down_proj
submodules and an act_fn that equals SiLU on a probe, whose own output on random rows equals GatedMLP's torch
formula. Gemma's GELU MLP, GPT-2's and OPT's two-matrix MLPs fail that and keep their class. GatedMLP holds the same
submodules under the same names, so state_dict() does not change.
"""

from __future__ import annotations

import itertools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import cpu_avx2

log = logging.getLogger(__name__)

C_ROWS = 32  # rows from which silu * mul stays in torch (prefill: torch's vectorised ops run on every thread)


class GatedMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)); the product of few float32 rows on CPU in one C call."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        if (g.dtype == torch.float32 and g.device.type == "cpu" and g.numel() < C_ROWS * g.shape[-1]
                and not (torch.is_grad_enabled() and (g.requires_grad or u.requires_grad))):
            h = cpu_avx2.silu_mul(g, u)
            if h is not None:
                return self.down_proj(h)
        return self.down_proj(self.act_fn(g) * u)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same in torch for any rows (what the probe compares a module with)."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _parts(module: nn.Module) -> tuple | None:
    parts = tuple(getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    return parts if all(isinstance(p, nn.Module) for p in parts) else None


@torch.no_grad()
def use(model: nn.Module) -> int:
    """Swap every module of `model` that computes down(silu(gate(x)) * up(x)) for a GatedMLP holding the same
    submodules (see the module docstring); returns how many were swapped.

    >>> use(model)  # doctest: +SKIP
    22
    """
    swapped, kept = 0, set()
    for name, module in list(model.named_modules()):
        parts = _parts(module) if type(module) is not GatedMLP else None
        if parts is None:
            continue
        new = GatedMLP(*parts)
        tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
        hidden = getattr(parts[0], "in_features", None)
        same = tensor is not None and hidden is not None
        if same:
            t = torch.linspace(-12, 12, 97, device=tensor.device)
            same = torch.allclose(parts[3](t), F.silu(t), rtol=1e-6, atol=1e-7)
        if same:  # float32 rows: the C path takes only those
            x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(0)).to(tensor.device)
            try:
                ref = module(x)
            except RuntimeError:  # e.g. a model that computes in another dtype
                ref = None
            same = (ref is not None and ref.shape == (3, hidden)
                    and torch.allclose(new.reference(x), ref, rtol=1e-5, atol=1e-6))
        if not same:
            kept.add(type(module).__name__)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        swapped += 1
    if swapped:
        log.info("mlp: %d gated MLPs compute silu(gate) * up of decode rows in C", swapped)
    for cls in sorted(kept):
        log.info("mlp: %s keeps its own forward (it does not compute down(silu(gate(x)) * up(x)))", cls)
    return swapped
