"""QuantLinear: a Linear whose persistent buffers are exactly the GPTQ checkpoint tensors.

    qweight  int32 [K*bits/32, N]   codes packed along K, lowest bits first
    qzeros   int32 [G, N*bits/32]   zero points packed along N (v1 stores zero - 1)
    scales   fp16  [G, N]
    g_idx    int32 [K]              group of each input row
    bias     fp16  [N]              only when the original Linear had one

so `state_dict()` is the checkpoint, byte for byte. Kernel-specific layouts live in non-persistent buffers that a
kernel's prepare() creates once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import kernels
from .packing import pack_qweight, pack_qzeros, packable
from .quant import QuantResult


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 checkpoint_format: str = "gptq", device: torch.device | str | None = None):
        super().__init__()
        if not (packable(in_features, bits) and packable(out_features, bits)):
            raise ValueError(f"a {in_features}x{out_features} layer cannot be packed at {bits} bits "
                             f"(both sizes must be multiples of {32 if bits == 3 else 32 // bits})")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.checkpoint_format = bits, group_size, checkpoint_format
        g = in_features if group_size == -1 else group_size
        G = math.ceil(in_features / g)
        K, N = in_features, out_features
        self.register_buffer("qweight", torch.zeros(K * bits // 32, N, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(G, N * bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(G, N, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", (torch.arange(K, device=device) // g).to(torch.int32))
        if bias:
            self.register_buffer("bias", torch.zeros(N, dtype=torch.float16, device=device))
        else:
            self.bias = None
        self.kernel = kernels.load("torch")

    @classmethod
    def from_result(cls, res: QuantResult, bias: torch.Tensor | None, bits: int, group_size: int,
                    checkpoint_format: str = "gptq") -> "QuantLinear":
        N, K = res.codes.shape
        m = cls(K, N, bits, group_size, bias is not None, checkpoint_format)
        m.qweight.copy_(pack_qweight(res.codes, bits))
        m.qzeros.copy_(pack_qzeros(res.zeros, bits, checkpoint_format))
        m.scales.copy_(res.scales.half())
        m.g_idx.copy_(res.g_idx)
        if bias is not None:
            m.bias.copy_(bias.detach().half())
        return m

    def use_kernel(self, kernel) -> None:
        """Switch to a kernel module (see gptqkit.kernels) and let it derive its layout once."""
        kernel.prepare(self)
        self.kernel = kernel

    def dequantize(self) -> torch.Tensor:
        """[K, N] float32 weight the checkpoint encodes (x @ W + bias is the layer)."""
        return kernels.load("torch").dequantize(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.forward(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, kernel={self.kernel.name}")
