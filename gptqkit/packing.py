"""int32 packing of GPTQ codes along one dimension, for 2, 3, 4 and 8 bits.

Every width is one rule: 32 consecutive codes form a bit stream of 32*bits bits, code j at stream bits
[j*bits, (j+1)*bits), and the stream is cut into `bits` int32 words, lowest bits first. For 2/4/8 bits no code
crosses a word (code j of word w sits at bits [(j % (32/bits)) * bits, ...)); for 3 bits codes 10 and 21 straddle
words, which is exactly the standard 3-words-per-32-values layout. Shifts are done in int64 and wrapped to int32
at the end because the top code reaches the sign bit.
"""

from __future__ import annotations

import torch

ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # v1 stores zero - 1, v2 stores zero


def packable(n: int, bits: int) -> bool:
    """Whether n values along the packed dimension fill whole int32 words (3 bits: whole 32-value units)."""
    return n % 32 == 0 if bits == 3 else (n * bits) % 32 == 0


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [K, M] integers in [0, 2^bits) -> int32 [K*bits/32, M], packed along dim 0."""
    K, M = codes.shape
    if not packable(K, bits):
        raise ValueError(f"cannot pack {K} values at {bits} bits: need a multiple of {32 if bits == 3 else 32 // bits}")
    c = codes.to(torch.int64) & ((1 << bits) - 1)
    if bits == 3:
        c = c.view(K // 32, 32, M)
        words = torch.zeros(K // 32, 3, M, dtype=torch.int64)
        for j in range(32):
            pos = 3 * j
            w, off = divmod(pos, 32)
            words[:, w] |= (c[:, j] << off) & 0xFFFFFFFF
            if off + 3 > 32:  # the code straddles into the next word
                words[:, w + 1] |= c[:, j] >> (32 - off)
        words = words.view(K * 3 // 32, M)
    else:
        per = 32 // bits
        c = c.view(K // per, per, M)
        shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
        words = (c << shifts).sum(dim=1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [K*bits/32, M] -> int32 codes [K, M], the inverse of `pack`."""
    R, M = words.shape
    w = (words.to(torch.int64) & 0xFFFFFFFF).contiguous().reshape(R, M)
    mask = (1 << bits) - 1
    if bits == 3:
        w = w.reshape(R // 3, 3, M)
        out = torch.empty(R // 3, 32, M, dtype=torch.int64, device=words.device)
        for j in range(32):
            pos = 3 * j
            wi, off = divmod(pos, 32)
            v = w[:, wi] >> off
            if off + 3 > 32:
                v = v | (w[:, wi + 1] << (32 - off))
            out[:, j] = v & mask
        return out.view(R * 32 // 3, M).to(torch.int32)
    per = 32 // bits
    shifts = (torch.arange(per, dtype=torch.int64, device=words.device) * bits).view(1, per, 1)
    return ((w.reshape(R, 1, M) >> shifts) & mask).reshape(R * per, M).to(torch.int32)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] (as the solver returns them) -> qweight int32 [K*bits/32, N]."""
    return pack(codes.T.contiguous(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight int32 [K*bits/32, N] -> codes int32 [K, N]."""
    return unpack(qweight, bits)


def pack_qzeros(zeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """True zero points [G, N] -> qzeros int32 [G, N*bits/32], packed along N; v1 stores zero - 1."""
    stored = zeros.to(torch.int64) - ZERO_OFFSET[checkpoint_format]
    if (stored < 0).any():
        raise ValueError("a zero point of 0 cannot be stored in the gptq (v1) format; write checkpoint_format gptq_v2")
    return pack(stored.T.contiguous(), bits).T.contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """qzeros int32 [G, N*bits/32] -> true zero points int32 [G, N].

    v1: zero = field + 1, without masking, as the ecosystem's torch kernels read it (a wrapped field 2^bits - 1
    from an old asymmetric checkpoint becomes 2^bits).
    """
    return unpack(qzeros.T.contiguous(), bits).T.contiguous() + ZERO_OFFSET[checkpoint_format]
