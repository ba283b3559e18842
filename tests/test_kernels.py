"""The CPU kernel against the oracle: float64 math on the reference dequantization of the same checkpoint tensors.

Inputs are rounded to the activation dtype first, so the measured error is only what the kernel adds: bf16
activations and scales on the int4 path (relative error a few 1e-3), fp32 accumulation on the prefill path.
"""

import dataclasses
import gc
import logging
from pathlib import Path

import pytest
import torch

from gptqkit import kernels
from gptqkit.cache import cache_kwarg, output_cache
from gptqkit.kernels import cpu_avx2, cpu_avx2_q8, cpu_int4, reference
from gptqkit.qlinear import QuantLinear
from gptqkit.quant import QuantResult
from conftest import CORPORA, stories_checkpoint

ASSETS = Path(__file__).resolve().parents[2] / "shared/assets"
MODEL = ASSETS / "models/stories260K"
TINY = ASSETS / "corpora/calibration/tiny.txt"

INT4_TOL = 1e-2  # bf16 activations, scales and output: each rounds to 8 significant bits (2^-9 = 2e-3)
FP32_TOL = 1e-5


def random_layer(K, N, bits, group_size, act_order=False, sym=True, fmt="gptq", bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    g = K if group_size == -1 else group_size
    G = -(-K // g)
    codes = torch.randint(0, maxq + 1, (N, K), generator=gen).to(torch.uint8)
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 1e-3).half().float()
    if sym:
        zeros = torch.full((G, N), (maxq + 1) // 2, dtype=torch.int32)
    else:
        zeros = torch.randint(1 if fmt == "gptq" else 0, maxq + 1, (G, N), generator=gen).to(torch.int32)
    if act_order:
        perm = torch.randperm(K, generator=gen)
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = (torch.arange(K) // g).to(torch.int32)
    else:
        g_idx = (torch.arange(K) // g).to(torch.int32)
    b = torch.randn(N, generator=gen) * 0.1 if bias else None
    return QuantLinear.from_result(QuantResult(codes, scales, zeros, g_idx), b, bits, group_size, fmt)


def slow_unpack(words, bits):
    """int32 [R, C] packed along dim 0 -> int64 codes [R*32/bits, C], straight from FORMAT.md: codes sit lowest
    bits first, code j of a unit at bits [j*bits, (j+1)*bits); a unit is one word (2/4/8 bits) or, for 3 bits, the
    96-bit stream of three words holding 32 codes."""
    R, C = words.shape
    unit = 3 if bits == 3 else 1
    per = 32 * unit // bits
    w = (words.to(torch.int64) & 0xFFFFFFFF).tolist()
    out = [[0] * C for _ in range(R * 32 // bits)]
    for u in range(R // unit):
        for c in range(C):
            stream = sum(w[u * unit + i][c] << (32 * i) for i in range(unit))
            for j in range(per):
                out[u * per + j][c] = (stream >> (j * bits)) & ((1 << bits) - 1)
    return torch.tensor(out, dtype=torch.int64)


def oracle_weight(layer):
    """[K, N] float64 from the checkpoint tensors, independent of gptqkit.packing."""
    codes = slow_unpack(layer.qweight, layer.bits)
    zeros = slow_unpack(layer.qzeros.T, layer.bits).T + (1 if layer.checkpoint_format == "gptq" else 0)
    g = layer.g_idx.long()
    return layer.scales.double()[g] * (codes - zeros[g]).double()


def oracle(layer, x):
    if not hasattr(layer, "_oracle_w"):
        layer._oracle_w = oracle_weight(layer)
    y = x.double() @ layer._oracle_w
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y


def dense_tol(dtype, reduced=True):
    """The dequantize + GEMM path matches float64 to fp32 rounding only where it computes in fp32: bf16 for the
    approximate kernels (reduced) on CPUs with native bf16, see cpu_int4.dense_dtype."""
    return FP32_TOL if cpu_int4.dense_dtype(dtype, reduced) == torch.float32 else INT4_TOL


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def run_path(layer, x, path):
    """Force the int4 op ("int4") or the dequantize + GEMM path ("dense") whatever M is."""
    plan = layer._cpu_plan
    layer._cpu_plan = dataclasses.replace(plan, prefill_m=1 << 30 if path == "int4" else 0)
    try:
        with torch.no_grad():
            return cpu_int4.forward(layer, x)
    finally:
        layer._cpu_plan = plan


def prepared(layer):
    layer.use_kernel(cpu_int4)
    return layer


CASES = [(bits, gs, act) for bits in (2, 3, 4, 8) for gs in (32, 64, 128, -1) for act in (False, True)]


@pytest.mark.parametrize("bits,group_size,act_order", CASES)
def test_random_layers_against_oracle(bits, group_size, act_order):
    i = CASES.index((bits, group_size, act_order))
    sym, fmt, bias = i % 2 == 0, ("gptq", "gptq_v2")[(i // 2) % 2], (i // 4) % 2 == 1
    layer = prepared(random_layer(256, 96, bits, group_size, act_order, sym, fmt, bias, seed=i))
    gen = torch.Generator().manual_seed(100 + i)
    for M in (1, 3, 17, 64):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(M, 256, generator=gen).to(dtype)
            ref = oracle(layer, x)
            paths = ("int4", "dense") if layer._cpu_plan.int4 else ("dense",)
            for path in paths:
                y = run_path(layer, x, path)
                assert y.dtype == dtype and y.shape == (M, 96)
                tol = dense_tol(dtype) if path == "dense" else INT4_TOL
                assert rel_err(y, ref) < tol, (path, M, dtype)
            with torch.no_grad():  # the automatic choice
                assert rel_err(layer(x), ref) < INT4_TOL


def test_error_is_bf16_sized_not_zero():
    """The int4 path's error sits at bf16 rounding: well under the tolerance, and not exact (bf16 is in play)."""
    layer = prepared(random_layer(512, 128, 4, 128, sym=False, seed=7))
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
    e = rel_err(run_path(layer, x, "int4"), oracle(layer, x))
    assert 1e-4 < e < 5e-3


@pytest.mark.parametrize("K,N,group_size,act_order,expect_pad", [
    (576, 64, 128, False, False),  # SmolLM2's 576 with group 128: runs as op group 64, no padding
    (576, 64, 128, True, False),
    (576, 32, 48, False, True),  # group 48 fills no accepted size: each group padded to 64 rows
    (576, 32, 48, True, True),
    (40, 32, -1, False, True),  # K = 40 < 32-multiple: one group padded to 64
    (2048, 32, -1, False, False),  # group -1 over 2048 rows runs as op group 256
])
def test_shapes_the_op_refuses(K, N, group_size, act_order, expect_pad):
    layer = prepared(random_layer(K, N, 4, group_size, act_order, sym=False, fmt="gptq_v2", bias=True, seed=K))
    plan = layer._cpu_plan
    assert plan.int4 and (plan.padded_k > K) == expect_pad and plan.remap == (expect_pad or act_order)
    for M in (1, 5, 64):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
        ref = oracle(layer, x)
        assert rel_err(run_path(layer, x, "int4"), ref) < INT4_TOL
        assert rel_err(run_path(layer, x, "dense"), ref) < dense_tol(torch.float32)


def test_dense_dtype_policy(monkeypatch):
    """fp32 products for fp32 activations unless the kernel is approximate anyway or torch's precision knob says so;
    bf16 only where the CPU has it natively."""
    f32, b16 = torch.float32, torch.bfloat16
    monkeypatch.setattr(cpu_int4, "native_bf16", lambda: False)
    assert {cpu_int4.dense_dtype(d, r) for d in (f32, b16) for r in (False, True)} == {f32}
    monkeypatch.setattr(cpu_int4, "native_bf16", lambda: True)
    assert (cpu_int4.dense_dtype(f32), cpu_int4.dense_dtype(f32, reduced=True), cpu_int4.dense_dtype(b16)) == (
        f32, b16, b16)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert cpu_int4.dense_dtype(f32) == b16
    finally:
        torch.set_float32_matmul_precision(before)


def test_fallback_shapes_run_and_log_once(caplog):
    cpu_int4._logged.clear()
    with caplog.at_level(logging.INFO, logger="gptqkit.kernels.cpu_int4"):
        a = prepared(random_layer(128, 40, 4, 32, seed=1))  # N = 40 is not a multiple of 16
        b = prepared(random_layer(128, 64, 8, 64, seed=2))
        c = prepared(random_layer(128, 96, 8, 32, seed=3))  # another shape, the same reason
    assert not a._cpu_plan.int4 and not b._cpu_plan.int4
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("not a multiple of 16" in m for m in msgs) == 1
    assert sum("8-bit" in m for m in msgs) == 1  # b and c share the reason: logged once
    for layer in (a, b, c):
        x = torch.randn(2, 3, 128)
        with torch.no_grad():
            y = layer(x)
        assert y.shape == (2, 3, layer.out_features)
        assert rel_err(y, oracle(layer, x)) < dense_tol(torch.float32)


def test_state_dict_is_the_checkpoint():
    layer = random_layer(576, 64, 4, 128, act_order=True, bias=True, seed=3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    prepared(layer)
    with torch.no_grad():
        layer(torch.randn(1, 576))
        layer(torch.randn(100, 576))
    after = layer.state_dict()
    assert list(after) == list(before) == ["qweight", "qzeros", "scales", "g_idx", "bias"]
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert {n for n, _ in layer.named_buffers()} >= {"cpu_int4_packed", "cpu_int4_sz", "cpu_int4_src"}


def test_leading_dims_and_automatic_choice():
    layer = prepared(random_layer(256, 64, 4, 64, seed=4))
    for shape in ((1, 1, 256), (2, 7, 256), (1, 300, 256)):
        x = torch.randn(*shape, dtype=torch.bfloat16)
        with torch.no_grad():
            y = layer(x)
        assert y.shape == (*shape[:-1], 64) and y.dtype == torch.bfloat16
        assert rel_err(y, oracle(layer, x)) < INT4_TOL


def test_gradient_through_activations():
    """LoRA on quantized layers backpropagates through x: the kernel takes its differentiable path."""
    layer = prepared(random_layer(256, 64, 4, 32, act_order=True, sym=False, bias=True, seed=5))
    x = torch.randn(3, 256, requires_grad=True)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    reference.forward(layer, x_ref).square().sum().backward()
    assert rel_err(x.grad, x_ref.grad.double()) < FP32_TOL


def test_selection_on_cpu_and_refusal_elsewhere():
    layer = random_layer(128, 64, 4, 32)
    k, why = kernels.select(layer, "cpu")
    if isinstance(cpu_avx2.library(), str):
        assert k is cpu_int4 and why == [f"avx2-q8: {cpu_avx2.library()}", f"avx2: {cpu_avx2.library()}"]
    else:
        assert k is cpu_avx2_q8 and why == []
    three = random_layer(128, 64, 3, 32)
    assert cpu_avx2.supports(three) == "it reads 4-bit codes only, this layer has 3"  # avx2: fp32 activations
    k, why = kernels.select(three, "cpu")
    if not isinstance(cpu_avx2.library(), str):
        assert k is cpu_avx2_q8 and why == []  # 2/3/8-bit int8 sums
        # a group of 16 rows is not whole 32-row words of 3-bit codes, nor 8 rows 16-row words of 2-bit ones
        for bits, group in ((3, 16), (2, 8)):
            k, why = kernels.select(random_layer(128, 64, bits, group), "cpu")
            assert k is cpu_int4 and f"a group of {group} rows is not a whole number of {2 * group}-row words" in why[0]
    assert cpu_int4.supports(layer, "cpu") is None
    assert "CPU" in cpu_int4.supports(layer, torch.device("meta"))
    k, why = kernels.select(layer, "meta")
    assert k is reference


# ------------------------------------------------------------------------------------ real layers, real model


@pytest.fixture(scope="module")
def stories_ckpt(tmp_path_factory):
    if not (MODEL / "model.safetensors").is_file() or not TINY.is_file():
        pytest.skip(f"shared assets not found under {ASSETS}")
    return stories_checkpoint(tmp_path_factory)


def test_real_checkpoint_logits_cpu_vs_torch(stories_ckpt):
    from gptqkit.checkpoint import load

    fast, ref = load(stories_ckpt, kernel="cpu"), load(stories_ckpt, kernel="torch")
    qlayers = [m for m in fast.modules() if isinstance(m, QuantLinear)]
    assert qlayers and all(m.kernel is cpu_int4 for m in qlayers)
    assert fast.state_dict().keys() == ref.state_dict().keys()
    ids = torch.tensor([[1] + list(range(20, 60))])
    with torch.no_grad():
        for n in (1, ids.shape[1]):  # one token (int4 op) and a 41-token prompt
            a, b = fast(ids[:, :n]).logits, ref(ids[:, :n]).logits
            assert rel_err(a, b.double()) < INT4_TOL
            assert torch.equal(a[0, -1].argmax(), b[0, -1].argmax())
    for m in qlayers:  # each real layer against the oracle, both paths
        x = torch.randn(5, m.in_features)
        assert rel_err(run_path(m, x, "int4"), oracle(m, x)) < INT4_TOL
        assert rel_err(run_path(m, x, "dense"), oracle(m, x)) < dense_tol(torch.float32)


def test_real_checkpoint_in_bf16(stories_ckpt):
    """load(path, dtype=torch.bfloat16) gives a bf16 model (half the memory of fp32; fast where bf16 is native)."""
    from gptqkit.checkpoint import load

    m32, m16 = load(stories_ckpt), load(stories_ckpt, dtype=torch.bfloat16)
    assert m16.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.tensor([[1, 403, 407, 261, 378, 13]])
    with torch.no_grad():
        a, b = m32(ids).logits, m16(ids).logits
    assert b.dtype == torch.bfloat16 and rel_err(b, a.double()) < 5e-2


# ------------------------------------------------------------------------------------ the avx2 kernel

needs_avx2 = pytest.mark.skipif(isinstance(cpu_avx2.library(), str),
                                reason=f"avx2 kernel unavailable: {cpu_avx2.library()}")
AVX2_CASES = [(gs, act, sym, fmt) for gs in (32, 64, 128, -1) for act in (False, True) for sym in (True, False)
              for fmt in ("gptq", "gptq_v2")]


@needs_avx2
@pytest.mark.parametrize("group_size,act_order,sym,fmt", AVX2_CASES)
def test_avx2_against_oracle(group_size, act_order, sym, fmt):
    """fp32 all the way: the C kernel sums exact code products per group, so it matches float64 to fp32 rounding.
    M 1..31 runs the C kernel, M >= 32 the dequantize + GEMM path."""
    i = AVX2_CASES.index((group_size, act_order, sym, fmt))
    K, N = (576, 80) if group_size in (64, 128) else (256, 48)  # 576 / 128: a 64-row last group
    layer = random_layer(K, N, 4, group_size, act_order, sym, fmt, bias=i % 2 == 1, seed=i)
    layer.use_kernel(cpu_avx2)
    assert layer._avx2_plan.permuted == (act_order and group_size != -1)  # one group: any row order is sorted
    gen = torch.Generator().manual_seed(200 + i)
    for M in (1, 2, 7, 31, 32, 40):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(M, K, generator=gen).to(dtype)
            with torch.no_grad():
                y = layer(x)
            assert y.dtype == dtype and y.shape == (M, N)
            tol = FP32_TOL if dtype == torch.float32 else INT4_TOL  # bf16: the output's own rounding
            assert rel_err(y, oracle(layer, x)) < tol, (M, dtype)


@needs_avx2
@pytest.mark.parametrize("group_size,act_order,sym,fmt", AVX2_CASES)
def test_avx2_dequantize_is_the_reference(group_size, act_order, sym, fmt):
    """The prefill path's C dequantization gives the reference kernel's fp32 values bit for bit (same formula, one
    rounding), in the kernel's row order, and bf16 as torch rounds them; any 8-row chunk range and column range gives
    its rows and columns."""
    i = AVX2_CASES.index((group_size, act_order, sym, fmt))
    K, N = (576, 80) if group_size in (64, 128) else (256, 48)
    layer = random_layer(K, N, 4, group_size, act_order, sym, fmt, seed=50 + i)
    layer.use_kernel(cpu_avx2)
    ref = reference.dequantize(layer)
    if layer._avx2_plan.permuted:
        ref = ref[layer.avx2_src]
    assert torch.equal(cpu_avx2.dequantize(layer, 0, K // 8, torch.float32), ref)
    assert torch.equal(cpu_avx2.dequantize(layer, 0, K // 8, torch.bfloat16), ref.to(torch.bfloat16))
    assert torch.equal(cpu_avx2.dequantize(layer, 3, 17, torch.float32), ref[24:136])
    assert torch.equal(cpu_avx2.dequantize(layer, 3, 17, torch.bfloat16, 16, 40), ref[24:136, 16:40].bfloat16())
    with pytest.raises(ValueError, match="multiple of 8"):
        cpu_avx2.dequantize(layer, 0, 1, torch.float32, 4, 40)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu_avx2.dequantize(layer, 0, 1, torch.float16)


needs_gemm_bf16 = pytest.mark.skipif(isinstance(cpu_avx2.library(), str) or not cpu_avx2.has_gemm_bf16(),
                                     reason="the bf16 prefill GEMM needs the avx2 build and an AVX512-BF16 CPU")
# (bits, K, N, M, group, act-order, sym, fmt): N % 64 leaves 16/32/48-column panels; M % 6 leaves short tiles, M > 512
# a second pass of rows; K = 584 and 576 are not multiples of the 256-row panels; 576 / 128 has a 64-row last group;
# at 3 bits a panel's chunks start at bits 0, 24, 16 and 8 of a word, and rows 10 and 21 of each 32 straddle two
GEMM_CASES = [(4, 256, 64, 6, 64, False, True, "gptq"), (4, 576, 80, 13, 128, False, False, "gptq"),
              (4, 584, 208, 37, 8, True, False, "gptq_v2"), (4, 512, 176, 520, 32, True, True, "gptq"),
              (4, 1024, 96, 1, -1, False, False, "gptq"), (4, 320, 16, 11, 64, True, True, "gptq_v2"),
              (2, 576, 80, 13, 128, False, False, "gptq"), (2, 512, 176, 520, -1, False, True, "gptq_v2"),
              (3, 576, 96, 37, 32, True, True, "gptq"), (3, 512, 64, 1, -1, False, False, "gptq"),
              (3, 1056, 224, 7, 64, False, False, "gptq_v2"),
              (8, 584, 208, 37, 8, True, False, "gptq_v2"), (8, 320, 48, 11, 64, False, True, "gptq")]


@needs_gemm_bf16
@pytest.mark.parametrize("bits,K,N,M,group,act,sym,fmt", GEMM_CASES)
def test_avx2_gemm_bf16_is_the_dequantized_product(bits, K, N, M, group, act, sym, fmt):
    """gptq_gemm_bf16 multiplies by the bf16 weight that gptq_dequant writes (the reference kernel's values
    rounded to bf16), with fp32 sums: against the float64 product of the same operands only the sums' rounding
    is left. Its gated form is silu(gate) * up of its plain products, and its bf16 output that rounded."""
    from torch.nn import functional as F

    i = GEMM_CASES.index((bits, K, N, M, group, act, sym, fmt))
    gate, up = (random_layer(K, N, bits, group, act, sym, fmt, seed=70 + 2 * i + j) for j in (0, 1))
    up.g_idx.copy_(gate.g_idx)
    for layer in (gate, up):
        layer.use_kernel(cpu_avx2 if bits == 4 else cpu_avx2_q8)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(i)).bfloat16()
    w = cpu_avx2.dequantize(gate, 0, K // 8, torch.bfloat16)  # in the kernel's row order, as x must be
    src = gate.avx2_src if gate._avx2_plan.permuted else torch.arange(K)
    assert torch.equal(w, oracle_weight(gate)[src].bfloat16())
    y = cpu_avx2.gemm_bf16(gate, x)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert rel_err(y, x.double() @ w.double()) < 1e-6
    if act:  # the layer's own prefill call gathers x into that order
        with torch.no_grad():
            assert torch.equal(cpu_avx2.dense_matmul(gate, x[:, torch.argsort(gate.avx2_src)], torch.float32), y)
    u = cpu_avx2.gemm_bf16(up, x)
    h = cpu_avx2.gemm_bf16(gate, x, up)
    assert h.dtype == torch.float32 and rel_err(h, (F.silu(y) * u).double()) < 1e-6
    assert torch.equal(cpu_avx2.gemm_bf16(gate, x, up, torch.bfloat16), h.bfloat16())
    hg = cpu_avx2.gemm_bf16(gate, x, up, act="gelu_tanh")  # Gemma's gate
    assert rel_err(hg, (F.gelu(y.double(), approximate="tanh") * u.double())) < 1e-6
    with pytest.raises(ValueError, match="gate's shape"):
        cpu_avx2.gemm_bf16(gate, x, random_layer(K, N + 32, bits, group, act, sym, fmt))
    with pytest.raises(ValueError, match="gate's shape"):  # another width
        cpu_avx2.gemm_bf16(gate, x, random_layer(K, N, 8 if bits != 8 else 4, group, act, sym, fmt))
    if group != -1:  # up's rows in another order
        with pytest.raises(ValueError, match="and g_idx"):
            cpu_avx2.gemm_bf16(gate, x, random_layer(K, N, bits, group, not act, sym, fmt, seed=90 + i))


@needs_avx2
@pytest.mark.parametrize("r,K,N,M", [(8, 576, 1536, 1), (16, 72, 44, 3), (5, 33, 21, 2), (64, 256, 8, 1)])
def test_lora_add_is_the_low_rank_term(r, K, N, M):
    """lora_add (the LoRA term of decode rows, in the one-call blocks and the wrappers alike) is y + x A^T B^T *
    scale to fp32 rounding: r a multiple of 8 (8 outputs a step) or not, N with a remainder of outputs, several rows;
    y itself is left as it was. Other dtypes and mismatched shapes are declined."""
    g = torch.Generator().manual_seed(r + K)
    x, y = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    A, B = torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g)
    y0 = y.clone()
    got = cpu_avx2.lora_add(x, y, (A, B, 0.75))
    want = y.double() + (x.double() @ A.double().T @ B.double().T) * 0.75
    assert got.shape == (M, N) and rel_err(got, want) < 1e-6 and torch.equal(y, y0)
    assert cpu_avx2.lora_add(x, y, (A.double(), B.double(), 0.75)) is None
    assert cpu_avx2.lora_add(x, y, (A[:, 1:], B, 0.75)) is None
    assert cpu_avx2.lora_add(x, y[:, 1:], (A, B, 0.75)) is None


@needs_avx2
def test_avx2_gemm_bf16_declines(monkeypatch):
    """Where the CPU lacks AVX512-BF16, or N is not a multiple of 16, gemm_bf16 says None and bf16 prefill goes
    through dequantized column blocks: every value a widened bf16 product."""
    layer = random_layer(256, 40, 4, 64, seed=13)
    layer.use_kernel(cpu_avx2)
    x = torch.randn(33, 256).bfloat16()
    assert cpu_avx2.gemm_bf16(layer, x) is None  # 40 columns
    layer = random_layer(256, 48, 4, 64, seed=13)
    layer.use_kernel(cpu_avx2)
    monkeypatch.setattr(cpu_avx2, "_cpu_flags", lambda: {"avx2", "fma", "f16c", "avx512f"})
    assert cpu_avx2.gemm_bf16(layer, x) is None
    with torch.no_grad():
        y = cpu_avx2.dense_matmul(layer, x, torch.float32)
    assert torch.equal(y, y.bfloat16().float()) and rel_err(y, oracle(layer, x)) < 2e-2


@needs_avx2
def test_avx2_prefill_in_column_blocks(monkeypatch):
    """A layer wider than DENSE_BYTES allows is multiplied in column blocks (the last one short), each written into
    its columns: the same result as one block, and as the oracle. (200 columns: not the bf16 GEMM's, which takes
    multiples of 16.)"""
    layer = random_layer(512, 200, 4, 64, act_order=True, seed=12)
    layer.use_kernel(cpu_avx2)
    x = torch.randn(40, 512)
    with torch.no_grad():
        whole = cpu_avx2.dense_matmul(layer, x)
        monkeypatch.setattr(cpu_avx2, "DENSE_BYTES", 512 * 4 * 64)  # 64 columns per block: 64, 64, 64, 8
        blocks = cpu_avx2.dense_matmul(layer, x)
        half = cpu_avx2.dense_matmul(layer, x.bfloat16(), torch.float32)
    assert blocks.shape == (40, 200) and blocks.dtype == half.dtype == torch.float32
    assert rel_err(blocks, whole.double()) < 1e-6 and rel_err(whole, oracle(layer, x)) < FP32_TOL
    # bf16 in, fp32 out: each block's bf16 product widened, so every value is a bf16 number
    assert torch.equal(half, half.bfloat16().float()) and rel_err(half, oracle(layer, x)) < 2e-2


@needs_avx2
@pytest.mark.parametrize("kernel,act_order,path", [("avx2", False, "whole"), ("avx2-q8", True, "gemm"),
                                                   ("avx2-q8", True, "blocks"), ("avx2-q8", False, "blocks")])
def test_avx2_gated_prefill_is_the_layers_own(monkeypatch, kernel, act_order, path):
    """A gated MLP's prefill (gated_prefill, what fused.GatedMLP runs) gives what the three layers' own prefill calls
    give: exactly, in one block or several of dequantized columns; within the bf16 rounding of act(gate) * up where
    the one-pass bf16 GEMM computes it with the C act ("gemm", on an AVX512-BF16 CPU; "blocks" hides the CPU's
    flag); SiLU and Gemma's tanh GELU. It declines what it cannot do."""
    from torch.nn import functional as F

    from gptqkit import fused

    k = kernels.load(kernel)
    gate, up = (random_layer(256, 192, 4, 64, act_order, seed=s) for s in (60, 61))
    up.g_idx.copy_(gate.g_idx)  # a block's gate and up share their input's row order (act-order sorts by H)
    down = random_layer(192, 256, 4, 64, act_order, seed=62)
    for layer in (gate, up, down):
        layer.use_kernel(k)
    if path == "blocks":
        monkeypatch.setattr(cpu_avx2, "DENSE_BYTES", 256 * 2 * 64)  # 64 columns: 3 blocks of gate and up
        monkeypatch.setattr(cpu_avx2, "has_gemm_bf16", lambda: False)
    elif path == "gemm" and not cpu_avx2.has_gemm_bf16():
        pytest.skip("this CPU lacks AVX512-BF16")
    gated_calls = []  # whether each gemm_bf16 call computed silu(gate) * up
    gemm = cpu_avx2.gemm_bf16

    def spy(*args):
        y = gemm(*args)
        gated_calls.append(len(args) > 2 and y is not None)
        return y

    monkeypatch.setattr(cpu_avx2, "gemm_bf16", spy)
    x = torch.randn(2, 40, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert cpu_avx2.gated_prefill(gate, up, down, x) is None  # not sharing calls yet
        assert cpu_avx2.share_input([gate, up]) is None
        got = fused.GatedMLP(gate, up, down, torch.nn.SiLU())(x)
        ref = down(F.silu(gate(x)) * up(x))
        assert got.dtype == torch.float32 and torch.equal(cpu_avx2.gated_prefill(gate, up, down, x), got)
        if path == "gemm":
            assert rel_err(got, ref.double()) < 1e-3
        else:
            assert torch.equal(got, ref)
        assert any(gated_calls) == (path == "gemm")
        assert rel_err(got, oracle(down, F.silu(oracle(gate, x)) * oracle(up, x))) < 3e-2
        # Gemma's tanh GELU gate: the same paths with act_mul's other formula
        got = fused.GatedMLP(gate, up, down, torch.nn.GELU(approximate="tanh"), act="gelu_tanh")(x)
        ref = down(F.gelu(gate(x), approximate="tanh") * up(x))
        assert rel_err(got, ref.double()) < 1e-3 if path == "gemm" else torch.equal(got, ref)
        handle = down.register_forward_hook(lambda m, a, out: None)
        assert cpu_avx2.gated_prefill(gate, up, down, x) is None  # a hooked layer is called as itself
        handle.remove()
        down.use_kernel(reference)
        assert cpu_avx2.gated_prefill(gate, up, down, x) is None  # so is a layer on another kernel
    x.requires_grad_(True)
    assert cpu_avx2.gated_prefill(gate, up, gate, x) is None  # autograd keeps the layers' own calls


@needs_avx2
def test_avx2_exact_integer_sums():
    """Integer activations and scale 1: every partial sum is an integer below 2^24, so the C kernel is exact."""
    layer = random_layer(1024, 64, 4, 128, sym=False, seed=11)
    layer.scales.fill_(1.0)
    layer.use_kernel(cpu_avx2)
    x = torch.randint(-3, 4, (3, 1024)).float()
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(y.double(), oracle(layer, x))


@needs_avx2
def test_avx2_refusals_and_state_dict():
    assert "4-bit" in cpu_avx2.supports(random_layer(128, 64, 8, 32), "cpu")
    assert "CPU" in cpu_avx2.supports(random_layer(128, 64, 4, 32), torch.device("meta"))
    odd = random_layer(120, 32, 4, 20)  # groups of 20 rows split 8-row words: not a whole number of words
    assert "not a whole number of 8-row words" in cpu_avx2.supports(odd, "cpu")
    k, why = kernels.select(odd, "cpu")
    assert k is cpu_int4 and why[1].startswith("avx2: a group of 20 rows")
    layer = random_layer(576, 64, 4, 128, act_order=True, bias=True, seed=3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.use_kernel(cpu_avx2)
    with torch.no_grad():
        layer(torch.randn(1, 576))
        layer(torch.randn(100, 576))
    after = layer.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    plain = random_layer(576, 64, 4, 128)
    plain.use_kernel(cpu_avx2)
    assert not hasattr(plain, "avx2_qweight")  # without act-order the codes are read in place, not copied


@needs_avx2
def test_avx2_real_checkpoint(stories_ckpt):
    from gptqkit.checkpoint import load

    fast, ref = load(stories_ckpt, kernel="avx2"), load(stories_ckpt, kernel="torch")
    qlayers = [m for m in fast.modules() if isinstance(m, QuantLinear)]
    assert qlayers and all(m.kernel is cpu_avx2 for m in qlayers)
    ids = torch.tensor([[1] + list(range(20, 60))])
    with torch.no_grad():
        for n in (1, 5, ids.shape[1]):
            a, b = fast(ids[:, :n]).logits, ref(ids[:, :n]).logits
            assert rel_err(a, b.double()) < FP32_TOL


# ------------------------------------------------------------------------------------ the avx2-q8 kernel


def q8_round(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 as the avx2-q8 kernel sees it: blocks of 32 inputs from k = 0, each rounded to int8 with scale
    max|x| / 127 (fp32 arithmetic in the kernel's order, half away from zero), returned dequantized."""
    out = torch.empty_like(x)
    for k0 in range(0, x.shape[1], 32):
        blk = x[:, k0:k0 + 32]
        amax = blk.abs().amax(1, keepdim=True)
        v = blk * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        out[:, k0:k0 + 32] = torch.trunc(v + torch.where(v < 0, -0.5, 0.5)) * (amax / 127.0)
    return out


@needs_avx2
@pytest.mark.parametrize("group_size,act_order,sym,fmt", AVX2_CASES)
def test_avx2_q8_is_exact_on_rounded_activations(group_size, act_order, sym, fmt):
    """The one approximation is the rounding of x: on the rounded activations the integer sums match float64 to fp32
    rounding, and against the unrounded oracle the error is that of 8-bit activations. Act-order layers round x in
    their group order (the order the kernel reads rows in)."""
    i = AVX2_CASES.index((group_size, act_order, sym, fmt))
    K, N = (576, 80) if group_size in (64, 128) else (264, 48)  # 264: a last activation block of 8 inputs
    layer = random_layer(K, N, 4, group_size, act_order, sym, fmt, bias=i % 2 == 0, seed=50 + i)
    layer.use_kernel(cpu_avx2_q8)
    gen = torch.Generator().manual_seed(300 + i)
    for M in (1, 3, 31):
        x = torch.randn(M, K, generator=gen)
        x[:, 5] *= 40  # an outlier feature, as real activations have: it coarsens its own block only
        src = layer.avx2_src if layer._avx2_plan.permuted else torch.arange(K)
        xr = torch.empty_like(x)
        xr[:, src] = q8_round(x[:, src])
        with torch.no_grad():
            y = layer(x)
        # fp32 rounding of sum x q and zero * sum x, which cancel: up to ~6e-5 relative over a 264-row group
        assert rel_err(y, oracle(layer, xr)) < 2e-4, M
        assert rel_err(y, oracle(layer, x)) < 3e-2, M  # ~0.6% without the outlier; its block adds up to ~1.5%
    with torch.no_grad():  # prefill rows take the dense path with unrounded activations (bf16 GEMM where native)
        x = torch.randn(40, K, generator=gen)
        assert rel_err(layer(x), oracle(layer, x)) < dense_tol(torch.float32)


@needs_avx2
def test_avx2_q8_zero_and_tiny_blocks():
    """An all-zero activation block has scale 0 (no division by zero) and tiny values keep their relative size."""
    layer = random_layer(256, 64, 4, 128, sym=False, seed=9)
    layer.use_kernel(cpu_avx2_q8)
    x = torch.randn(1, 256)
    x[:, :64] = 0
    x[:, 64:96] *= 1e-30
    with torch.no_grad():
        y = layer(x)
    assert torch.isfinite(y).all() and rel_err(y, oracle(layer, x)) < 1.5e-2


def assert_decodes_like_reference(fast, ref, ids: torch.Tensor) -> None:
    """Decode ids [1, T] one token per call (the path the int8 rounding is on) with both models: logits close, the
    same greedy tokens, perplexity of the text within 1%."""
    logits = {}
    with torch.no_grad():
        for name, m in (("fast", fast), ("ref", ref)):
            past, steps = None, []
            for t in range(ids.shape[1]):
                out = m(ids[:, t:t + 1], **{cache_kwarg(m): past}, use_cache=True)
                past = output_cache(out)
                steps.append(out.logits[:, -1])
            logits[name] = torch.cat(steps).double()
    a, b = logits["fast"], logits["ref"]
    assert rel_err(a, b) < 2e-2
    assert (a.argmax(-1) == b.argmax(-1)).double().mean() > 0.95
    ppl = {k: torch.nn.functional.cross_entropy(v[:-1], ids[0, 1:]).exp().item() for k, v in logits.items()}
    assert abs(ppl["fast"] / ppl["ref"] - 1) < 0.01, ppl


@needs_avx2
def test_avx2_q8_decodes_a_real_model(stories_ckpt):
    """Token-by-token decoding (one row per call: the path the int8 rounding is on) of a trained model against the
    reference kernel: logits close, the same greedy tokens, perplexity of the decoded text within 1%."""
    from gptqkit.checkpoint import load

    fast, ref = load(stories_ckpt), load(stories_ckpt, kernel="torch")
    assert {m.kernel for m in fast.modules() if isinstance(m, QuantLinear)} == {cpu_avx2_q8}  # "auto" picks it
    from transformers import AutoTokenizer

    text = (CORPORA / "calibration" / "tiny.txt").read_text()[:2000]
    ids = AutoTokenizer.from_pretrained(stories_ckpt)(text, return_tensors="pt").input_ids[:, :128]
    assert_decodes_like_reference(fast, ref, ids)


@needs_avx2
@pytest.mark.skipif(not cpu_avx2.has_vnni(), reason="this CPU has no AVX512-VNNI")
@pytest.mark.parametrize("group_size,act_order,K,N", [(128, False, 576, 80), (32, True, 264, 48), (-1, False, 512, 72),
                                                      (64, False, 1024, 1040), (128, True, 576, 88)])
def test_avx2_q8_vnni_build_is_bit_identical(group_size, act_order, K, N):
    """Both builds sum the same integers exactly and then take the same fp32 steps: equal bit for bit, including
    column counts that leave a 16-wide tail (80, 48, 1040), an 8-wide one (72) or both (88) after the 32-wide VNNI
    loop, and runs of one piece (group 32) or cut by segments (group -1)."""
    vnni = cpu_avx2.library(vnni=True)
    assert not isinstance(vnni, str), vnni
    layer = random_layer(K, N, 4, group_size, act_order, sym=False, fmt="gptq", bias=False, seed=K + N)
    layer.use_kernel(cpu_avx2_q8)
    assert cpu_avx2.fast_library() is vnni
    gen = torch.Generator().manual_seed(K)
    for M in (1, 2, 31):
        x = torch.randn(M, K, generator=gen)
        a = cpu_avx2.matmul(layer, x, int8=True, lib=vnni)
        b = cpu_avx2.matmul(layer, x, int8=True, lib=cpu_avx2.library())
        assert torch.equal(a, b), M


# (bits, group_size, act_order, K, N): N per width a multiple of 32 / bits (qzeros), with 16- and 8-column tails
# after the 32-wide loop where the width allows; K = 264 and 288 end in a short activation block (8-bit) or a
# 32-row 3-bit unit that is one block
OTHER_BITS_CASES = [(2, 128, False, 576, 80), (2, 32, True, 288, 48), (2, -1, False, 512, 1040),
                    (3, 128, False, 576, 96), (3, 32, True, 288, 64), (3, -1, False, 512, 1056), (3, 64, True, 576, 96),
                    (8, 128, False, 576, 88), (8, 32, True, 264, 72), (8, -1, False, 512, 1048), (8, 64, True, 576, 88)]


@needs_avx2
@pytest.mark.parametrize("bits,group_size,act_order,K,N", OTHER_BITS_CASES)
def test_avx2_q8_other_bits_are_exact_on_rounded_activations(bits, group_size, act_order, K, N):
    """2-, 3- and 8-bit codes read in place (shift-and-mask integer sums): on the rounded activations the result
    matches float64 to fp32 rounding, as for 4 bits; their dequantization (prefill's W) is the oracle's exactly, and
    prefill and autograd rows match the unrounded oracle."""
    i = OTHER_BITS_CASES.index((bits, group_size, act_order, K, N))
    layer = random_layer(K, N, bits, group_size, act_order, sym=i % 2 == 0, fmt="gptq", bias=i % 3 == 0, seed=70 + i)
    layer.use_kernel(cpu_avx2_q8)
    src = layer.avx2_src if layer._avx2_plan.permuted else torch.arange(K)
    W = cpu_avx2.dequantize(layer, 0, K // 8, torch.float32)  # [K, N] in the kernel's row order
    assert torch.equal(W.double(), oracle_weight(layer)[src])
    gen = torch.Generator().manual_seed(400 + i)
    for M in (1, 3, 31):
        x = torch.randn(M, K, generator=gen)
        x[:, 7] *= 40  # an outlier feature
        xr = torch.empty_like(x)
        xr[:, src] = q8_round(x[:, src])
        with torch.no_grad():
            y = layer(x)
        assert rel_err(y, oracle(layer, xr)) < 2e-4, M
        assert rel_err(y, oracle(layer, x)) < 3e-2, M
    x = torch.randn(40, K, generator=gen)
    with torch.no_grad():
        assert rel_err(layer(x), oracle(layer, x)) < dense_tol(torch.float32)
    x = torch.randn(2, K, generator=gen, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    assert rel_err(y, oracle(layer, x.detach())) < dense_tol(torch.float32, reduced=False)


@needs_avx2
@pytest.mark.skipif(not cpu_avx2.has_vnni(), reason="this CPU has no AVX512-VNNI")
@pytest.mark.parametrize("bits,group_size,act_order,K,N", OTHER_BITS_CASES)
def test_avx2_q8_other_bits_builds_are_bit_identical(bits, group_size, act_order, K, N):
    """vpdpbusd (VNNI build) and maddubs into int16 (AVX2 build) give the same integer sums, then the same fp32
    steps: equal bit for bit, 16- and 8-column tails included."""
    vnni = cpu_avx2.library(vnni=True)
    assert not isinstance(vnni, str), vnni
    layer = random_layer(K, N, bits, group_size, act_order, sym=False, fmt="gptq", bias=False, seed=K + N + bits)
    layer.use_kernel(cpu_avx2_q8)
    gen = torch.Generator().manual_seed(K + bits)
    for M in (1, 2, 31):
        x = torch.randn(M, K, generator=gen)
        x[:, 3] *= 50  # large activations: the int16 sums of the AVX2 build stay in range
        a = cpu_avx2.matmul(layer, x, int8=True, lib=vnni)
        b = cpu_avx2.matmul(layer, x, int8=True, lib=cpu_avx2.library())
        assert torch.equal(a, b), M


@needs_avx2
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_avx2_q8_other_bits_match_across_threads_and_calls(bits, two_threads):
    """Shared q/k/v-style calls of one width give each layer's own output bit for bit, and one thread the same up
    to the order of fp32 adds (two threads sum their segments' partials in a tree)."""
    layers = [random_layer(576, 96, bits, 64, False, sym=False, seed=90 + j) for j in range(3)]
    for layer in layers:
        layer.use_kernel(cpu_avx2_q8)
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(bits))
    with torch.no_grad():
        alone = [layer(x) for layer in layers]
        assert cpu_avx2.share_input(layers) is None
        shared = [layer(x) for layer in layers]
        torch.set_num_threads(1)
        one = [layer(x.clone()) for layer in layers]
    for a, b, c in zip(alone, shared, one):
        assert torch.equal(a, b) and rel_err(c, a.double()) < 1e-6
    mixed = [random_layer(576, 96, 3, 64, seed=1), random_layer(576, 96, 2, 64, seed=2)]
    for layer in mixed:
        layer.use_kernel(cpu_avx2_q8)
    assert cpu_avx2.share_input(mixed) == "their codes have different bit widths"


@needs_avx2
def test_avx2_q8_decodes_a_real_3bit_model(tmp_path_factory):
    """stories260K quantized with GPTQ to 3 bits, decoded token by token on avx2-q8 (its 3-bit sums) against the
    reference kernel: logits close, the same greedy tokens, perplexity of the text within 1%."""
    from transformers import AutoTokenizer

    from gptqkit.checkpoint import load
    from gptqkit.config import QuantConfig
    from gptqkit.pipeline import quantize

    if not (MODEL / "model.safetensors").is_file() or not TINY.is_file():
        pytest.skip(f"shared assets not found under {ASSETS}")
    out = tmp_path_factory.mktemp("q3") / "stories-3bit"
    texts = [t for t in TINY.read_text().split("\n") if t.strip()][:32]
    quantize(MODEL, out, QuantConfig(bits=3, group_size=32), dataset=texts, nsamples=8, seqlen=128, progress=False)
    fast, ref = load(out), load(out, kernel="torch")
    assert {m.kernel for m in fast.modules() if isinstance(m, QuantLinear)} == {cpu_avx2_q8}
    ids = AutoTokenizer.from_pretrained(out)(TINY.read_text()[:2000], return_tensors="pt").input_ids[:, :96]
    assert_decodes_like_reference(fast, ref, ids)


@needs_avx2
def test_avx2_shared_input_calls(stories_ckpt):
    """load() finds the layers that read one input (q/k/v here; stories260K's 172-wide MLP stays unquantized) with
    a one-token forward and lets them share a C call in decode: outputs bit-identical to separate calls, whether the
    siblings are called in the model's order, alone, twice, or with another input in between."""
    from gptqkit.checkpoint import load

    model = load(stories_ckpt)
    a = model.model.layers[0].self_attn
    assert a.q_proj._avx2_shared is a.k_proj._avx2_shared is a.v_proj._avx2_shared is not None
    assert a.o_proj._avx2_shared is None
    qkv = (a.q_proj, a.k_proj, a.v_proj)
    gen = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(1, 1, a.q_proj.in_features, generator=gen), torch.randn(1, 1, a.q_proj.in_features,
                                                                              generator=gen)

    def separate(layer, inp):
        return cpu_avx2.matmul(layer, inp.reshape(1, -1), int8=True).view(1, 1, -1)

    with torch.no_grad():
        assert all(torch.equal(m(x), separate(m, x)) for m in qkv)  # the model's order
        assert torch.equal(a.v_proj(x2), separate(a.v_proj, x2))  # one alone, a new input
        assert torch.equal(a.q_proj(x), separate(a.q_proj, x))  # another input in between
        assert torch.equal(a.q_proj(x), separate(a.q_proj, x))  # twice
        assert torch.equal(a.k_proj(x2), separate(a.k_proj, x2))  # what waits belongs to x: x2 computes afresh
    # teacher-forced decoding of the whole model: shared calls change nothing
    ids = torch.randint(3, model.config.vocab_size, (1, 24), generator=gen)
    shared = teacher_forced_logits(model, ids)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m._avx2_shared = None
    assert torch.equal(shared, teacher_forced_logits(model, ids))


def teacher_forced_logits(model, ids, prompt=8):
    """Last-position logits of each one-token decode step after a `prompt`-token prompt, feeding ids (not the model's
    choices), stacked."""
    with torch.no_grad():
        out = model(ids[:, :prompt], use_cache=True)
        return torch.stack([model(ids[:, t:t + 1], **{cache_kwarg(model): output_cache(out)}, use_cache=True)
                            .logits[0, -1] for t in range(prompt, ids.shape[1])])


def test_shared_input_probe_failure_is_only_logged(stories_ckpt, caplog):
    """A model whose one-token forward fails gets no call groups (its layers run one by one), and the probe's hooks
    are removed either way."""
    from gptqkit.checkpoint import load, decode_call_groups

    model = load(stories_ckpt, kernel="torch")
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    groups = decode_call_groups(model, "cpu")
    assert [len(g) for g in groups] == [3, 1] * model.config.num_hidden_layers  # q/k/v, then o, of each block
    assert not any(m._forward_pre_hooks for m in qls)

    def broken(*args, **kwargs):
        raise RuntimeError("needs pixel_values")

    model.model.forward = broken
    with caplog.at_level(logging.INFO, logger="gptqkit.checkpoint"):
        assert decode_call_groups(model, "cpu") == []
    assert "a one-token forward failed (RuntimeError: needs pixel_values)" in caplog.text
    assert not any(m._forward_pre_hooks for m in qls)


def _q8_layers(n, K=1024, N=264):
    layers = [random_layer(K, N, 4, 128, sym=False, fmt="gptq", seed=s) for s in range(n)]
    for layer in layers:
        layer.use_kernel(cpu_avx2_q8)
    return layers


@needs_avx2
def test_avx2_decode_pool_is_deterministic_and_takes_concurrent_callers(two_threads):
    """Decode matmuls run on the C file's own thread pool, with threads taking row segments in whatever order they
    come: the result is the same bits on every call, and a second Python thread calling while the pool is busy runs
    alone on its caller and gets the same bits too."""
    import threading

    layers = _q8_layers(3)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(M, 1024, generator=gen) for M in (1, 3)]
    want = {(i, j): cpu_avx2.matmul(layer, x, int8=True) for i, layer in enumerate(layers) for j, x in enumerate(xs)}
    ref = reference.forward(layers[0], xs[1])  # right, not just repeatable (int8 activations: ~1e-3 of the scale)
    assert (want[0, 1] - ref).abs().max() < 1e-2 * ref.abs().max()
    for _ in range(20):
        assert all(torch.equal(cpu_avx2.matmul(layers[i], xs[j], int8=True), y) for (i, j), y in want.items())
    bad = []

    def hammer(i):
        for _ in range(50):
            for j, x in enumerate(xs):
                if not torch.equal(cpu_avx2.matmul(layers[i], x, int8=True), want[i, j]):
                    bad.append((i, j))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not bad


@needs_avx2
def test_avx2_decode_pool_survives_fork(two_threads):
    """A process forked after the pool has started (a DataLoader worker, multiprocessing) has no workers: its first
    decode call starts its own instead of waiting for threads that do not exist."""
    import multiprocessing

    layer = _q8_layers(1)[0]
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(2))
    want = cpu_avx2.matmul(layer, x, int8=True)  # the parent's pool is running now

    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_matmul, args=(layer, x, q))
    p.start()
    p.join(timeout=60)
    if p.is_alive():
        p.kill()
        pytest.fail("the forked child hung in its first decode call")
    assert p.exitcode == 0 and torch.equal(torch.tensor(q.get(timeout=10)), want)


def _child_matmul(layer, x, q):
    torch.set_num_threads(2)
    q.put(cpu_avx2.matmul(layer, x, int8=True).tolist())  # as a list: a tensor would be shared through an fd


@needs_avx2
def test_avx2_read_ahead_follows_decode_order(stories_ckpt, two_threads):
    """load() tells each decode call which two calls come next (q/k/v's shared call, then o, then the next block's
    q/k/v; the last wraps to the first), and reading them ahead changes no output bit."""
    from gptqkit.checkpoint import load

    model = load(stories_ckpt)
    attn = [layer.self_attn for layer in model.model.layers]
    order = [p for a in attn for p in (a.q_proj._avx2_shared.plan, a.o_proj._avx2_plan)]
    for i, plan in enumerate(order):
        assert plan.follow[1] == 2
        assert plan.follow[2][0] is order[(i + 1) % len(order)] and plan.follow[2][1] is order[(i + 2) % len(order)]
    ids = torch.randint(3, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    ahead = teacher_forced_logits(model, ids)
    for plan in order:
        plan.follow[3].detach()
        plan.follow.clear()
    assert torch.equal(ahead, teacher_forced_logits(model, ids))
    # a dropped model's plans stop the pool reading their codes before their tensors go (pool_forget)
    cpu_avx2.read_ahead([m for a in attn for m in (a.q_proj, a.o_proj)])
    forget = [plan.follow[3] for plan in order]
    assert all(f.alive for f in forget)
    teacher_forced_logits(model, ids)
    del model, attn, order, plan
    gc.collect()
    assert not any(f.alive for f in forget)


@needs_avx2
def test_pack_derived_moves_zero_points_and_reordered_codes_into_one_mapping():
    """pack_derived (load() calls it): the zero points prepare() derived, and act-order's reordered codes, move into
    one huge-page mapping in layer order; the plans point at the new buffers and the outputs keep every bit."""
    from gptqkit import memory

    layers = [random_layer(4096, 1024, 4, 32, act_order=True, sym=False, seed=1),
              random_layer(512, 256, 4, 128, seed=2), random_layer(1024, 512, 4, 64, act_order=True, seed=3)]
    x = torch.randn(2, 1, 4096, generator=torch.Generator().manual_seed(0))
    before = []
    for layer in layers:
        layer.use_kernel(cpu_avx2_q8)
        before.append(layer(x[..., :layer.in_features]))
    derived = [b for layer in layers for b in (layer.avx2_zeros, getattr(layer, "avx2_qweight", None)) if b is not None]
    assert len(derived) == 5 and cpu_avx2.pack_derived(layers) == sum(b.nbytes for b in derived)
    moved = [b for layer in layers for b in (layer.avx2_zeros, getattr(layer, "avx2_qweight", None)) if b is not None]
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(derived, moved))
    assert moved[0].data_ptr() % memory.HUGE == 0  # 2 MiB of reordered codes and more: one mapping
    ends = [(b.data_ptr(), b.data_ptr() + b.nbytes) for b in moved]
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))  # in order, disjoint
    for layer, ref in zip(layers, before):
        assert any(t is layer.avx2_zeros for t in layer._avx2_plan.tensors)
        assert torch.equal(layer(x[..., :layer.in_features]), ref)
    assert cpu_avx2.pack_derived([random_layer(64, 32, 4, 32)]) == 0  # not on the avx2 kernels: nothing to move


@needs_avx2
def test_load_packs_the_derived_buffers(stories_ckpt, monkeypatch):
    """load() moves the avx2 layers' derived buffers before it shares and chains their calls: every QuantLinear
    goes through pack_derived, and the plans the model decodes with hold the moved zero points."""
    from gptqkit.checkpoint import load

    seen = []
    real = cpu_avx2.pack_derived
    monkeypatch.setattr(cpu_avx2, "pack_derived", lambda layers: seen.append(list(layers)) or real(layers))
    model = load(stories_ckpt, kernel="avx2-q8")
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(seen) == 1 and seen[0] == qls and len(qls) == 20
    assert all(any(t is m.avx2_zeros for t in m._avx2_plan.tensors) for m in qls)
