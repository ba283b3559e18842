"""GPTQ (Frantar et al., ICLR 2023): Hessian accumulation and the solver, a pure function of (W, H, config).

W is [N, K] (out, in). H = sum over calibration tokens of x x^T, [K, K], accumulated in float32 (its scale does
not matter: damping is relative to mean(diag(H))). The solver walks the columns in blocks of 128 (lazy batch
updates), quantizes one column at a time and spreads its error onto the columns not yet quantized through the
upper Cholesky factor of H^-1 (Algorithm 1 of the paper).
"""

from __future__ import annotations

import math

import torch

from .config import QuantConfig
from .quant import QuantResult, find_params, quantize, rtn

BLOCK_SIZE = 128
MAX_DAMP = 1.0


def accumulate(H: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> int:
    """Add x^T x to H in place, H [K, K] float32; x [..., K] activations; mask [...] (1 = real token).

    Padded positions (mask 0) never enter H. Returns the number of tokens added.
    """
    x = x.reshape(-1, x.shape[-1])
    if mask is not None:
        x = x[mask.reshape(-1).to(torch.bool)]
    if x.shape[0] == 0:
        return 0
    x = x.to(H.dtype)
    H.addmm_(x.T, x)
    return x.shape[0]


def _inverse_cholesky(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of (H + damp*I)^-1, doubling damp until H is positive definite (up to MAX_DAMP)."""
    mean_diag = torch.mean(torch.diag(H)).item()
    pct = damp_percent
    while pct < MAX_DAMP:
        Hd = H.clone()
        Hd.diagonal().add_(pct * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U, pct
        pct *= 2
    return None, pct


def gptq(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, block_size: int = BLOCK_SIZE) -> QuantResult:
    """Quantize W [N, K] given H [K, K]. Returns codes/scales/zeros/g_idx in the original column order.

    desc_act: columns are processed by decreasing diag(H); without static_groups a group is formed from
    consecutive columns of that order, so g_idx is not monotone. static_groups: groups are fixed on the original
    order from the unmodified W before the pass. If H stays non-positive-definite up to damp 1.0 the layer falls
    back to round-to-nearest and `fallback` says why.
    """
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    N, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"H has shape {tuple(H.shape)} but W has {K} input columns; expected ({K}, {K})")
    if not torch.isfinite(H).all():
        raise ValueError("the Hessian contains NaN or Inf: the calibration activations overflowed")
    g = cfg.group_for(K)
    G = math.ceil(K / g)

    # Columns that never saw a non-zero input: their weight cannot matter, zero it and keep H invertible.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = None
    if cfg.static_groups and cfg.group_size != -1:
        static = [find_params(W[:, c0:c0 + g], cfg) for c0 in range(0, K, g)]

    dev = W.device
    perm = torch.argsort(torch.diag(H), descending=True) if cfg.desc_act else torch.arange(K, device=dev)
    W = W[:, perm]
    H = H[perm][:, perm]

    U, damp = _inverse_cholesky(H, cfg.damp_percent)
    if U is None:
        res = rtn(W[:, torch.argsort(perm)], cfg)
        res.damp = damp
        res.fallback = f"Hessian not positive definite even with damp_percent {damp / 2:g}; used round-to-nearest"
        return res

    codes = torch.zeros(N, K, dtype=torch.uint8, device=dev)
    scales = torch.zeros(G, N, device=dev)
    zeros = torch.zeros(G, N, device=dev)
    g_idx = torch.zeros(K, dtype=torch.int32, device=dev)
    losses = torch.zeros(N, device=dev)
    order = perm.tolist()  # one host copy instead of a device sync per column
    scale = zero = None

    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = order[col]
            if static is not None:
                grp = orig // g
                scale, zero = static[grp]
            else:
                grp = col // g
                if col % g == 0:
                    # The group's columns with every update so far: in-block ones live in W1, later ones in W.
                    span = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                    scale, zero = find_params(span, cfg)
                    scales[grp], zeros[grp] = scale, zero
            w = W1[:, i]
            d = U1[i, i]
            c = quantize(w, scale, zero, cfg.maxq)
            q = scale * (c - zero)
            codes[:, orig] = c.to(torch.uint8)
            g_idx[orig] = grp
            losses += (w - q) ** 2 / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if static is not None:
        scales = torch.stack([s for s, _ in static])
        zeros = torch.stack([z for _, z in static])
    return QuantResult(codes=codes, scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx,
                       loss=losses.sum().item(), damp=damp)
