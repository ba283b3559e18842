"""The quantizer grid (as GPTQ defines it) and round-to-nearest.

Shapes: a weight matrix W is [N, K] (out_features, in_features), as nn.Linear stores it. A group is a run of
`group_size` input columns; each (group, output row) pair has one scale and one integer zero point.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import QuantConfig

log = logging.getLogger(__name__)

# Scales are stored as fp16; the smallest positive fp16 (a subnormal) keeps a degenerate scale representable.
_FP16_TINY = 2.0**-24


@dataclass
class QuantResult:
    """What a quantizer produces for one Linear, in the original column order."""

    codes: torch.Tensor  # [N, K] uint8, integer codes in [0, maxq]
    scales: torch.Tensor  # [G, N] float32 holding fp16-representable values
    zeros: torch.Tensor  # [G, N] int32, the true zero point (not zero - 1)
    g_idx: torch.Tensor  # [K] int32, group of each input column
    loss: float = 0.0  # GPTQ's objective sum((w - q)^2 / d^2) / 2 (0 for RTN)
    damp: float | None = None  # damp_percent actually used (after automatic increases)
    fallback: str | None = None  # why this layer fell back to round-to-nearest, if it did

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32: scales[g_idx] * (codes - zeros[g_idx]), the weight the checkpoint encodes."""
        g = self.g_idx.long()
        return self.scales[g].T * (self.codes.float() - self.zeros[g].T.float())


def _round_scale(scale: torch.Tensor) -> torch.Tensor:
    # Round to fp16 here so the solver quantizes against exactly the scale the checkpoint stores;
    # dequantize(checkpoint) then equals the solver's fake-quantized weight bit for bit.
    return scale.clamp_min(_FP16_TINY).half().float()


def find_params(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero for w [R, C] (R output rows, C columns of one group). Returns ([R], [R]) float32."""
    maxq = cfg.maxq
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if cfg.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(dead, torch.full_like(xmax, 1.0), xmax)
    scale, zero = _grid(xmin, xmax, cfg)
    if cfg.mse:
        scale, zero = _mse_search(w, xmin, xmax, scale, zero, cfg)
    return scale, zero


def _grid(xmin: torch.Tensor, xmax: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = cfg.maxq
    scale = _round_scale((xmax - xmin) / maxq)
    if cfg.sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
        if cfg.checkpoint_format == "gptq":
            # v1 stores zero - 1 in an unsigned field, so zero = 0 would wrap; keep the grid storable instead.
            zero = zero.clamp(min=1)
    return scale, zero


def _mse_search(w, xmin, xmax, scale, zero, cfg: QuantConfig, grid: int = 100, maxshrink: float = 0.8,
                norm: float = 2.4, max_elems: int = 1 << 23):
    """GPTQ's clipping search: shrink [xmin, xmax] by p = 1, 0.99, ..., 0.21 and keep, per row, the grid with the
    least sum |w - q|^2.4 (the first on ties, i.e. the widest). All shrink factors are tried at once on [P, R, C]
    (P = 80), in row chunks of at most `max_elems` elements, instead of 80 passes."""
    p = (1 - torch.arange(int(maxshrink * grid), dtype=torch.float64) / grid).to(w.dtype).to(w.device)[:, None]
    R, C = w.shape
    step = max(1, max_elems // (p.shape[0] * C))
    scale, zero = scale.clone(), zero.clone()
    for r0 in range(0, R, step):
        rows = slice(r0, r0 + step)
        s1, z1 = _grid(p * xmin[rows], p * xmax[rows], cfg)  # [P, r]
        err = (fake_quantize(w[rows], s1[..., None], z1[..., None], cfg.maxq) - w[rows]).abs_().pow_(norm).sum(-1)
        best = err.argmin(0)  # first minimum
        idx = torch.arange(best.shape[0], device=w.device)
        scale[rows], zero[rows] = s1[best, idx], z1[best, idx]
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float) clamp(round(w / scale) + zero, 0, maxq); scale and zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return scale * (quantize(w, scale, zero, maxq) - zero)


def rtn(W: torch.Tensor, cfg: QuantConfig) -> QuantResult:
    """Round-to-nearest on the same grid as GPTQ: W [N, K] -> QuantResult (g_idx = k // group_size)."""
    W = W.float()
    N, K = W.shape
    g = cfg.group_for(K)
    scales, zeros, codes = [], [], []
    for c0 in range(0, K, g):
        s, z = find_params(W[:, c0:c0 + g], cfg)
        codes.append(quantize(W[:, c0:c0 + g], s[:, None], z[:, None], cfg.maxq))
        scales.append(s)
        zeros.append(z)
    return QuantResult(
        codes=torch.cat(codes, dim=1).to(torch.uint8),
        scales=torch.stack(scales),
        zeros=torch.stack(zeros).to(torch.int32),
        g_idx=(torch.arange(K) // g).to(torch.int32),
    )
