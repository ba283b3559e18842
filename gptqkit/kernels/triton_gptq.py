"""Triton kernels for GPTQ layers on CUDA: a one-row kernel for decode, a tensor-core kernel for small batches,
dequantize + cuBLAS above.

They read the checkpoint tensors exactly as stored (FORMAT.md), 2, 4 and 8 bits, fp16 or bf16 activations:

    qweight  int32 [K*b/32, N]   codes packed along K, code j of a word at bits [j*b, (j+1)*b)
    qzeros   int32 [G, N*b/32]   zero points packed along N; v1 ("gptq") stores zero - 1
    scales   fp16  [G, N]        W[k, n] = scales[g, n] * (code[k, n] - zero[g, n]),  g = g_idx[k]

A K tile is ROWS packed int32 rows [ROWS, BLOCK_N]. Code j of every word sits at input feature k0 + r*PER + j, and
a sum over k takes its terms in any order, so the tile is consumed as PER partial products of the strided
x[:, k0 + j :: PER] [., ROWS] with codes_j [ROWS, BLOCK_N]: nothing is unpacked into memory.

- gemv (M = 1, decode at batch 1; Config.dot False): CUDA-core FMAs into an accumulator shaped like the qweight
  tile, summed across rows once at the end. Per code: one LOP3 makes its float (below), one FADD subtracts the
  zero, one FFMA multiplies-adds x. K is split across programs; their fp32 partial sums meet by atomic adds in a
  per-layer workspace, and the last program of each column tile writes the output and zeroes the workspace, so a
  call is one launch (no zero-fill, no cast kernel). One workspace per layer: one layer must not run on two
  streams at once.
- fused (tensor cores, BLOCK_M = 16 rows, M > 1): codes_j - zero becomes fp16/bf16 and goes into tl.dot with an fp32
  accumulator; split-K partial sums meet by atomic adds in a zeroed fp32 output.

Codes become floats by the magic-number trick instead of the slow int->float conversion: OR the code into the
mantissa of a power of two and reinterpret the bits; the constant cancels in code - zero, which is exact.

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
(M bucket, K, N, bits, group, dtype) by timing both on first use; at or below DECODE_M a fused kernel always
runs. Its tiling (BLOCK_N, ROWS, split-K, warps) is chosen the same way: a small timed search over candidates()
(CUDA-graph replays over copies of the weights, see _measure), cached in-process like triton.autotune; a fixed
configuration under TRITON_INTERPRET=1, and the first candidate with TUNE = False or during CUDA-graph capture
(warm up before capturing).

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
    dot: bool = True  # tensor cores (tl.dot, fused_matmul); False: the one-row CUDA-core kernel (gemv), M = 1 only
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
    # The one-row kernel's split-K meeting place, zero between calls: fp32 partial sums [N] and one arrival
    # count per column tile (tiles of at least 64 columns). Not checkpoint tensors, so not persistent.
    dev = layer.qweight.device
    layer.register_buffer("triton_ws", torch.zeros(layer.out_features, dtype=torch.float32, device=dev),
                          persistent=False)
    layer.register_buffer("triton_cnt", torch.zeros(_cdiv(layer.out_features, 64), dtype=torch.int32, device=dev),
                          persistent=False)


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
    if cfg is None:
        y = dequant_matmul(layer, x2)
    else:
        y = fused_matmul(layer, x2, cfg) if cfg.dot else gemv(layer, x2, cfg)
    return y.reshape(*lead, N)


# ----------------------------------------------------------------------------------------------- entry points


def fused_matmul(layer, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """x [M, K] fp16/bf16 contiguous -> x @ W + bias [M, N] in x.dtype, by the tensor-core kernel with tiling `cfg`."""
    k = _jit()
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the fused kernel takes fp16 or bf16 activations, got {x.dtype}")
    if not cfg.dot:
        raise ValueError(f"{cfg} is a one-row tiling; use gemv()")
    M, K = x.shape
    N, bits = layer.out_features, layer.bits
    G, g = layer.scales.shape[0], _group(layer)
    block_m = _block_m(M)
    block_k = cfg.rows * 32 // bits
    act_order = layer.triton_act_order
    row_groups = act_order or not (G == 1 or g % block_k == 0)
    tiles = _cdiv(K, block_k)
    per_split = _cdiv(tiles, max(1, min(cfg.split_k, tiles)))
    split = _cdiv(tiles, per_split)
    # The float a code becomes, and the magic constant that makes it without an int->float conversion:
    # OR the code into the mantissa of 1024 (fp16, 10-bit mantissa) or 128 (bf16, 7 bits: codes and zeros up to
    # 16, so 8-bit bf16 converts). The interpreter (numpy) has no bf16 arithmetic: fp32 there.
    if x.dtype == torch.bfloat16 and interpreting():
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
        x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bias, out, M, N, K, g, per_split,
        BITS=bits, ZERO_OFFSET=ZERO_OFFSET[layer.checkpoint_format], CT=ct, MAGIC=magic,
        ROW_GROUPS=row_groups, ACT_ORDER=act_order, HAS_BIAS=layer.bias is not None, ATOMIC=split > 1,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, ROWS=cfg.rows, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.to(x.dtype) if split > 1 else out


def gemv(layer, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """x [1, K] -> x @ W + bias [1, N] in x.dtype by the one-row kernel, in one launch (see _gemv_kernel)."""
    k = _jit()
    N, K, bits = layer.out_features, layer.in_features, layer.bits
    per, g = 32 // bits, _group(layer)
    k_rows = K // per
    rows = cfg.rows
    split = max(1, min(cfg.split_k, _cdiv(k_rows, rows)))
    rows_per_split = _cdiv(_cdiv(k_rows, split), rows) * rows  # whole tiles per K slice
    split = _cdiv(k_rows, rows_per_split)
    if layer.triton_act_order or g % per:  # groups per input feature (g_idx), not per packed word
        groups = 2
    else:
        groups = 0 if (g >= K or g % (rows * per) == 0) else 1
    even = N % cfg.block_n == 0 and rows_per_split * split == k_rows
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    bias = layer.bias if layer.bias is not None else layer.scales
    k.gemv[(_cdiv(N, cfg.block_n), split)](
        x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bias, out, layer.triton_ws, layer.triton_cnt,
        N, K, g, rows_per_split, 0x4B000000,
        BITS=bits, ZERO_OFFSET=ZERO_OFFSET[layer.checkpoint_format], GROUPS=groups, HAS_BIAS=layer.bias is not None,
        SPLIT=split > 1, EVEN=even, BLOCK_N=cfg.block_n, ROWS=rows, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


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

    M = 1 (gemv): measured on an H100 (benchmarks/gpu_kernels.py), the fastest tilings give each thread 4-8 columns
    of a few packed rows and split K until there are 2-10 programs per SM, most often one or two K tiles each.
    M > 1 (tensor cores): K tiles that fit inside a group are preferred (scale applied once per tile), and K is
    split until there are one to four programs per SM (each split keeps at least two K tiles).
    """
    per = 32 // bits
    single_group = group_size >= K
    out: list[Config] = []
    if M == 1:
        for block_n, rows, warps in ((512, 4, 4), (1024, 4, 8), (512, 8, 4), (256, 4, 2), (128, 8, 2)):
            while not single_group and group_size % (rows * per):
                rows //= 2
            k_tiles, cols = _cdiv(K // per, rows), _cdiv(N, block_n)
            splits = [s for s in (1, 2, 4, 8, 16, 32, 64, 128) if s <= k_tiles and cols * s <= 12 * sms]
            out += [Config(block_n, rows, s, False, warps) for s in splits[-2:][::-1]]
        return out
    m_tiles = _cdiv(M, _block_m(M))
    # tl.dot needs ROWS >= 16; the largest two tile heights that fit in a group (else per-row groups)
    rows_opts = [r for r in (16, 32) if single_group or group_size % (r * per) == 0]
    for block_n in (64, 32, 128):
        for rows in rows_opts[-2:] or [16]:
            k_tiles = _cdiv(K, rows * per)
            progs = _cdiv(N, block_n) * m_tiles
            splits = [s for s in (1, 2, 4, 8, 16) if s == 1 or s <= k_tiles // 2]
            fit = [s for s in splits if progs * s <= 4 * sms] or [1]
            keep = sorted(set(fit[-2:]) | ({1} if progs >= sms else set()))
            enough = [s for s in keep if progs * s >= sms]
            first = enough[0] if enough else keep[-1]
            out += [Config(block_n, rows, s) for s in [first] + [s for s in keep if s != first]]
    return out + [Config(c.block_n, c.rows, c.split_k, c.dot, c.num_warps, 2) for c in out[:1]]


# ------------------------------------------------------------------------------------------------------ helpers


def _group(layer) -> int:
    return layer.in_features if layer.group_size == -1 else layer.group_size


def _block_m(M: int) -> int:
    return 16 if M <= 16 else 32 if M <= 32 else 64


def _bucket(M: int) -> int:
    return 1 << max(0, M - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _measure(layer, M: int, dtype: torch.dtype, cands: list[Config]) -> Config | None:
    """Time each candidate (and dequantize + cuBLAS above DECODE_M) on a random input; return the fastest.

    Timed as CUDA-graph replays, as a decode loop runs them: eager timing of a few-microsecond kernel measures
    Python's launch. The calls rotate over copies of the layer's tensors, together at least twice the L2 cache,
    so each call streams its weights from memory as in a model; too little free memory for copies: one.
    """
    x = torch.randn(M, layer.in_features, dtype=dtype, device=layer.qweight.device)
    twins = _twins(layer)
    options: list[Config | None] = list(cands) + ([None] if M > DECODE_M else [])
    best, best_us = cands[0], float("inf")
    for c in options:
        if c is None:
            fns = [lambda t=t: dequant_matmul(t, x) for t in twins]
        elif c.dot:
            fns = [lambda t=t, c=c: fused_matmul(t, x, c) for t in twins]
        else:
            fns = [lambda t=t, c=c: gemv(t, x, c) for t in twins]
        try:
            with torch.cuda.device(layer.qweight.device):  # the graph is captured on the layer's device
                us = graph_us(fns)
        except Exception as e:  # a tiling the compiler rejects (e.g. out of shared memory) is skipped
            log.debug("triton config %s failed: %s", c, e)
            continue
        if us < best_us:
            best, best_us = c, us
    return best


def _twins(layer) -> list:
    """The layer plus copies of its streamed tensors (qweight, qzeros, scales), at least 2x L2 in all."""
    dev = layer.qweight.device
    nbytes = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales))
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20) or (50 << 20)
    need = min(8, _cdiv(2 * l2, nbytes)) - 1
    need = min(need, int(torch.cuda.mem_get_info(dev)[0] * 0.5) // nbytes)
    names = ("in_features", "out_features", "bits", "group_size", "checkpoint_format", "triton_act_order", "g_idx",
             "bias")
    twins = [layer]
    for _ in range(max(0, need)):
        t = SimpleNamespace(**{n: getattr(layer, n) for n in names})
        t.qweight, t.qzeros, t.scales = layer.qweight.clone(), layer.qzeros.clone(), layer.scales.clone()
        t.triton_ws, t.triton_cnt = torch.zeros_like(layer.triton_ws), torch.zeros_like(layer.triton_cnt)
        twins.append(t)
    return twins


def graph_us(fns: list, calls: int = 32, reps: int = 5) -> float:
    """Median microseconds per call of fns (called in turn) replayed from one captured CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the capture: compiles, allocator pools
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    del g
    return sorted(times)[len(times) // 2]


_KERNELS: SimpleNamespace | None = None


def _jit() -> SimpleNamespace:
    """Import Triton and decorate the kernels, once. Triton resolves names in a kernel through the module's
    globals, so `triton` and `tl` become module globals here rather than at import."""
    global _KERNELS, triton, tl, _as_float
    if _KERNELS is None:
        import triton
        import triton.language as tl

        _as_float = triton.jit(_as_float)  # the kernels call it by this global name
        _KERNELS = SimpleNamespace(fused=triton.jit(_fused_kernel), dequant=triton.jit(_dequant_kernel),
                                   gemv=triton.jit(_gemv_kernel))
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
                  M, N, K, group_size, tiles_per_split,
                  BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, CT: tl.constexpr, MAGIC: tl.constexpr,
                  ROW_GROUPS: tl.constexpr, ACT_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr,
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
    t_lo = pid_k * tiles_per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The weight stream is prefetched one tile ahead by hand: the loads are not dot operands, so Triton's
    # pipeliner may leave them alone, and a small-batch kernel lives on memory-level parallelism.
    row_end = tl.minimum(k_rows, (t_lo + tiles_per_split) * ROWS)  # this split's packed rows end here
    rows = t_lo * ROWS + offs_r
    q_next = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :],
                     mask=(rows < row_end)[:, None] & n_ok[None, :], other=0)
    for i in range(0, tiles_per_split):
        t = t_lo + i
        rows = t * ROWS + offs_r  # [ROWS] packed rows of this tile
        r_ok = rows < k_rows
        rn_ok = r_ok[:, None] & n_ok[None, :]
        q = q_next  # [ROWS, BLOCK_N] int32
        ahead = rows + ROWS
        q_next = tl.load(qweight_ptr + ahead[:, None] * N + offs_n[None, :],
                         mask=(ahead < row_end)[:, None] & n_ok[None, :], other=0)
        if not ROW_GROUPS:
            # the whole tile lies in one group; a tile past K (the last split's) reads the last group's scales
            grp = tl.minimum((t * BLOCK_K) // group_size, (K - 1) // group_size)
            s = tl.load(scales_ptr + grp * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            qz = tl.load(qzeros_ptr + grp * NZ + zcol, mask=n_ok, other=0)
            z = ((qz >> zshift) & MAXQ) + ZERO_OFFSET  # [BLOCK_N] true zero points
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            zf = _as_float(z, CT, MAGIC)
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
            else:  # code - zero, exact in CT; the tile's scale multiplies the partial sum
                w = _as_float((q >> (j * BITS)) & MAXQ, CT, MAGIC) - zf[None, :]
            xj = tl.load(x_ptr + offs_m[:, None] * K + k[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            if ROW_GROUPS:
                acc = tl.dot(xj.to(CT), w, acc)
            else:
                part = tl.dot(xj.to(CT), w, part)
        if not ROW_GROUPS:
            acc += part * s[None, :]
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


def _gemv_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                 N, K, group_size, rows_per_split, magic,
                 BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    # One row of x (decode at batch 1) on CUDA cores. A program owns BLOCK_N columns and rows_per_split packed
    # rows (a K slice). Each thread holds every row of the [ROWS, BLOCK_N] tile for BLOCK_N / threads columns, so
    # the x values it needs (ROWS * PER per tile) are few per word it streams.
    # GROUPS 0: each K tile lies in one group (scale per tile); 1: per packed row (groups smaller than a tile);
    # 2: per input feature from g_idx (act-order, or groups that split a packed word). SPLIT: the K slices meet in
    # the fp32 workspace ws [N]; the last program of a column tile (counted in cnt) writes out and zeroes ws and its
    # counter, so one launch does it.
    PER: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    # magic = 0x4B000000 (2^23 as fp32), passed at run time: as a register it fits the third input of the one
    # LOP3 that makes each code's float, (q & mask) | magic; a constant would cost a MOV per code.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    n_ok = offs_n < N
    k_rows = K // PER
    NZ = N // PER
    zshift = (offs_n % PER) * BITS
    zcol = offs_n // PER
    r0 = pid_k * rows_per_split
    q_ptrs = qweight_ptr + (r0 + offs_r)[:, None] * N + offs_n[None, :]
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for t in range(0, rows_per_split, ROWS):
        rows = r0 + t + offs_r  # [ROWS] packed rows
        r_ok = rows < k_rows
        rn_ok = r_ok[:, None] & n_ok[None, :]
        if EVEN:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=rn_ok, other=0)
        q_ptrs += ROWS * N
        q_hi = (q >> 16) & 0xFFFF
        if GROUPS == 0:
            # the last slice's tiles may lie past K (their q and x are masked to 0): read the last group's finite
            # scales for them rather than whatever follows the tensor
            grp = tl.minimum(((r0 + t) * PER) // group_size, (K - 1) // group_size)
            s = tl.load(scales_ptr + grp * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            qz = tl.load(qzeros_ptr + grp * NZ + zcol, mask=n_ok, other=0)
            z = (((qz >> zshift) & MAXQ) + ZERO_OFFSET)[None, :]
        elif GROUPS == 1:
            g = (rows * PER) // group_size
            s = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=rn_ok, other=0.0).to(tl.float32)
            qz = tl.load(qzeros_ptr + g[:, None] * NZ + zcol[None, :], mask=rn_ok, other=0)
            z = ((qz >> zshift[None, :]) & MAXQ) + ZERO_OFFSET
        part = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(PER):
            k = rows * PER + j
            if EVEN:
                xj = tl.load(x_ptr + k).to(tl.float32)
            else:
                xj = tl.load(x_ptr + k, mask=r_ok, other=0.0).to(tl.float32)
            # Code j stays at its bit position P (in q, or in q >> 16 once the field would reach bit 23, the
            # exponent) and becomes a float by one LOP3 with the exponent of 2^(23 - P): its mantissa's last bit is
            # then worth 2^-P, so float(m_P | code << P) = 2^(23 - P) + code exactly, and the same for the zero:
            # their difference is code - zero, exact, by one FADD.
            if j * BITS + BITS + 1 <= 23:
                P = j * BITS
                cf = (q & (MAXQ << P) | (magic - (P << 23))).to(tl.float32, bitcast=True)
            else:
                P = j * BITS - 16
                cf = (q_hi & (MAXQ << P) | (magic - (P << 23))).to(tl.float32, bitcast=True)
            xs = xj[:, None]
            if GROUPS == 2:
                g = tl.load(g_idx_ptr + k, mask=r_ok, other=0)
                sr = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=rn_ok, other=0.0).to(tl.float32)
                qz = tl.load(qzeros_ptr + g[:, None] * NZ + zcol[None, :], mask=rn_ok, other=0)
                zr = ((qz >> zshift[None, :]) & MAXQ) + ZERO_OFFSET
                acc += xs * ((cf - ((zr << P) | (magic - (P << 23))).to(tl.float32, bitcast=True)) * sr)
            else:
                part += xs * (cf - ((z << P) | (magic - (P << 23))).to(tl.float32, bitcast=True))
        if GROUPS == 0:
            acc += part * s[None, :]
        elif GROUPS == 1:
            acc += part * s
    res = tl.sum(acc, axis=0)  # [BLOCK_N]: the rows are all in-thread, no shuffles
    if SPLIT:
        tl.atomic_add(ws_ptr + offs_n, res, mask=n_ok, sem="relaxed")
        tl.debug_barrier()  # every thread's share is issued before the count says this program is done
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if done == tl.num_programs(1) - 1:  # the last K slice of this column tile: the sum is complete
            # read the sums where the atomics landed (L2: an atomic add of 0), then leave ws and the count zero
            # for the next call; plain stores suffice, the next launch comes after this one on the stream
            res = tl.atomic_add(ws_ptr + offs_n, tl.zeros_like(res), mask=n_ok, sem="relaxed")
            tl.store(ws_ptr + offs_n, tl.zeros_like(res), mask=n_ok)
            tl.store(cnt_ptr + pid_n, 0)
            if HAS_BIAS:
                res += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs_n, res.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        if HAS_BIAS:
            res += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, res.to(out_ptr.dtype.element_ty), mask=n_ok)
