"""Packing against an independent, slow, bit-by-bit implementation of the layout in FORMAT.md."""

import pytest
import torch

from gptqkit.packing import pack, pack_qzeros, packable, unpack, unpack_qzeros


def slow_pack(codes: list[list[int]], bits: int) -> list[list[int]]:
    """codes [K][M] -> words [K*bits/32][M]: value j of each 32-value unit at stream bit j*bits, words LSB first."""
    K, M = len(codes), len(codes[0])
    words = [[0] * M for _ in range(K * bits // 32)]
    for m in range(M):
        for k in range(K):
            v = codes[k][m]
            base = k * bits  # bit position in the column's stream
            for b in range(bits):
                if v >> b & 1:
                    pos = base + b
                    words[pos // 32][m] |= 1 << (pos % 32)
    # to signed int32
    return [[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_slow_loop(bits):
    g = torch.Generator().manual_seed(bits)
    K, M = 64, 5
    codes = torch.randint(0, 2**bits, (K, M), generator=g)
    codes[0, 0] = 2**bits - 1  # top code in the first slot
    codes[-1, :] = 2**bits - 1  # top codes in the last slot reach the sign bit
    expect = torch.tensor(slow_pack(codes.tolist(), bits), dtype=torch.int32)
    got = pack(codes, bits)
    assert got.dtype == torch.int32 and got.shape == (K * bits // 32, M)
    assert torch.equal(got, expect)
    assert torch.equal(unpack(got, bits), codes.to(torch.int32))


def test_three_bit_layout_straddles_words():
    # code 10 sits at stream bits 30..32: low 2 bits in word 0 bits 30-31, high bit in word 1 bit 0
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10, 0] = 0b111
    w = pack(codes, 3)
    assert (w[0, 0].item() & 0xFFFFFFFF) == 0b11 << 30
    assert w[1, 0].item() == 1
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[21, 0] = 0b111  # stream bits 63..65: low bit at word 1 bit 31, high 2 bits at word 2 bits 0-1
    w = pack(codes, 3)
    assert (w[1, 0].item() & 0xFFFFFFFF) == 1 << 31
    assert w[2, 0].item() == 0b11


def test_symmetric_4bit_v1_zeros_are_0x77777777():
    zeros = torch.full((3, 16), 8, dtype=torch.int32)
    qz = pack_qzeros(zeros, 4, "gptq")
    assert qz.shape == (3, 2) and (qz == 0x77777777).all()
    assert torch.equal(unpack_qzeros(qz, 4, "gptq"), zeros)
    qz2 = pack_qzeros(zeros, 4, "gptq_v2")
    assert (qz2 == 0x88888888 - (1 << 32)).all()
    assert torch.equal(unpack_qzeros(qz2, 4, "gptq_v2"), zeros)


def test_v1_cannot_store_zero_point_zero():
    with pytest.raises(ValueError, match="gptq_v2"):
        pack_qzeros(torch.zeros(1, 8, dtype=torch.int32), 4, "gptq")


def test_packable_sizes():
    assert packable(576, 4) and packable(8, 4) and not packable(172, 4)
    assert packable(64, 3) and not packable(48, 3)
    assert packable(4, 8) and not packable(6, 8) and packable(16, 2)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(172, 1, dtype=torch.int64), 4)
