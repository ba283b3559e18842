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
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    while pct < MAX_DAMP:
        Hd = H.clone()
        Hd.diagonal().add_(pct * mean_diag)
        # With J the reversal permutation: J H J = L L^T gives H^-1 = U^T U for U = J L^-1 J, upper triangular.
        # One Cholesky and one triangular inverse, instead of Cholesky, cholesky_inverse and a second Cholesky.
        L, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
        if info.item() == 0:
            U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
            if torch.isfinite(U).all():
                return U, pct
        if pct * 2 >= MAX_DAMP:
            break
        pct *= 2
    return None, pct


def column_order(diag: torch.Tensor, K: int, g: int, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The order the solver walks the K columns in, and the group each position's column belongs to.

    Returns (perm [K], gid [K]): position p processes original column perm[p], whose scale/zero is group gid[p].
    - natural order: perm = identity, groups are runs of g consecutive columns (g_idx = k // g).
    - desc_act: columns by decreasing diag(H); a group is g consecutive positions of that order, so the stored
      g_idx is not monotone and a loader must gather per column.
    - static_groups: the groups of the natural order (fixed from the unmodified W), whatever the walk order.
    - act_group_aware (when neither of the above; GPTQModel's default): the natural groups, walked whole, most
      important group first (by its largest diag(H)), and inside a group by decreasing diag(H). The important
      columns are quantized while most columns can still absorb their error, as with act-order, but g_idx stays
      k // g: the checkpoint is an ordinary one with no per-column gather at inference.
    """
    dev = diag.device
    natural = torch.arange(K, device=dev) // g
    if cfg.desc_act:
        # stable: equal diagonals (e.g. H = I) keep their natural order
        perm = torch.argsort(diag, descending=True, stable=True)
        return perm, (natural if not cfg.static_groups else perm // g)
    if cfg.act_group_aware and not cfg.static_groups:
        G = math.ceil(K / g)
        padded = torch.full((G * g,), -1.0, device=dev, dtype=diag.dtype)  # a partial last group pads with -1 < 0
        padded[:K] = diag
        inside = torch.argsort(padded.view(G, g), dim=1, descending=True, stable=True)  # [G, g], pads sort last
        top = padded.view(G, g).max(dim=1).values
        groups = torch.argsort(top, descending=True, stable=True)
        perm = (inside[groups] + groups[:, None] * g).reshape(-1)
        perm = perm[perm < K]
        return perm, perm // g
    return torch.arange(K, device=dev), natural


def _run_lengths(gids: list[int]) -> dict[int, int]:
    """{start position: length} of each run of equal group ids, i.e. of each group in walk order."""
    runs, start = {}, 0
    for p in range(1, len(gids) + 1):
        if p == len(gids) or gids[p] != gids[start]:
            runs[start] = p - start
            start = p
    return runs


def gptq(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, block_size: int = BLOCK_SIZE) -> QuantResult:
    """Quantize W [N, K] given H [K, K]. Returns codes/scales/zeros/g_idx in the original column order.

    The walk order and the groups come from `column_order` (natural, desc_act, static_groups, act_group_aware).
    A group's scale and zero are fixed when the walk reaches its first column, from the columns as updated so far
    (static_groups: from the unmodified W before the pass). If H stays non-positive-definite up to damp 1.0 the layer
    falls back to round-to-nearest and `fallback` says why.
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

    perm, gid = column_order(torch.diag(H), K, g, cfg)
    dev = W.device
    perm = perm.to(dev)
    W = W[:, perm]
    H = H[perm][:, perm]

    U, damp = _inverse_cholesky(H, cfg.damp_percent)
    if U is None:
        res = rtn(W[:, torch.argsort(perm)], cfg)
        res.damp = damp
        res.fallback = f"Hessian not positive definite even with damp_percent {damp:g}; used round-to-nearest"
        return res

    # The pass works on Wt = W^T [K, N] so that a column of W is a contiguous row: the per-column rank-1
    # updates then stream through memory instead of striding across it.
    Wt = W.T.contiguous()
    codes = torch.zeros(K, N, device=dev)  # in the permuted (processing) order until the end
    scales = torch.zeros(G, N, device=dev)
    zeros = torch.zeros(G, N, device=dev)
    loss = torch.zeros((), device=dev)
    gids = gid.tolist()  # one host copy instead of a device sync per column
    runs = _run_lengths(gids)
    scale = zero = None

    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = Wt[i1:i2].clone()  # [B, N]
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                scale, zero = static[gids[col]]
            elif col == 0 or gids[col] != gids[col - 1]:
                # A group starts here: its columns with every update so far (in-block ones live in W1, later
                # ones in Wt) fix its scale and zero.
                n = runs[col]
                span = W1[i:i + n]
                if span.shape[0] < n:
                    span = torch.cat([span, Wt[i2:i2 + n - span.shape[0]]])
                scale, zero = find_params(span.T, cfg)
                scales[gids[col]], zeros[gids[col]] = scale, zero
            w = W1[i]
            c = quantize(w, scale, zero, cfg.maxq)
            codes[col] = c
            err = (w - scale * (c - zero)) / U1[i, i]
            Err1[i] = err
            W1[i:].addr_(U1[i, i:], err, alpha=-1)
        # (w - q)^2 / d^2 / 2 summed over the block's columns
        loss += Err1.pow(2).sum() / 2
        Wt[i2:] -= U[i1:i2, i2:].T @ Err1

    invperm = torch.argsort(perm)
    codes = codes[invperm].T.contiguous().to(torch.uint8)
    g_idx = gid.to(dev)[invperm].to(torch.int32)  # column k was processed at position invperm[k]
    if static is not None:
        scales = torch.stack([s for s, _ in static])
        zeros = torch.stack([z for _, z in static])
    return QuantResult(codes=codes, scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx,
                       loss=loss.item(), damp=damp)
