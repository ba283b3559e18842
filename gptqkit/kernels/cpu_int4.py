"""CPU kernel: PyTorch's int4 weight-only matmul for decode, a dequantize-in-cache GEMM for prefill.

Decode (M < PREFILL_M rows) runs `aten._weight_int4pack_mm_for_cpu`, which reads the weight as 4-bit codes and
never materialises it. The op's contract (torch 2.13, checked here):

    _convert_weight_to_int4pack_for_cpu(codes int32 [N, K] in 0..15, innerKTiles=1) -> uint8 [N, K/2] (opaque)
    _weight_int4pack_mm_for_cpu(x [M, K], packed, g, sz [K/g, N, 2] in x's dtype) -> [M, N] in x's dtype
        w[k, n] = (code[k, n] - 8) * sz[k // g, n, 0] + sz[k // g, n, 1]
    g must be 32, 64, 128 or 256; N a multiple of 16; x contiguous. x may be bf16, fp16 or fp32, but only bf16
    has a vectorised path (fp16/fp32 measured ~30x slower on AVX2), so activations go to bf16 for the call.

GPTQ's w = scale * (code - zero) is the same line with sz = (scale, (8 - zero) * scale). 2- and 3-bit codes are
below 16, so they run through the same op exactly (shifted by 8 - zero, which makes the zero term 0). bf16 scales
keep 8 significant bits of the checkpoint's fp16 ones: an error of the same size as rounding x to bf16.

Layouts the op refuses are rewritten once in prepare():
  - act-order (g_idx not sorted): rows are reordered by a stable argsort of g_idx; activations are gathered with
    the same order at every call.
  - groups the op cannot take (576 inputs with group 128 end in a 64-row group; group -1 over 2048 rows; group 48)
    use the largest accepted size that tiles every group, or, when none does, each group is padded with zero rows
    to a multiple of 32 (padded rows read a zero activation).
  - 8 bits, or N not a multiple of 16: no int4 layout; every call dequantizes (slow for decode, logged once).

Prefill (M >= PREFILL_M) dequantizes the persistent GPTQ tensors in K-chunks of CHUNK_K rows that stay in cache
and accumulates a GEMM per chunk (`dense_dtype`: fp32 without native bf16; with AMX or AVX512-BF16, bf16 for
half-precision activations), so no dense copy of the weight is kept. Autograd through x (LoRA on quantized layers)
takes the same differentiable path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..packing import ZERO_OFFSET, unpack

log = logging.getLogger(__name__)

name = "cpu"

GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts, largest (fewest scales) first
# Rows M from which the dequantize + GEMM path beats the int4 GEMV op (whose cost grows linearly with M). Measured
# with `benchmarks/cpu_decode.py --sweep --threads 1` on a 2-core AVX2 EPYC without native bf16 (a shared, loaded
# machine): the first M at which the dense path was faster was 64, 96, 64, 128 and 48 for the 576x1536, 1536x576,
# 2048x2048, 2048x5632 and 5632x2048 layers (2048x5632: int4 op ~1.9 ms at M = 1 and ~0.9 ms per extra row;
# dequantizing ~22 ms once, then an fp32 GEMM at ~0.5 ms per row).
PREFILL_M_AVX2 = 64
# On CPUs with AMX / AVX512-BF16, bf16 GEMMs are several times faster and the issue measured the int4 op at 4x
# slower than a bf16 GEMM by M = 32; not measured here (no such CPU), so the value is the "M >= 8".
PREFILL_M_BF16 = 8
CHUNK_K = 256  # rows dequantized at once: [256, N] fp32 is 1 MB per 1024 columns, so it stays in L2/L3

_logged: set[str] = set()


def _log_once(reason: str, msg: str, *args) -> None:
    """Log `msg` the first time `reason` comes up in this process (one line per reason, not per layer)."""
    if reason not in _logged:
        _logged.add(reason)
        log.info(msg, *args)


def native_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AMX or AVX512-BF16); without them bf16 GEMMs are emulated."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(c()) for c in checks if c is not None)


def dense_dtype(x_dtype: torch.dtype, reduced: bool = False) -> torch.dtype:
    """Compute dtype of the dequantize + GEMM path for activations of x_dtype. Without native bf16: fp32 (emulated
    bf16 GEMMs run ~30x slower). With it: bf16 for half-precision activations; for fp32 ones bf16 only where the
    caller already trades activation precision for speed (`reduced`: the `cpu` and `avx2-q8` kernels outside
    autograd, whose decode rounds x to bf16 / int8 anyway; 2.4x the fp32 GEMM rate on an AVX512-BF16 EPYC) or where
    torch.set_float32_matmul_precision("high" or "medium") allows it; otherwise fp32 products, as torch.matmul."""
    if not native_bf16():
        return torch.float32
    if x_dtype == torch.float32 and not reduced and torch.get_float32_matmul_precision() == "highest":
        return torch.float32
    return torch.bfloat16


def prefill_m() -> int:
    return PREFILL_M_BF16 if native_bf16() else PREFILL_M_AVX2


def _have_int4_op() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


@dataclass(frozen=True)
class Plan:
    int4: bool  # decode through the int4 op (False: every call dequantizes)
    group: int = 0  # the op's group size (one of GROUPS)
    remap: bool = False  # activations are gathered by the `cpu_int4_src` buffer before the op
    padded_k: int = 0  # rows of the int4 layout (K plus zero rows)
    prefill_m: int = PREFILL_M_AVX2
    regular: bool = True  # g_idx[k] == k // group_size: the prefill path broadcasts scales instead of gathering
    why: str = ""  # why the int4 path is off or rewritten, for the log


def supports(layer, device: torch.device | str | None = None) -> str | None:
    device = torch.device(device) if device is not None else layer.qweight.device
    if device.type != "cpu":
        return f"the cpu kernel runs on CPU tensors only, not {device.type}"
    return None


def _int4_layout(g_idx: torch.Tensor, K: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(src [Kp] row of x feeding each int4 row, K for a zero row; the op's group size; group of each op block).

    Rows are sorted by group (stable, so already-sorted g_idx keeps its order). Each group's run of rows must fill
    whole blocks of the op's group size: take the largest accepted size dividing every run, else pad every run
    with zero rows to a multiple of 32.
    """
    order = torch.argsort(g_idx, stable=True)
    groups, counts = torch.unique_consecutive(g_idx[order], return_counts=True)
    for g in GROUPS:
        if bool((counts % g == 0).all()):
            src = order
            break
    else:
        g = GROUPS[-1]
        pieces, start = [], 0
        for c in counts.tolist():
            pieces.append(order[start:start + c])
            if c % g:
                pieces.append(torch.full((g - c % g,), K, dtype=order.dtype))
            start += c
        src = torch.cat(pieces)
    block_group = torch.repeat_interleave(groups, (counts + g - 1) // g)  # [Kp / g]
    return src, g, block_group


def prepare(layer) -> None:
    K, N, bits = layer.in_features, layer.out_features, layer.bits
    g_idx = layer.g_idx.long().cpu()
    gs = layer.group_size if layer.group_size != -1 else K
    regular = bool((g_idx == torch.arange(K) // gs).all())
    why = []
    if bits not in (2, 3, 4):
        why.append(f"{bits}-bit codes do not fit the int4 op")
    if N % 16:
        why.append(f"out_features {N} is not a multiple of 16")
    if not _have_int4_op():
        why.append(f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu")
    if why:
        layer._cpu_plan = Plan(int4=False, prefill_m=prefill_m(), regular=regular, why="; ".join(why))
        _log_once(layer._cpu_plan.why, "cpu kernel: %s (first seen on a %dx%d layer): such layers dequantize at "
                  "every call, which is slow for decode", layer._cpu_plan.why, K, N)
        return

    src, g, block_group = _int4_layout(g_idx, K)
    identity = src.numel() == K and bool((src == torch.arange(K)).all())
    notes = []
    if not bool((g_idx[1:] >= g_idx[:-1]).all()):
        notes.append("act-order g_idx: rows reordered once, activations gathered per call")
    if src.numel() > K:
        notes.append(f"groups padded with zero rows, K {K} -> {src.numel()}")
    if gs != g and src.numel() == K:
        notes.append(f"group {layer.group_size} run as int4 op group {g}")
    plan = Plan(int4=True, group=g, remap=not identity, padded_k=src.numel(), prefill_m=prefill_m(),
                regular=regular, why="; ".join(notes))
    if notes:
        _log_once(plan.why, "cpu kernel, %dx%d layer, group %d: %s", K, N, layer.group_size, plan.why)

    codes = _codes_rows(layer, 0, K).cpu()  # [K, N], uint8 except for 3 bits
    zeros = _zeros(layer).cpu()  # [G, N] int32
    # 2/3-bit codes are shifted by d = 8 - zero (they stay below 16), so the op's zero term s * (8 - d - zero) is
    # exactly 0; otherwise the bf16-rounded term would be several times the weights it cancels against.
    shift = (8 - zeros).clamp(0, 16 - 2**bits) if bits < 4 else torch.zeros_like(zeros)
    if bits < 4:
        codes = codes.to(torch.uint8) + shift.to(torch.uint8)[g_idx]
    if plan.remap:  # [Kp, N]; padded rows read the zero activation at index K
        codes = torch.cat([codes, torch.zeros(1, N, dtype=codes.dtype)])[src]
    s = layer.scales.cpu().float()[block_group]  # [Kp/g, N]
    zt = (8 - shift - zeros).float()[block_group] * s
    sz = torch.stack([s, zt], dim=-1).to(torch.bfloat16).contiguous()  # [Kp/g, N, 2]
    # The op takes int32 codes [N, Kp]; one transposing copy makes them (transient memory: 4 bytes per weight).
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        codes.T.to(torch.int32, memory_format=torch.contiguous_format), 1)  # [N, Kp/2] uint8
    layer.register_buffer("cpu_int4_packed", packed, persistent=False)
    layer.register_buffer("cpu_int4_sz", sz, persistent=False)
    if plan.remap:
        layer.register_buffer("cpu_int4_src", src, persistent=False)
    layer._cpu_plan = plan


def _zeros(layer) -> torch.Tensor:
    """True zero points [G, N] int32. The transposed copy is laid out explicitly: packing.unpack_qzeros fails on
    G = 1 (group -1), where qzeros.T.contiguous() keeps column strides that a .view inside unpack rejects."""
    q = layer.qzeros
    t = torch.empty(q.shape[1], q.shape[0], dtype=q.dtype, device=q.device).copy_(q.T)  # [N*bits/32, G]
    return unpack(t, layer.bits).T + ZERO_OFFSET[layer.checkpoint_format]


def _codes_rows(layer, k0: int, k1: int) -> torch.Tensor:
    """Integer codes of input rows [k0, k1) as [k1 - k0, N] (uint8 for 2/4/8 bits); k0, k1 multiples of 32 or K."""
    bits, qw = layer.bits, layer.qweight
    if bits == 3:
        return unpack(qw[k0 * 3 // 32:k1 * 3 // 32], 3)
    N, per_word = qw.shape[1], 32 // bits
    # int32 words are little-endian: byte j of word r holds rows r*per_word + j*(8/bits) ..., lowest bits first.
    # Transposing the bytes first ([R, N, 4] -> [R, 4, N]) keeps the bit operations below on contiguous memory.
    b = qw[k0 // per_word:k1 // per_word].contiguous().view(torch.uint8).view(-1, N, 4).transpose(1, 2).contiguous()
    if bits == 8:
        return b.view(-1, N)
    per_byte, mask = 8 // bits, (1 << bits) - 1
    out = torch.empty(b.shape[0], 4, per_byte, N, dtype=torch.uint8, device=qw.device)  # [R, 4, 8/bits, N]
    for j in range(per_byte):
        if j == 0:
            torch.bitwise_and(b, mask, out=out[:, :, 0])
        elif j == per_byte - 1:
            torch.bitwise_right_shift(b, j * bits, out=out[:, :, j])
        else:
            out[:, :, j] = torch.bitwise_right_shift(b, j * bits).bitwise_and_(mask)
    return out.view(-1, N)


def dense_matmul(layer, x: torch.Tensor, dtype: torch.dtype, regular: bool) -> torch.Tensor:
    """x [M, K] (dtype) @ W [K, N], W dequantized CHUNK_K rows at a time from the persistent GPTQ tensors.
    regular: g_idx[k] == k // group_size, so scales broadcast over whole groups instead of being gathered per row."""
    K, N = layer.in_features, layer.out_features
    g_idx = layer.g_idx.long()
    scales = layer.scales.to(dtype)  # [G, N]
    sz = scales * _zeros(layer).to(dtype)  # [G, N]
    gs = layer.group_size if layer.group_size != -1 else K
    y = None
    for k0 in range(0, K, CHUNK_K):
        k1 = min(k0 + CHUNK_K, K)
        c = _codes_rows(layer, k0, k1)  # [kc, N]
        g0, g1 = k0 // gs, (k1 - 1) // gs
        if regular and g0 == g1:
            W = torch.addcmul(-sz[g0], c, scales[g0])
        elif regular and k0 % gs == 0 and (k1 - k0) % gs == 0:
            W = torch.addcmul(-sz[g0:g1 + 1, None], c.view(-1, gs, N), scales[g0:g1 + 1, None]).view(-1, N)
        else:
            rows = g_idx[k0:k1]
            W = torch.addcmul(-sz[rows], c, scales[rows])
        y = x[:, k0:k1] @ W if y is None else y.addmm_(x[:, k0:k1], W)
    return y


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    plan: Plan = layer._cpu_plan
    K, N = layer.in_features, layer.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    grad = torch.is_grad_enabled() and x.requires_grad
    if plan.int4 and M < plan.prefill_m and not grad:
        xb = x2.to(torch.bfloat16)
        if plan.remap:
            if plan.padded_k > K:
                xb = torch.nn.functional.pad(xb, (0, 1))  # column K is the zero that pad rows read
            xb = xb.index_select(1, layer.cpu_int4_src)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), layer.cpu_int4_packed, plan.group,
                                                       layer.cpu_int4_sz).to(x.dtype)
    else:
        dt = dense_dtype(x.dtype, reduced=not grad)
        y = dense_matmul(layer, x2.to(dt), dt, plan.regular).to(x.dtype)
    if layer.bias is not None:
        y = y + layer.bias.to(x.dtype)
    return y.view(*lead, N)
