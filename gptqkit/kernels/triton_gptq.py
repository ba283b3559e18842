"""Triton kernel for GPTQ layers on CUDA: fused dequantize-matmul for small batches, dequantize + cuBLAS above.

It reads the checkpoint tensors exactly as stored (FORMAT.md), 2, 4 and 8 bits, fp16 or bf16 activations:

    qweight  int32 [K*b/32, N]   codes packed along K, code j of a word at bits [j*b, (j+1)*b)
    qzeros   int32 [G, N*b/32]   zero points packed along N; v1 ("gptq") stores zero - 1
    scales   fp16  [G, N]        W[k, n] = scales[g, n] * (code[k, n] - zero[g, n]),  g = g_idx[k]

Fused kernel (M <= FUSED_MAX_M rows of x). A program owns BLOCK_N output columns, one slice of K (split-K: the
slices' fp32 partial sums meet in an atomic add) and BLOCK_M rows of x. A K tile is ROWS packed int32 rows
[ROWS, BLOCK_N], loaded once (and one tile ahead). Code j of every word sits at input feature k0 + r*PER + j, and
a sum over k takes its terms in any order, so the tile is consumed as PER partial products of the strided
x[:, k0 + j :: PER] [BLOCK_M, ROWS] with codes_j [ROWS, BLOCK_N]: nothing is unpacked into memory. Two variants:

- DOT (tensor cores, BLOCK_M >= 16 rows, any M): codes_j - zero becomes fp16/bf16 and goes into tl.dot with an
  fp32 accumulator.
- CUDA cores, M = 1 (decode at batch 1): codes_j - zero becomes fp32 and is multiplied-added into an accumulator
  shaped like the qweight tile, summed across rows once at the end; the K loop has no cross-thread traffic.

Codes become floats by the magic-number trick instead of the slow int->float conversion: OR the code into the
mantissa of 2^23 (fp32), 1024 (fp16) or 128 (bf16, codes and zeros up to 16; 8-bit bf16 converts) and reinterpret
the bits; the constant cancels in code - zero, which is exact. The CUDA-core variant leaves code j at its bit
position P and lets x carry 2^-P: one LOP3 and one FADD per code.

Groups. When each K tile lies inside one group (g_idx is the trivial k // g and BLOCK_K divides g, or a single
group) the scale multiplies each tile's fp32 partial sum once. Otherwise the kernel reads each row's group (g_idx
for act-order; k // g for groups smaller than a tile, and a partial last group needs nothing special) and
dequantizes per element.

Act-order: gathered per row from g_idx, not permuted. A permutation (argsort(g_idx) so groups become contiguous)
would need qweight's rows permuted too; the persistent qweight must stay as the checkpoint stores it, so that
means a second, permuted copy of the weights in a non-persistent buffer, doubling the layer's memory. The gather
costs extra (L1-resident) loads of scales/qzeros inside the K loop, for act-order layers only.

Prefill. Above FUSED_MAX_M rows the layer is dequantized to x.dtype once per call by a Triton kernel and
multiplied by cuBLAS (torch.matmul). Between DECODE_M and FUSED_MAX_M the choice between the two is made per
(M bucket, K, N, bits, group, dtype) by timing both on first use; at or below DECODE_M the fused kernel always
runs. Its tiling (variant, BLOCK_N, ROWS, split-K) is chosen the same way: a small timed search over candidates(),
cached in-process like triton.autotune; a fixed configuration under TRITON_INTERPRET=1, and the first candidate
with TUNE = False or during CUDA-graph capture (warm up before capturing).

Triton is imported on first use; this module imports without it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..packing import ZERO_OFFSET

log = logging.getLogger(__name__)

name = "triton"

DECODE_M = 16  # up to here the fused kernel always runs
FUSED_MAX_M = 64  # above this many rows: dequantize once + cuBLAS
TUNE = True  # time the candidates on a shape's first call; False: take the first candidate (quick start)


@dataclass(frozen=True)
class Config:
    """Tiling of the fused kernel. A K tile is `rows` packed int32 rows = rows * 32/bits input features."""

    block_n: int
    rows: int
    split_k: int
    dot: bool = True  # tensor cores (tl.dot); False: CUDA-core FMAs, for M = 1 only
    num_warps: int = 4
    # Triton's software pipelining. The weight stream is prefetched by hand, so 1 costs little; more stages put
    # the per-row scale/zero gathers of act-order layers through shared memory (~50-200 KB at 2-3 stages).
    num_stages: int = 1


# Under TRITON_INTERPRET=1: small tiles keep the interpreter quick; split_k 2 exercises the atomic path.
INTERPRETER_CONFIGS = (Config(block_n=64, rows=16, split_k=2, dot=False), Config(block_n=64, rows=16, split_k=2))

_plans: dict[tuple, Config | None] = {}  # timed choices per shape; None means dequantize + cuBLAS
triton = tl = None  # bound by _jit() on first use


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def supports(layer, device: torch.device | str | None = None) -> str | None:
    device = torch.device(device) if device is not None else layer.qweight.device
    if device.type != "cuda":
        return "Triton kernel needs a CUDA device"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install gptqkit[triton])"
    if layer.bits not in (2, 4, 8):
        return f"{layer.bits}-bit codes straddle int32 words; the Triton kernel reads 2, 4 and 8 bits"
    K, N = layer.in_features, layer.out_features
    if K * N >= 2**31 or layer.scales.shape[0] * N >= 2**31:
        return f"a {K}x{N} layer needs 64-bit offsets; the Triton kernel indexes with 32 bits"
    if not all(t.is_contiguous() for t in (layer.qweight, layer.qzeros, layer.scales, layer.g_idx)):
        return "the Triton kernel reads contiguous qweight/qzeros/scales/g_idx; this layer's are strided views"
    if torch.cuda.get_device_capability(device) < (7, 5):
        return "Triton needs a GPU of compute capability 7.5 (Turing) or newer"
    return None


def prepare(layer) -> None:
    """Record whether g_idx is the trivial k // g (then groups are computed, not gathered). Nothing is copied."""
    K = layer.in_features
    g = _group(layer)
    trivial = torch.equal(layer.g_idx.long(), torch.arange(K, device=layer.g_idx.device) // g)
    layer.triton_act_order = not trivial


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    K, N = layer.in_features, layer.out_features
    if x.shape[-1] != K:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_empty(*lead, N)
    cfg = plan(layer, x2.shape[0], x.dtype)
    y = dequant_matmul(layer, x2) if cfg is None else fused_matmul(layer, x2, cfg)
    return y.reshape(*lead, N)


# ----------------------------------------------------------------------------------------------- entry points


def fused_matmul(layer, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """x [M, K] fp16/bf16 contiguous -> x @ W + bias [M, N] in x.dtype, by the fused kernel with tiling `cfg`."""
    k = _jit()
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the fused kernel takes fp16 or bf16 activations, got {x.dtype}")
    M, K = x.shape
    N, bits = layer.out_features, layer.bits
    G, g = layer.scales.shape[0], _group(layer)
    block_m = _block_m(M, cfg.dot)
    block_k = cfg.rows * 32 // bits
    act_order = layer.triton_act_order
    row_groups = act_order or not (G == 1 or g % block_k == 0)
    split = max(1, min(cfg.split_k, _cdiv(K, block_k)))
    # The float a code becomes, and the magic constant that makes it without an int->float conversion:
    # OR the code into the mantissa of 2^23 (fp32), 1024 (fp16, 10-bit mantissa) or 128 (bf16, 7 bits: codes and
    # zeros up to 16, so 8-bit bf16 converts). The interpreter (numpy) has no bf16 arithmetic: fp32 there.
    if not cfg.dot or (x.dtype == torch.bfloat16 and interpreting()):
        ct, magic = tl.float32, 0x4B000000
    elif x.dtype == torch.float16:
        ct, magic = tl.float16, 0x6400
    else:
        ct, magic = tl.bfloat16, (0x4300 if bits <= 4 else 0)
    out = (torch.zeros(M, N, dtype=torch.float32, device=x.device) if split > 1
           else torch.empty(M, N, dtype=x.dtype, device=x.device))
    bias = layer.bias if layer.bias is not None else layer.scales  # any pointer; unread without HAS_BIAS
    grid = (_cdiv(N, cfg.block_n), split, _cdiv(M, block_m))
    k.fused[grid](
        x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bias, out, M, N, K, g, split,
        BITS=bits, ZERO_OFFSET=ZERO_OFFSET[layer.checkpoint_format], CT=ct, MAGIC=magic, DOT=cfg.dot,
        ROW_GROUPS=row_groups, ACT_ORDER=act_order, HAS_BIAS=layer.bias is not None, ATOMIC=split > 1,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, ROWS=cfg.rows, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.to(x.dtype) if split > 1 else out


def dequantize(layer, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """[K, N] weight in `dtype`, computed as the reference does (fp32 product, one rounding) by a Triton kernel."""
    k = _jit()
    K, N, bits = layer.in_features, layer.out_features, layer.bits
    rows, block_n = 16, 64
    out = torch.empty(K, N, dtype=dtype, device=layer.qweight.device)
    grid = (_cdiv(K * bits // 32, rows), _cdiv(N, block_n))
    k.dequant[grid](
        layer.qweight, layer.qzeros, layer.scales, layer.g_idx, out, N, K, _group(layer),
        BITS=bits, ZERO_OFFSET=ZERO_OFFSET[layer.checkpoint_format], ACT_ORDER=layer.triton_act_order,
        ROWS=rows, BLOCK_N=block_n, num_warps=4)
    return out


def dequant_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> x @ W + bias: the weight dequantized once for this call, then cuBLAS."""
    W = dequantize(layer, x.dtype)
    if layer.bias is None:
        return x @ W
    return torch.addmm(layer.bias.to(x.dtype), x, W)


def plan(layer, M: int, dtype: torch.dtype) -> Config | None:
    """The fused kernel's tiling for an [M, K] input, or None for dequantize + cuBLAS (see the module notes)."""
    if M > FUSED_MAX_M or dtype not in (torch.float16, torch.bfloat16):
        return None
    if interpreting():
        return INTERPRETER_CONFIGS[0] if M == 1 else INTERPRETER_CONFIGS[1]
    device = layer.qweight.device
    key = (_bucket(M), layer.in_features, layer.out_features, layer.bits, _group(layer),
           layer.triton_act_order, dtype, device.index, TUNE)
    if key in _plans:
        return _plans[key]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    cands = candidates(M, layer.in_features, layer.out_features, layer.bits, _group(layer), sms)
    if TUNE and torch.cuda.is_current_stream_capturing():  # no timing inside a graph capture; tune later
        return cands[0]
    _plans[key] = _measure(layer, M, dtype, cands) if TUNE else cands[0]
    log.debug("triton plan for M<=%d K=%d N=%d %d-bit: %s", key[0], key[1], key[2], key[3], _plans[key])
    return _plans[key]


def candidates(M: int, K: int, N: int, bits: int, group_size: int, sms: int) -> list[Config]:
    """Tilings worth timing for this shape, a sensible default first.

    K tiles that fit inside a group are preferred (scale applied once per tile). Decode is bandwidth-bound and
    N / BLOCK_N programs rarely fill the GPU, so K is split until there are one to four programs per SM (each
    split keeps at least two K tiles).
    """
    per = 32 // bits
    single_group = group_size >= K
    out: list[Config] = []
    for dot in ((False, True) if M == 1 else (True,)):
        m_tiles = _cdiv(M, _block_m(M, dot))
        # tl.dot needs ROWS >= 16; the largest two tile heights that fit in a group (else per-row groups)
        rows_opts = [r for r in ((16, 32) if dot else (4, 8, 16, 32)) if single_group or group_size % (r * per) == 0]
        for block_n in ((128, 64, 256) if not dot else (64, 32, 128)):
            for rows in rows_opts[-2:] or [16]:
                k_tiles = _cdiv(K, rows * per)
                progs = _cdiv(N, block_n) * m_tiles
                splits = [s for s in (1, 2, 4, 8, 16) if s == 1 or s <= k_tiles // 2]
                fit = [s for s in splits if progs * s <= 4 * sms] or [1]
                keep = sorted(set(fit[-2:]) | ({1} if progs >= sms else set()))
                enough = [s for s in keep if progs * s >= sms]
                first = enough[0] if enough else keep[-1]
                out += [Config(block_n, rows, s, dot) for s in [first] + [s for s in keep if s != first]]
    firsts = [c for c in out if c.dot][:1]
    return out + [Config(c.block_n, c.rows, c.split_k, c.dot, c.num_warps, 2) for c in firsts]


# ------------------------------------------------------------------------------------------------------ helpers


def _group(layer) -> int:
    return layer.in_features if layer.group_size == -1 else layer.group_size


def _block_m(M: int, dot: bool) -> int:
    if not dot:
        if M != 1:
            raise ValueError(f"the CUDA-core variant takes one row of x, got {M}")
        return 1
    return 16 if M <= 16 else 32 if M <= 32 else 64


def _bucket(M: int) -> int:
    return 1 << max(0, M - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _measure(layer, M: int, dtype: torch.dtype, cands: list[Config]) -> Config | None:
    """Time each candidate (and dequantize + cuBLAS above DECODE_M) on a random input; return the fastest."""
    from triton.testing import do_bench

    x = torch.randn(M, layer.in_features, dtype=dtype, device=layer.qweight.device)
    options: list[Config | None] = list(cands) + ([None] if M > DECODE_M else [])
    best, best_ms = cands[0], float("inf")
    for c in options:
        fn = (lambda: dequant_matmul(layer, x)) if c is None else (lambda c=c: fused_matmul(layer, x, c))
        try:
            ms = do_bench(fn, warmup=5, rep=20, return_mode="median")
        except Exception as e:  # a tiling the compiler rejects (e.g. out of shared memory) is skipped
            log.debug("triton config %s failed: %s", c, e)
            continue
        if ms < best_ms:
            best, best_ms = c, ms
    return best


_KERNELS: SimpleNamespace | None = None


def _jit() -> SimpleNamespace:
    """Import Triton and decorate the kernels, once. Triton resolves names in a kernel through the module's
    globals, so `triton` and `tl` become module globals here rather than at import."""
    global _KERNELS, triton, tl, _as_float
    if _KERNELS is None:
        import triton
        import triton.language as tl

        _as_float = triton.jit(_as_float)  # the kernels call it by this global name
        _KERNELS = SimpleNamespace(fused=triton.jit(_fused_kernel), dequant=triton.jit(_dequant_kernel))
    return _KERNELS


# ------------------------------------------------------------------------------------------------------ kernels
# Plain functions until _jit() decorates them. Shapes: x [M, K], out [M, N], qweight [K/PER, N], qzeros
# [G, N/PER], scales [G, N], g_idx [K]; all contiguous. PER = 32 / BITS codes per int32.


def _as_float(v, CT: tl.constexpr, MAGIC: tl.constexpr):
    # int32 v, below MAGIC's lowest set bit -> the float MAGIC + v in CT, exactly and without an int->float
    # conversion instruction (OR v into the mantissa, reinterpret the bits); MAGIC 0: a plain conversion to v.
    if MAGIC == 0:
        f = v.to(CT)
    elif CT == tl.float32:
        f = (v | MAGIC).to(tl.float32, bitcast=True)
    else:
        f = (v | MAGIC).to(tl.int16).to(CT, bitcast=True)
    return f


def _fused_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, out_ptr,
                  M, N, K, group_size, split_k,
                  BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, CT: tl.constexpr, MAGIC: tl.constexpr,
                  DOT: tl.constexpr, ROW_GROUPS: tl.constexpr, ACT_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr,
                  ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    PER: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    BLOCK_K: tl.constexpr = ROWS * PER
    HALF: tl.constexpr = CT == tl.float16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    m_ok = offs_m < M
    n_ok = offs_n < N
    zshift = (offs_n % PER) * BITS  # [BLOCK_N] position of column n's zero inside its qzeros word
    zcol = offs_n // PER
    NZ = N // PER
    k_rows = K // PER
    tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(tiles, split_k)
    t_lo = pid_k * per_split
    t_hi = tl.minimum(t_lo + per_split, tiles)
    # DOT: tensor cores, acc [BLOCK_M, BLOCK_N]. Otherwise (M = 1) CUDA-core FMAs into acc [ROWS, BLOCK_N], the
    # layout of the qweight tile, summed over ROWS once at the end: no cross-thread traffic inside the K loop.
    if DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    # The weight stream is prefetched one tile ahead by hand: the loads are not dot operands, so Triton's
    # pipeliner may leave them alone, and a decode kernel lives on memory-level parallelism.
    row_end = tl.minimum(k_rows, t_hi * ROWS)  # this split's packed rows end here
    rows = t_lo * ROWS + offs_r
    q_next = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :],
                     mask=(rows < row_end)[:, None] & n_ok[None, :], other=0)
    for t in range(t_lo, t_hi):
        rows = t * ROWS + offs_r  # [ROWS] packed rows of this tile
        r_ok = rows < k_rows
        rn_ok = r_ok[:, None] & n_ok[None, :]
        q = q_next  # [ROWS, BLOCK_N] int32
        ahead = rows + ROWS
        q_next = tl.load(qweight_ptr + ahead[:, None] * N + offs_n[None, :],
                         mask=(ahead < row_end)[:, None] & n_ok[None, :], other=0)
        if not ROW_GROUPS:
            grp = (t * BLOCK_K) // group_size  # the whole tile lies in this group
            s = tl.load(scales_ptr + grp * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            qz = tl.load(qzeros_ptr + grp * NZ + zcol, mask=n_ok, other=0)
            z = ((qz >> zshift) & MAXQ) + ZERO_OFFSET  # [BLOCK_N] true zero points
            if DOT:
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                zf = _as_float(z, CT, MAGIC)
            else:
                part = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
                q_hi = (q >> 16) & 0xFFFF
        for j in tl.static_range(PER):
            k = rows * PER + j  # [ROWS] input features holding code j of each word
            if ROW_GROUPS:  # per-row group: gather its scale and zero, dequantize fully
                if ACT_ORDER:
                    g = tl.load(g_idx_ptr + k, mask=r_ok, other=0)
                else:
                    g = k // group_size
                sr = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=rn_ok, other=0.0)
                qz = tl.load(qzeros_ptr + g[:, None] * NZ + zcol[None, :], mask=rn_ok, other=0)
                zr = ((qz >> zshift[None, :]) & MAXQ) + ZERO_OFFSET
                d = _as_float((q >> (j * BITS)) & MAXQ, CT, MAGIC) - _as_float(zr, CT, MAGIC)
                if HALF:  # one fp16 rounding of an exact product, as the reference's fp32 product rounded
                    w = d * sr.to(tl.float16)
                else:
                    w = (d.to(tl.float32) * sr.to(tl.float32)).to(CT)
            elif DOT:  # code - zero, exact in CT; the tile's scale multiplies the partial sum
                w = _as_float((q >> (j * BITS)) & MAXQ, CT, MAGIC) - zf[None, :]
            else:
                # Code j stays at its bit position P (in q, or in q >> 16 once the field would reach bit 23, the
                # exponent): float(2^23 | code << P) - float(2^23 | zero << P) = (code - zero) * 2^P exactly, one
                # LOP3 and one FADD per code; x carries the 2^-P.
                if j * BITS + BITS + 1 <= 23:
                    P = j * BITS
                    cf = _as_float(q & (MAXQ << P), CT, MAGIC)
                else:
                    P = j * BITS - 16
                    cf = _as_float(q_hi & (MAXQ << P), CT, MAGIC)
                w = cf - _as_float(z << P, CT, MAGIC)[None, :]
            if DOT:
                xj = tl.load(x_ptr + offs_m[:, None] * K + k[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                if ROW_GROUPS:
                    acc = tl.dot(xj.to(CT), w, acc)
                else:
                    part = tl.dot(xj.to(CT), w, part)
            else:
                xj = tl.load(x_ptr + k, mask=r_ok, other=0.0).to(tl.float32)  # [ROWS], the one row of x
                if ROW_GROUPS:
                    acc += xj[:, None] * w
                else:
                    part += (xj * (1.0 / (1 << P)))[:, None] * w
        if not ROW_GROUPS:
            acc += part * s[None, :]
    if not DOT:
        acc = tl.sum(acc, axis=0)[None, :]  # [1, BLOCK_N]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, b, 0.0)[None, :]  # one split adds the bias
    out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _dequant_kernel(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr, N, K, group_size,
                    BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, ACT_ORDER: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    PER: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < K // PER
    rn_ok = r_ok[:, None] & (offs_n < N)[None, :]
    zshift = (offs_n % PER) * BITS
    q = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :], mask=rn_ok, other=0)
    for j in tl.static_range(PER):
        k = rows * PER + j
        if ACT_ORDER:
            g = tl.load(g_idx_ptr + k, mask=r_ok, other=0)
        else:
            g = k // group_size
        s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=rn_ok, other=0.0).to(tl.float32)
        qz = tl.load(qzeros_ptr + g[:, None] * (N // PER) + (offs_n // PER)[None, :], mask=rn_ok, other=0)
        z = ((qz >> zshift[None, :]) & MAXQ) + ZERO_OFFSET
        c = (q >> (j * BITS)) & MAXQ
        w = (c - z).to(tl.float32) * s
        tl.store(out_ptr + k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=rn_ok)
