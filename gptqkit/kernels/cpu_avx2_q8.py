"""CPU kernel `avx2-q8`: the avx2 kernel's in-place 4-bit codes times activations rounded to int8.

Decode reads the checkpoint's qweight like `avx2` does, but rounds each block of 32 activations to int8 with its own
scale (max |x| / 127, as llama.cpp's Q8_0) and multiplies codes and activations as integers
(`gptq_matmul_q8` in cpu_avx2.c): about a third of the instructions per weight, so two AVX2 cores keep up with
DRAM instead of falling behind it. The integer sums are exact; the one approximation is the rounding of x, a
relative error of about 0.5% per product sum on Gaussian activations (about 1e-3 of the output's scale on a real
model, see tests/test_kernels.py). Prefill (M >= cpu_avx2.M_MAX) and autograd take `avx2`'s dense path, with
activations unrounded. Layouts, refusals and prepare() are `avx2`'s.

It also reads 2-, 3- and 8-bit codes in place (`gptq_matmul_q8`'s shift-and-mask integer sums, see the C file),
which `avx2` and PyTorch's int4 op do not: the `cpu` kernel ran a 3-bit SmolLM2 at ~134 ms per token against ~19-24
for the bf16 model, with an int4 copy of the codes beside them, where this kernel takes ~3.2. Their prefill and
autograd take `avx2`'s dense path too: the bf16 GEMM that dequantizes into its own panels, and gptq_dequant, read
every width.
"""

from __future__ import annotations

import functools

import torch

from . import cpu_avx2

name = "avx2-q8"

supports = functools.partial(cpu_avx2.supports, int8=True)
prepare = cpu_avx2.prepare


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    return cpu_avx2.forward(layer, x, int8=True)
