"""The reference kernel: dequantize the checkpoint tensors with plain torch ops, then matmul.

Any bits, any group size, act-order g_idx, any device and dtype. It is the oracle the fast kernels are tested
against, and what `QuantLinear.dequantize()` uses.
"""

from __future__ import annotations

import torch

from ..packing import unpack_qweight, unpack_qzeros

name = "torch"


def supports(layer, device: torch.device | str | None = None) -> str | None:
    return None


def prepare(layer) -> None:
    return None


def dequantize(layer) -> torch.Tensor:
    """[K, N] float32: scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])."""
    codes = unpack_qweight(layer.qweight, layer.bits)  # [K, N]
    zeros = unpack_qzeros(layer.qzeros, layer.bits, layer.checkpoint_format)  # [G, N]
    g = layer.g_idx.long()
    return layer.scales.float()[g] * (codes.float() - zeros.float()[g])


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    W = dequantize(layer).to(x.dtype)
    y = x @ W
    if layer.bias is not None:
        y = y + layer.bias.to(x.dtype)
    return y
