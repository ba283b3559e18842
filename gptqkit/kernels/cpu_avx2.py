"""CPU kernel for 4-bit layers on x86-64 with AVX2: a C matmul over the checkpoint's own qweight for decode.

Decode (M < M_MAX rows) calls `gptq_q4_matmul` in cpu_avx2.c. It reads qweight [K/8, N] int32, scales fp16 and
one byte per group zero, unpacks nibbles in registers and accumulates over each group in fp32, so a token reads
0.5 bytes per weight plus 3 bytes per group and column, and no second copy of the codes is kept in memory
(the `cpu` kernel's int4 op needs its own [N, K/2] layout next to qweight). Activations are fp32 inside.
Prefill (M >= M_MAX) in bf16 (where cpu_int4.dense_dtype picks it) on a CPU with AVX512-BF16 runs the C file's
own GEMM, `gptq_gemm_bf16`, which dequantizes the codes straight into its packed panels (no dense W in memory,
fp32 results), and for a gated MLP computes silu(gate) * up in the same pass (gated_prefill). Otherwise prefill
and autograd dequantize W with `gptq_dequant` (fp32 or bf16), a few MiB of columns at a time, and run one torch
GEMM per block.

The same C file holds the `avx2-q8` kernel's int8-activation matmul (cpu_avx2_q8.py; it also reads 2-, 3- and
8-bit codes, whose prefill dequantizes them with the same `gptq_dequant`), the bf16 GEMV that
gptqkit.dense uses for a bf16 lm_head (bf16_matmul below), the one-token attention of gptqkit.attention
(decode_attention below), and the rotary attention step, the RMSNorm and the gated MLP's silu(gate) * up of
gptqkit.fused (rope_decode_attention, rms_norm and silu_mul below).

Decode calls run on the C file's own thread pool (pthreads): after its part of a call a worker reads the codes of
the calls that come next (read_ahead() tells each plan which) while the caller is back in Python. Prefill's
dequantization runs on OpenMP threads (torch's libgomp), like the GEMM it feeds.

The C file is compiled once per machine with the C compiler at hand (`$CC`, else `cc`), with -mavx2 -mfma -mf16c
-pthread -fopenmp, into `$GPTQKIT_CACHE/kernels` (default ~/.cache/gptqkit/kernels), named by a hash of the source
and the flags; it is loaded with ctypes. Without a compiler or on another CPU, supports() says so and `cpu` runs
instead.

Act-order (g_idx not sorted) rows are sorted by group once in prepare(), which makes a reordered copy of the codes
(a non-persistent buffer, 0.5 bytes per weight); activations are gathered in the same order at every call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import operator
import os
import shutil
import subprocess
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import cpu_int4
from .. import memory
from ..packing import pack_qweight, unpack_qweight

log = logging.getLogger(__name__)

name = "avx2"

SOURCE = Path(__file__).with_name("cpu_avx2.c")
# -ffp-contract=off: a * b + c stays two roundings unless the C file asks for an FMA, so the rotary embedding of
# rope_decode_attention rounds as torch's separate multiplies and adds do (GCC's default under -std=c99, said here
# for every compiler).
FLAGS = ("-O3", "-shared", "-fPIC", "-pthread", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-std=c99",
         "-ffp-contract=off")
# The second build, for CPUs with AVX512-VNNI (Ice Lake and later, Zen 4 and later): the int8 matmul's inner
# product becomes vpdpbusd over 16 columns (see piece_q8 in the C file); everything else is the same code.
VNNI_FLAGS = FLAGS + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
VNNI_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
# The bf16 prefill GEMM's instructions (vdpbf16ps, vcvtne2ps2bf16): Zen 4 and later, Cooper Lake, Sapphire Rapids.
GEMM_BF16_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}
# Rows from which the call goes to dequantize + GEMM instead. `benchmarks/cpu_decode.py --sweep` on the 2-core
# AVX2 EPYC: the dense path first won at M = 24 (2048x2048), 32 (5632x2048), 64 (2048x5632) and never below 64
# on SmolLM2's 576/1536 layers. On the AVX-512 EPYC the bf16 dense path first beat avx2-q8 at M = 32 (576x1536,
# 2048x2048) or 64 (2048x5632, 5632x2048). With gemm_bf16 on a Zen 5 class EPYC it first won at M = 16 (2048x2048,
# 5632x2048, at par there), 32 (2048x5632, 576x1536) and not up to 48 (1536x576); the fp32 `avx2` kernel shares
# this threshold and its fp32 GEMM runs at a quarter of the bf16 rate (223 vs 909 GFLOP/s there), so it stays 32.
M_MAX = 32
# Prefill dequantizes W a block of columns at a time, at most this many bytes, and multiplies each block into its
# columns of the result, so the largest buffer is a few MiB instead of a whole dense layer (23 MiB in bf16 for the
# 1.1B shape's MLP layers). On the 1.1B shape's layers (bf16, 2 threads, M = 32, 128, 512) 1-8 MiB blocks ran within
# noise of one whole-layer block and gave the same bits; 1 MiB blocks were up to 20% slower at M = 32.
DENSE_BYTES = 4 << 20
# KV cache dtypes the C attention reads (a bf16 cache holds half the bytes per position; gptqkit.cache)
KV_DTYPES = (torch.float32, torch.bfloat16)


def cache_dir() -> Path:
    return Path(os.environ.get("GPTQKIT_CACHE", Path.home() / ".cache" / "gptqkit")) / "kernels"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    # No /proc (not Linux): torch's own dispatch check covers AVX2 and FMA; F16C ships with every AVX2 x86 CPU.
    cap = torch.backends.cpu.get_cpu_capability()
    return {"avx2", "fma", "f16c"} if cap in ("AVX2", "AVX512") else set()


def has_vnni() -> bool:
    return VNNI_CPU_FLAGS <= _cpu_flags()


def has_gemm_bf16() -> bool:
    """Whether this CPU runs gptq_gemm_bf16 (compiled into every build under a target attribute, called only
    where the CPU has the instructions)."""
    return GEMM_BF16_CPU_FLAGS <= _cpu_flags()


@functools.lru_cache(maxsize=None)
def library(vnni: bool = False) -> ctypes.CDLL | str:
    """The compiled kernel, or a sentence saying why it cannot be had (built once per machine, then cached).
    vnni: the AVX512-VNNI build (callers check has_vnni() first)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it needs an x86-64 CPU, this is {platform.machine()}"
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    flags = VNNI_FLAGS if vnni else FLAGS
    cc = os.environ.get("CC", "cc")
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + " ".join((cc,) + flags).encode() + torch.__version__.encode()).hexdigest()[:16]
    so = cache_dir() / f"cpu_avx2{'-vnni' if vnni else ''}-{tag}.so"
    if not so.exists():
        if shutil.which(cc) is None:
            return f"no C compiler ({cc}) to build it; install gcc or set CC"
        so.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=so.parent, suffix=".so")  # several processes may build at once
        os.close(fd)
        p = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if p.returncode != 0:
            os.unlink(tmp)
            first = (p.stderr.strip().splitlines() or ["no output"])[0]
            return f"compiling {SOURCE.name} with {cc} failed: {first}"
        os.replace(tmp, so)
        log.info("built %s", so)
    lib = ctypes.CDLL(str(so))
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.gptq_q4_matmul.restype = lib.gptq_matmul_q8.restype = ctypes.c_int
    lib.gptq_q4_matmul.argtypes = [P, I, I, I, P, P, P, P, P, P, I, P, I, P, I]
    lib.gptq_matmul_q8.argtypes = [I, P, I, I, I, P, P, P, P, P, P, I, P, I, P, I]
    lib.bf16_matmul.restype = ctypes.c_int
    lib.bf16_matmul.argtypes = [P, I, I, P, I, P, I]
    lib.gptq_dequant.restype = ctypes.c_int
    lib.gptq_dequant.argtypes = [I, P, I, P, P, P, P, I, I, I, I, I, P, I, I]
    lib.gptq_gemm_bf16.restype = ctypes.c_int
    lib.gptq_gemm_bf16.argtypes = [I, P, I, I, I, P, P, P, P, P, P, P, P, P, I, I, I]
    L = ctypes.c_long
    lib.pool_forget.restype = None
    lib.pool_forget.argtypes = []
    lib.decode_attention.restype = ctypes.c_int
    lib.decode_attention.argtypes = [P, I, I, P, P, I, I, I, L, L, L, L, ctypes.c_float, P, I]
    lib.rope_decode_attention.restype = ctypes.c_int
    lib.rope_decode_attention.argtypes = [P, P, P, P, P, I, I, I, P, P, I, I, L, L, L, L, ctypes.c_float, P, I]
    lib.rms_norm.restype = None
    lib.rms_norm.argtypes = [P, I, I, P, ctypes.c_float, I, P]
    lib.act_mul.restype = None
    lib.act_mul.argtypes = [I, P, P, L, P]
    lib.decode_layer.restype = ctypes.c_int
    lib.decode_layer.argtypes = [P, P, P, P, P, P, I, I, L, L, L, L, P, I]
    lib.lora_add.restype = None
    lib.lora_add.argtypes = [P, P, I, I, I, P]
    lib.decode_stack.restype = ctypes.c_int
    lib.decode_stack.argtypes = [P, I, P, P, P, P, P, I, I, L, L, L, L, P, ctypes.c_float, I, P, I]
    return lib


class _Next(ctypes.Structure):
    """next_t in cpu_avx2.c: a call that comes next in decode, for the read-ahead."""

    _fields_ = [("nl", ctypes.c_int), ("K", ctypes.c_int), ("q8", ctypes.c_int), ("qws", ctypes.c_void_p),
                ("Ns", ctypes.c_void_p)]


@dataclass(frozen=True)
class Plan:
    """The C call's fixed arguments for one layer, or for several that read the same input (SharedInput)."""

    runs: int  # R: runs of 8-row chunks that share a group
    bits: int  # of the codes (4 for `avx2`; 2, 3, 4 or 8 for `avx2-q8`)
    permuted: bool  # act-order: codes reordered by group in `avx2_qweight`, x gathered by `avx2_src`
    sizes: tuple  # N of each layer, in output order
    K: int  # in_features
    width: int  # sum(sizes)
    # The tensors (held so their memory stays valid) and the addresses the C call takes: arrays of the layers'
    # qweight (or reordered copy), N, scales and zeros pointers, then runs and rgroup. Read once here because
    # decode makes ~150 such calls per token and each tensor access costs microseconds. Like every derived
    # layout, they follow the buffers that prepare() saw; a caller that swaps in new buffers calls use_kernel()
    # again.
    tensors: tuple
    arrays: tuple
    ptrs: tuple
    # The calls that follow this one in decode, set by read_ahead(): [a ctypes array of _Next, its length, the plans
    # it points into (held so their arrays stay valid), the finalizer that stops the pool reading this plan's codes];
    # empty until then.
    follow: list = field(default_factory=list)


def _plan(layers: list, runs: torch.Tensor, rgroup: torch.Tensor, permuted: bool) -> Plan:
    qws = [layer.avx2_qweight if permuted else layer.qweight for layer in layers]
    n = len(layers)
    arrays = ((ctypes.c_void_p * n)(*[q.data_ptr() for q in qws]),
              (ctypes.c_int * n)(*[layer.out_features for layer in layers]),
              (ctypes.c_void_p * n)(*[layer.scales.data_ptr() for layer in layers]),
              (ctypes.c_void_p * n)(*[layer.avx2_zeros.data_ptr() for layer in layers]))
    tensors = (*qws, *[layer.scales for layer in layers], *[layer.avx2_zeros for layer in layers], runs, rgroup)
    sizes = tuple(layer.out_features for layer in layers)
    return Plan(runs=len(rgroup), bits=layers[0].bits, permuted=permuted, sizes=sizes, K=layers[0].in_features,
                width=sum(sizes), tensors=tensors, arrays=arrays,
                ptrs=(*[ctypes.addressof(a) for a in arrays], runs.data_ptr(), rgroup.data_ptr()))


# Rows of one qweight word (for 3 bits, of three words): a group's rows must fill whole ones, so that a run of one
# group is whole rows of qweight; the C kernel counts rows in chunks of 8 for every width.
RUN_ROWS = {2: 16, 3: 32, 4: 8, 8: 8}


def _runs(g_idx: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str:
    """(order of rows sorted by group, runs [R+1] in 8-row chunks, group of each run [R]) or why not."""
    order = torch.argsort(g_idx, stable=True)
    groups, counts = torch.unique_consecutive(g_idx[order], return_counts=True)
    rows = RUN_ROWS[bits]
    if bool((counts % rows).any()):
        bad = int(counts[counts % rows != 0][0])
        return f"a group of {bad} rows is not a whole number of {rows}-row words at {bits} bits"
    runs = torch.zeros(len(counts) + 1, dtype=torch.int32)
    runs[1:] = torch.cumsum(counts // 8, 0)
    return order, runs, groups.to(torch.int32)


def supports(layer, device: torch.device | str | None = None, int8: bool = False) -> str | None:
    """None if the `avx2` kernel (int8: `avx2-q8`) runs this layer, else why not. avx2 reads 4-bit codes; avx2-q8
    also 2-, 3- and 8-bit ones."""
    device = torch.device(device) if device is not None else layer.qweight.device
    if device.type != "cpu":
        return f"it runs on CPU tensors only, not {device.type}"
    if layer.bits != 4 and not int8:
        return f"it reads 4-bit codes only, this layer has {layer.bits}"
    lib = library()
    if isinstance(lib, str):
        return lib
    r = _runs(layer.g_idx.long().cpu(), layer.bits)
    return r if isinstance(r, str) else None


def prepare(layer) -> None:
    K, bits = layer.in_features, layer.bits
    g_idx = layer.g_idx.long().cpu()
    order, runs, rgroup = _runs(g_idx, bits)
    permuted = not bool((order == torch.arange(K)).all())
    if permuted:
        cpu_int4._log_once("avx2 act-order", "avx2 kernel: act-order g_idx: codes reordered once by group (a second "
                           "copy, bits / 8 bytes per weight), activations gathered per call")
        codes = unpack_qweight(layer.qweight, bits)[order]  # [K, N] in group order
        layer.register_buffer("avx2_qweight", pack_qweight(codes.T, bits), persistent=False)
        layer.register_buffer("avx2_src", order, persistent=False)
    zeros = cpu_int4._zeros(layer).clamp(0, 255).to(torch.uint8).contiguous()  # [G, N] true zero points
    layer.register_buffer("avx2_zeros", zeros, persistent=False)
    layer.register_buffer("avx2_runs", runs, persistent=False)
    layer.register_buffer("avx2_rgroup", rgroup, persistent=False)
    layer._avx2_plan = _plan([layer], runs, rgroup, permuted)
    layer._avx2_shared = None


def pack_derived(layers: list) -> int:
    """Move what prepare() derived for these avx2 layers and decode streams (the true zero points, and act-order's
    reordered codes) into one mapping on huge pages (gptqkit.memory), as load() reads the checkpoint's own tensors:
    each group's flush reads a row of zero points, and on 4 KiB pages each such row took a page walk. With the zero
    points moved so (by hand, before this function) the 1.1B shape decoded in 0.990 of the time per token (10 rounds
    alternating in one process at 81 GB/s, 8 of them faster; 0.992 and 1.002 at 50 GB/s). Call before the layers'
    calls are shared or chained (their plans are rebuilt here). Returns the bytes moved."""
    layers = [layer for layer in layers if getattr(layer, "_avx2_plan", None) is not None
              and layer.kernel.name in ("avx2", "avx2-q8")]
    names = [["avx2_zeros", "avx2_qweight"] if layer._avx2_plan.permuted else ["avx2_zeros"] for layer in layers]
    olds = [getattr(layer, n) for layer, ns in zip(layers, names) for n in ns]
    if not olds:
        return 0
    news = iter(memory.empty_many([(list(t.shape), t.dtype) for t in olds]))
    for layer, ns in zip(layers, names):
        for n in ns:
            layer.register_buffer(n, next(news).copy_(getattr(layer, n)), persistent=False)
        layer._avx2_plan = _plan([layer], layer.avx2_runs, layer.avx2_rgroup, layer._avx2_plan.permuted)
    return sum(t.numel() * t.element_size() for t in olds)


@functools.lru_cache(maxsize=None)
def fast_library() -> ctypes.CDLL | str:
    """The build that decode runs: the AVX512-VNNI one (vpdpbusd inner products, 512-bit GEMV) where the CPU has it
    and it compiles, else the AVX2 one (or why there is none). Every decode entry point (both matmuls, the bf16
    GEMV, the attention) goes through this one build, because each loaded build has its own thread pool and two
    pools' spinning workers would take turns on the same cores."""
    if has_vnni():
        lib = library(vnni=True)
        if not isinstance(lib, str):
            log.info("avx2 kernels: AVX512-VNNI build (vpdpbusd inner products, 512-bit bf16 GEMV)")
            return lib
        log.info("avx2 kernels: the AVX512-VNNI build failed (%s); AVX2 instructions instead", lib)
    return library()


def _matmul(plan: Plan, x: torch.Tensor, int8: bool, lib: ctypes.CDLL | None) -> torch.Tensor:
    """x [..., K] float32 contiguous (in the plan's row order), M rows -> the plan's layers' outputs, [M, N] each,
    as consecutive blocks of one flat float32 tensor."""
    K = plan.K
    M = x.numel() // K
    y = torch.empty(M * plan.width, dtype=torch.float32)
    qws, ns, scs, zs, runs, rgroup = plan.ptrs
    # read-ahead only on the default build, the one whose pool the plans' finalizers stop
    nexts, n = (ctypes.addressof(plan.follow[0]), plan.follow[1]) if plan.follow and lib is None else (None, 0)
    if lib is None:
        lib = fast_library()
    args = (x.data_ptr(), M, K, len(plan.sizes), qws, ns, scs, zs, runs, rgroup, plan.runs, y.data_ptr(),
            torch.get_num_threads(), nexts, n)
    rc = lib.gptq_matmul_q8(plan.bits, *args) if int8 else lib.gptq_q4_matmul(*args)
    if rc == -2:
        raise RuntimeError(f"avx2 kernel: gptq_matmul_q8 takes 2, 3, 4 or 8 bits, not {plan.bits}")
    if rc != 0:
        raise MemoryError(f"avx2 kernel: no scratch memory for a {M}x{K} @ {K}x{sum(plan.sizes)} matmul")
    return y


def matmul(layer, x: torch.Tensor, int8: bool = False, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] float32 contiguous -> [M, N] float32 through the C kernel (no bias); `int8` rounds x to int8 per
    block of 32 inputs inside it (the avx2-q8 kernel). lib: a library() build to use instead of the default."""
    return _layer_matmul(layer, x, int8, lib).view(-1, layer.out_features)


def _layer_matmul(layer, x: torch.Tensor, int8: bool, lib: ctypes.CDLL | None) -> torch.Tensor:
    """matmul's product as a flat [M * N] tensor, for x [..., K] (M = x.numel() / K rows)."""
    plan: Plan = layer._avx2_plan
    if plan.permuted:
        x = x.reshape(-1, plan.K).index_select(1, layer.avx2_src)
    return _matmul(plan, x, int8, lib)


class SharedInput:
    """Layers that read the same input tensor (a block's q/k/v, its gate/up): in decode the first of them to be
    called runs one C call for all (the activations rounded once, one fork-join of the threads, no Python between
    the layers); the others get their outputs from it when called with that same tensor object.

    On the 1.1B shape (4-bit, 2 threads) the 2048 x 256 k and v projections each ran at about 13 GB/s alone, their
    fixed costs larger than their 0.26 MB of codes; shared calls took decode from 28.0-28.6 to 27.7-28.1 ms/token
    (three interleaved pairs in one process).

    The outputs wait, keyed by layer, with a reference to the input; a call with any other input (or a second call
    for the same layer) computes afresh. So results equal separate calls, unless the caller changes the input in
    place between two siblings' calls, which no transformers model does."""

    def __init__(self, layers: list):
        self.layers = layers
        first = layers[0]
        self.plan = _plan(layers, first.avx2_runs, first.avx2_rgroup, first._avx2_plan.permuted)
        self.x: torch.Tensor | None = None
        self.outputs: dict[int, torch.Tensor] = {}

    def output(self, layer, x: torch.Tensor, x2: torch.Tensor, int8: bool) -> torch.Tensor:
        """layer's output for x, flat [M * N] (x2: x as float32 contiguous, M rows)."""
        y = self.outputs.pop(id(layer), None) if x is self.x else None
        if y is None:
            if self.plan.permuted:
                x2 = x2.reshape(-1, self.plan.K).index_select(1, layer.avx2_src)
            flat = _matmul(self.plan, x2, int8, None)
            self.outputs = dict(zip(map(id, self.layers), flat.split([flat.numel() // self.plan.width * n
                                                                      for n in self.plan.sizes])))
            self.x = x
            y = self.outputs.pop(id(layer))
        if not self.outputs:
            self.x = None  # nothing waits: do not hold the input
        return y


def share_input(layers: list) -> str | None:
    """Let `layers` (QuantLinears that read the same input, all prepared for avx2 or all for avx2-q8) share decode
    calls; None, or why they cannot."""
    first = layers[0]
    if len({layer.kernel.name for layer in layers}) > 1:
        return "they use different kernels"
    if any(getattr(layer, "_avx2_plan", None) is None for layer in layers):
        return "a layer is not prepared for the avx2 kernels"
    if any(layer.in_features != first.in_features or not torch.equal(layer.g_idx, first.g_idx) for layer in layers):
        return "their rows fall into different groups (g_idx)"
    if len({layer.bits for layer in layers}) > 1:
        return "their codes have different bit widths"
    shared = SharedInput(layers)
    for layer in layers:
        layer._avx2_shared = shared
    return None


def read_ahead(layers: list, depth: int = 2) -> int:
    """Tell each decode call which `depth` calls come after it, so that a worker thread reads their codes into the
    cache while the caller runs the Python in between (see "The pool" in cpu_avx2.c). layers: QuantLinears in the
    order a one-token forward calls them; layers that share a call (SharedInput) count once, layers on other kernels
    are skipped, and the last call is followed by the first (the next token). Returns the number of calls chained."""
    lib = fast_library()
    if isinstance(lib, str):
        return 0
    plans, int8 = [], []
    for layer in layers:
        if getattr(layer, "_avx2_plan", None) is None or layer.kernel.name not in ("avx2", "avx2-q8"):
            continue
        plan = layer._avx2_plan if layer._avx2_shared is None else layer._avx2_shared.plan
        if any(p is plan for p in plans):
            continue
        plans.append(plan)
        int8.append(layer.kernel.name == "avx2-q8")
    n = len(plans)
    for i, plan in enumerate(plans):
        nxt = [(plans[(i + d) % n], int8[(i + d) % n]) for d in range(1, min(depth, n - 1) + 1)]
        # _Next.q8: 0 for the fp32 path, else the int8 path's code bits (they place each chunk's rows)
        arr = (_Next * max(1, len(nxt)))(*[_Next(len(p.sizes), p.K, p.bits if q8 else 0, p.ptrs[0], p.ptrs[1])
                                          for p, q8 in nxt])
        if plan.follow:
            plan.follow[3].detach()
        # A worker may still be reading this plan's codes ahead when its model is dropped: before the plan's tensors
        # can be freed, the pool drops its read-ahead list (weakref callbacks run before an object's attributes go).
        plan.follow[:] = [arr, len(nxt), [p for p, _ in nxt], weakref.finalize(plan, lib.pool_forget)]
    return n


def forward(layer, x: torch.Tensor, int8: bool = False) -> torch.Tensor:
    K, N = layer.in_features, layer.out_features
    grad = x.requires_grad and torch.is_grad_enabled()
    if x.numel() < M_MAX * K and not grad:
        # Decode. As few torch calls as can be: between two matmuls the memory bus has streamed megabytes of codes
        # through the caches, and each call then costs several times its warm microseconds.
        xf = (x if x.dtype == torch.float32 else x.to(torch.float32)).contiguous()  # [..., K], M = numel / K rows
        shared = layer._avx2_shared
        y = _layer_matmul(layer, xf, int8, None) if shared is None else shared.output(layer, x, xf, int8)  # [M * N]
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
    else:
        dt = cpu_int4.dense_dtype(x.dtype, reduced=int8 and not grad)
        y = dense_matmul(layer, x.reshape(-1, K).to(dt), x.dtype)
    y = y.view(*x.shape[:-1], N)
    return y if layer.bias is None else y + layer.bias.to(x.dtype)


def dequantize(layer, c0: int, c1: int, dtype: torch.dtype, n0: int = 0, n1: int | None = None) -> torch.Tensor:
    """W rows for the 8-row chunks [c0, c1) of the kernel's code order and columns [n0, n1) (n0 a multiple of 8;
    default all), as [8 * (c1 - c0), n1 - n0] float32 or bfloat16 (the reference kernel's values; bf16 rounded to
    nearest even)."""
    plan: Plan = layer._avx2_plan
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"avx2 dequantize writes float32 or bfloat16, not {dtype}")
    N = layer.out_features
    n1 = N if n1 is None else n1
    if n0 % 8 or not 0 <= n0 < n1 <= N:
        raise ValueError(f"avx2 dequantize: columns [{n0}, {n1}) are not a range of [0, {N}) starting at a "
                         "multiple of 8")
    w = torch.empty(8 * (c1 - c0), n1 - n0, dtype=dtype)
    qw, sc, z = (t.data_ptr() for t in plan.tensors[:3])
    library().gptq_dequant(plan.bits, qw, N, sc, z, layer.avx2_runs.data_ptr(), layer.avx2_rgroup.data_ptr(),
                           plan.runs, c0, c1, n0, n1, w.data_ptr(), int(dtype == torch.bfloat16),
                           torch.get_num_threads())
    return w


def _column_step(K: int, dtype: torch.dtype) -> int:
    """Columns of a [K, N] weight per dequantized block: DENSE_BYTES' worth in dtype, a multiple of 64, at least 64."""
    return max(64, DENSE_BYTES // (K * dtype.itemsize) // 64 * 64)


def gemm_bf16(layer, x: torch.Tensor, up=None, out_dtype: torch.dtype = torch.float32,
              act: str = "silu") -> torch.Tensor | None:
    """x [M, K] bf16 (in the kernel's row order) @ W -> [M, N] float32 by gptq_gemm_bf16: the codes dequantized
    into the GEMM's own panels, sums in fp32. With `up` (a layer of the same shape and row order): act(x @ W) *
    (x @ W_up) in out_dtype (float32 or bfloat16), act one of ACTS (act_mul's formulas). Codes of 2, 3, 4 or 8
    bits. None where the CPU lacks AVX512-BF16 or N is not a multiple of 16 (the caller dequantizes in blocks
    instead)."""
    K, N = layer.in_features, layer.out_features
    if up is not None and ((up.in_features, up.out_features, up.bits) != (K, N, layer.bits)
                           or not torch.equal(up.g_idx, layer.g_idx)):
        raise ValueError(f"gemm_bf16: up ({up.in_features} x {up.out_features}, {up.bits}-bit) must have gate's shape "
                         f"({K} x {N}), bits ({layer.bits}) and g_idx, as gate_proj and up_proj of one MLP do")
    lib = library()
    if not has_gemm_bf16() or N % 16 or isinstance(lib, str):
        return None
    x = x.contiguous()
    y = torch.empty(x.shape[0], N, dtype=out_dtype if up is not None else torch.float32)
    qw, sc, z = (t.data_ptr() for t in layer._avx2_plan.tensors[:3])
    qw2, sc2, z2 = (t.data_ptr() for t in up._avx2_plan.tensors[:3]) if up is not None else (None, None, None)
    rc = lib.gptq_gemm_bf16(layer._avx2_plan.bits, x.data_ptr(), x.shape[0], K, N, qw, sc, z, qw2, sc2, z2,
                            layer.avx2_runs.data_ptr(), layer.avx2_rgroup.data_ptr(), y.data_ptr(),
                            int(y.dtype == torch.bfloat16), ACTS[act], torch.get_num_threads())
    if rc == -1:
        raise MemoryError("avx2 kernel: no memory for the bf16 GEMM's panels")
    return y


def dense_matmul(layer, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] @ W -> [M, N] in out_dtype (default x's), for prefill and autograd. bf16 x on an AVX512-BF16 CPU:
    gemm_bf16. Otherwise W dequantized in x's dtype (fp32 or bf16) by the C kernel, DENSE_BYTES of columns at a time,
    one torch GEMM per column block written into its columns of the result. Under autograd W is dequantized whole
    (the GEMM saves it for the backward anyway)."""
    plan: Plan = layer._avx2_plan
    if plan.permuted:
        x = x.index_select(1, layer.avx2_src)
    K, N, C = layer.in_features, layer.out_features, layer.in_features // 8
    out_dtype = out_dtype or x.dtype
    grad = x.requires_grad and torch.is_grad_enabled()
    if x.dtype == torch.bfloat16 and not grad and (y := gemm_bf16(layer, x)) is not None:
        return y.to(out_dtype)
    step = _column_step(K, x.dtype)
    if step >= N or grad:
        return (x @ dequantize(layer, 0, C, x.dtype)).to(out_dtype)
    y = torch.empty(x.shape[0], N, dtype=out_dtype)
    for n0 in range(0, N, step):
        n1 = min(n0 + step, N)
        y[:, n0:n1] = x @ dequantize(layer, 0, C, x.dtype, n0, n1)  # a bf16 product is rounded, then widened
    return y


def gated_prefill(gate, up, down, x: torch.Tensor, act: str = "silu") -> torch.Tensor | None:
    """down(act(gate(x)) * up(x)) for prefill rows x [..., K] float32 (act one of ACTS), without the two [M, I]
    float32 outputs of gate and up (23 MB on the 1.1B shape at 512 rows): one block of DENSE_BYTES of columns of
    each weight at a time,
    the product written into h [M, I] in the dtype down's prefill GEMM takes (dense_dtype: bf16 for avx2-q8 where the
    CPU has it). The values are those of the three layers' own prefill calls with the product in float32; where
    gemm_bf16 runs (bf16 on an AVX512-BF16 CPU) it computes h in one pass, act by the C formula of the decode path
    (act_mul's, within 1e-6 of torch's), so h may differ from the layers' calls by one bf16 rounding step.
    None (the caller runs the layers) where gate and up do not share decode calls (share_input: same kernel, input
    and g_idx), a layer is not on the avx2 kernels, has a bias or a hook, or gradients are needed."""
    shared = getattr(gate, "_avx2_shared", None)
    layers = (gate, up, down)
    if (shared is None or getattr(up, "_avx2_shared", None) is not shared or getattr(down, "_avx2_plan", None) is None
            or any(layer.kernel.name not in ("avx2", "avx2-q8") or layer.bias is not None or layer._forward_hooks
                   or layer._forward_pre_hooks for layer in layers)
            or torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks
            or x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled())):
        return None
    K, I = gate.in_features, gate.out_features
    dt = cpu_int4.dense_dtype(x.dtype, reduced=gate.kernel.name == "avx2-q8")
    xs = x.reshape(-1, K).to(dt)
    if shared.plan.permuted:
        xs = xs.index_select(1, gate.avx2_src)
    hdt = cpu_int4.dense_dtype(x.dtype, reduced=down.kernel.name == "avx2-q8")
    h = gemm_bf16(gate, xs, up, hdt, act) if dt == torch.bfloat16 else None
    if h is not None:
        del xs
        return dense_matmul(down, h, x.dtype).view(*x.shape[:-1], down.out_features)
    step = _column_step(K, dt)
    h = torch.empty(xs.shape[0], I, dtype=hdt)
    for n0 in range(0, I, step):
        n1 = min(n0 + step, I)
        g = (xs @ dequantize(gate, 0, K // 8, dt, n0, n1)).float()
        u = (xs @ dequantize(up, 0, K // 8, dt, n0, n1)).float()
        h[:, n0:n1] = ACT_TORCH[act](g).mul_(u)
    del xs
    return dense_matmul(down, h, x.dtype).view(*x.shape[:-1], down.out_features)


def bf16_matmul(x: torch.Tensor, w: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor | None:
    """x [M, K] float32 @ w.T for a bf16 w [N, K] (a dense lm_head in bf16 storage) -> [M, N] float32, through the C
    GEMV that widens bf16 in registers; None where the C library cannot be had (the caller falls back to torch).
    lib: a library() build to use instead of fast_library()."""
    lib = lib if lib is not None else fast_library()
    if isinstance(lib, str):
        return None
    x, w = x.contiguous(), w.contiguous()
    (M, K), N = x.shape, w.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    if lib.bf16_matmul(x.data_ptr(), M, K, w.data_ptr(), N, y.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError(f"avx2 kernel: no scratch memory for a {M}x{K} @ {K}x{N} bf16 matmul")
    return y


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     lib: ctypes.CDLL | None = None) -> torch.Tensor | None:
    """softmax(scale * q k^T) v for one new token: q [1, H, 1, D] float32, k and v [1, Hkv, L, D] float32 or both
    bfloat16 (the KV cache's views: any strides with unit stride along D) on CPU, H a multiple of Hkv (grouped-query
    attention), D a multiple of 8 -> [1, 1, H, D] float32 (transformers' attention output layout). None where these
    do not hold or the C library cannot be had, so the caller takes SDPA. lib: a library() build to use instead of
    fast_library()."""
    (B, H, T, D), (Bk, Hkv, L, Dk), ks, vs = q.shape, k.shape, k.stride(), v.stride()
    if not (B == Bk == 1 and T == 1 and Dk == D and v.shape == k.shape and D % 8 == 0 and H % Hkv == 0 and L > 0
            and q.dtype == torch.float32 and k.dtype == v.dtype in KV_DTYPES and q.device.type == "cpu"
            and ks[3] == vs[3] == 1):
        return None
    lib = lib if lib is not None else fast_library()
    if isinstance(lib, str):
        return None
    qs = q.stride()
    if qs[1] != D or qs[3] != 1:  # the C function reads q as [H, D] rows; the attention layers' q already is
        q = q.contiguous()
    out = torch.empty(1, 1, H, D)
    rc = lib.decode_attention(q.data_ptr(), H, D, k.data_ptr(), v.data_ptr(), int(k.dtype == torch.bfloat16), Hkv, L,
                              ks[1], ks[2], vs[1], vs[2], scale, out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"avx2 kernel: no scratch memory for attention over {L} positions")
    return out


def rope_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          kbuf: torch.Tensor, vbuf: torch.Tensor, T: int, scale: float) -> torch.Tensor | None:
    """One decode step of rotary attention: q [H * D] and k, v [Hkv * D] (the new token's projections, contiguous
    float32, any leading dims of size 1), cos and sin [D] contiguous float32 (its position's). k rotated and v are
    written at position T of the cache buffers kbuf, vbuf [1, Hkv, capacity > T, D] (unit stride along D; float32,
    or both bfloat16: the new row rounded to nearest even), and q rotated attends to positions 0 .. T -> q's shape,
    float32 (the heads' outputs side by side). The rotation is transformers' apply_rotary_pos_emb, with the same
    roundings. None where the C library cannot be had or the sizes do not fit the buffers; the caller checks the
    inputs' dtypes and contiguity (decode calls this once per layer and token)."""
    lib = fast_library()
    (B, Hkv, cap, D), ks, vs = kbuf.shape, kbuf.stride(), vbuf.stride()
    if (isinstance(lib, str) or B != 1 or not 0 <= T < cap or vbuf.shape != kbuf.shape or ks[3] != 1 or vs[3] != 1
            or not kbuf.dtype == vbuf.dtype in KV_DTYPES or k.numel() != Hkv * D or v.numel() != Hkv * D
            or q.numel() % (Hkv * D) or cos.numel() != D or sin.numel() != D):
        return None
    out = torch.empty(q.shape, dtype=torch.float32)
    rc = lib.rope_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                   q.numel() // D, D, Hkv, kbuf.data_ptr(), vbuf.data_ptr(),
                                   int(kbuf.dtype == torch.bfloat16), T, ks[1], ks[2], vs[1], vs[2], scale,
                                   out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"avx2 kernel: no scratch memory for attention over {T + 1} positions")
    return out


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor | None:
    """w * (x * rsqrt(mean(x^2, -1) + eps)) for float32 CPU x [..., K] and w [K], on the caller's thread (meant for
    decode's few rows); with offset, Gemma's (x * rsqrt(...)) * (1 + w). None where the C library cannot be had or
    w is not [K]."""
    lib = fast_library()
    K = x.shape[-1]
    if isinstance(lib, str) or w.shape != (K,):
        return None
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty_like(x)
    lib.rms_norm(x.data_ptr(), x.numel() // K, K, w.data_ptr(), eps, int(offset), y.data_ptr())
    return y


ACTS = {"silu": 0, "gelu_tanh": 1}  # act_mul's activations, and torch's (gelu_tanh: approximate="tanh")
ACT_TORCH = {"silu": torch.nn.functional.silu,
             "gelu_tanh": functools.partial(torch.nn.functional.gelu, approximate="tanh")}


def act_mul(g: torch.Tensor, u: torch.Tensor, act: str = "silu") -> torch.Tensor | None:
    """act(g) * u for float32 CPU tensors of one shape, act one of ACTS, on the caller's thread (meant for decode's
    few rows); None where the C library cannot be had or the shapes differ (torch would broadcast)."""
    lib = fast_library()
    if isinstance(lib, str) or g.shape != u.shape:
        return None
    g, u = g.contiguous(), u.contiguous()
    y = torch.empty_like(g)
    lib.act_mul(ACTS[act], g.data_ptr(), u.data_ptr(), g.numel(), y.data_ptr())
    return y


class _MM(ctypes.Structure):
    """mm_args in cpu_avx2.c: one decode matmul's fixed arguments."""

    _fields_ = [("nl", ctypes.c_int), ("K", ctypes.c_int), ("width", ctypes.c_int), ("R", ctypes.c_int),
                ("q8", ctypes.c_int), ("qws", ctypes.c_void_p), ("Ns", ctypes.c_void_p), ("scs", ctypes.c_void_p),
                ("zs", ctypes.c_void_p), ("runs", ctypes.c_void_p), ("rgroup", ctypes.c_void_p),
                ("next", ctypes.c_void_p), ("nnext", ctypes.c_int), ("bias", ctypes.c_void_p),
                ("lora", ctypes.c_void_p)]


class _Bias(ctypes.Structure):
    """bias_t in cpu_avx2.c: a layer's bias and its dtype (p NULL: none)."""

    _fields_ = [("p", ctypes.c_void_p), ("kind", ctypes.c_int)]


BIAS_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # bias_t.kind


class _Lora(ctypes.Structure):
    """lora_t in cpu_avx2.c: one layer's adapter term (r = 0: none)."""

    _fields_ = [("r", ctypes.c_int), ("A", ctypes.c_void_p), ("B", ctypes.c_void_p), ("scale", ctypes.c_float)]


def _lora_fits(adapter: tuple, K: int, N: int) -> bool:
    """adapter = (A [r, K], B [N, r], scale): float32, contiguous, on CPU."""
    A, B, scale = adapter
    return (A.dim() == B.dim() == 2 and A.shape[0] == B.shape[1] >= 1 and A.shape[1] == K and B.shape[0] == N
            and A.dtype == B.dtype == torch.float32 and A.device.type == B.device.type == "cpu"
            and A.is_contiguous() and B.is_contiguous() and isinstance(scale, float))


def lora_add(x: torch.Tensor, y: torch.Tensor, adapter: tuple) -> torch.Tensor | None:
    """y + (x @ A.T @ B.T) * scale for float32 CPU rows x [..., K] and y [..., N] (a projection's decode output),
    adapter = (A [r, K], B [N, r], scale) (peft's lora_A / lora_B weights and scaling), by the C function that
    decode_layer runs for the same layer (lora_add in cpu_avx2.c), on the caller's thread; a new tensor. None where
    the library cannot be had or the shapes, dtypes or layouts do not fit."""
    lib = fast_library()
    K, N = x.shape[-1], y.shape[-1]
    if (isinstance(lib, str) or not _lora_fits(adapter, K, N) or x.dtype != torch.float32 or y.dtype != torch.float32
            or x.numel() // K != y.numel() // N):
        return None
    A, B, scale = adapter
    x, out = x.contiguous(), y.clone(memory_format=torch.contiguous_format)
    lib.lora_add(ctypes.byref(_Lora(A.shape[0], A.data_ptr(), B.data_ptr(), scale)), x.data_ptr(), x.numel() // K,
                 K, N, out.data_ptr())
    return out


class LayerArgs(ctypes.Structure):
    """layer_args in cpu_avx2.c: a decoder block's fixed arguments for decode_layer (see layer_args())."""

    _fields_ = [("hidden", ctypes.c_int), ("H", ctypes.c_int), ("Hkv", ctypes.c_int), ("D", ctypes.c_int),
                ("inter", ctypes.c_int), ("eps1", ctypes.c_float), ("eps2", ctypes.c_float),
                ("scale", ctypes.c_float), ("w1", ctypes.c_void_p), ("w2", ctypes.c_void_p),
                ("offset1", ctypes.c_int), ("offset2", ctypes.c_int), ("act", ctypes.c_int), ("qkv", _MM),
                ("o", _MM), ("gate_up", _MM), ("down", _MM)]
    keep: tuple  # what its pointers point into: plans, their read-ahead lists, the norm weights


def _mm_args(layers: list, adapters: dict) -> tuple[_MM, tuple] | str:
    """The fixed arguments of the one decode call that runs `layers` (QuantLinears that share it, in output order),
    with adapters.get(layer) = (A, B, scale) added to a layer's output (lora_add), and what they point into; or why
    there is no such call."""
    first = layers[0]
    if any(b is not None and not (b.shape == (m.out_features,) and b.dtype in BIAS_KINDS and b.is_contiguous()
                                  and b.device.type == "cpu") for m in layers for b in [m.bias]):
        return "a projection's bias is not a contiguous float32, float16 or bfloat16 [out] on CPU"
    if first.kernel.name not in ("avx2", "avx2-q8") or getattr(first, "_avx2_plan", None) is None:
        return "a projection is not on the avx2 kernels"
    shared = first._avx2_shared
    if len(layers) > 1 and (shared is None or shared.layers != layers):
        return "its projections do not share one decode call"
    if len(layers) == 1 and shared is not None:
        return "a projection shares its decode call with another module"
    plan: Plan = first._avx2_plan if shared is None else shared.plan
    if plan.permuted:
        return "act-order codes (activations are gathered per call)"
    qws, ns, scs, zs, runs, rgroup = plan.ptrs
    nxt, n = (ctypes.addressof(plan.follow[0]), plan.follow[1]) if plan.follow else (None, 0)
    q8 = plan.bits if first.kernel.name == "avx2-q8" else 0  # mm_args.q8: gptq_matmul_q8's bits, 0 for fp32
    terms = [adapters.get(layer) for layer in layers]
    if any(t is not None and not _lora_fits(t, m.in_features, m.out_features) for t, m in zip(terms, layers)):
        return "an adapter's weights are not float32 [r, in] and [out, r] on CPU"
    lora = None
    if any(t is not None for t in terms):
        lora = (_Lora * len(layers))(*[_Lora(t[0].shape[0], t[0].data_ptr(), t[1].data_ptr(), t[2]) if t else _Lora()
                                       for t in terms])
    biases = [m.bias for m in layers]
    bias = None
    if any(b is not None for b in biases):
        bias = (_Bias * len(layers))(*[_Bias(b.data_ptr(), BIAS_KINDS[b.dtype]) if b is not None else _Bias()
                                       for b in biases])
    mm = _MM(len(plan.sizes), plan.K, plan.width, plan.runs, q8, qws, ns, scs, zs, runs, rgroup, nxt, n,
             *(ctypes.addressof(a) if a is not None else None for a in (bias, lora)))
    return mm, (plan, tuple(plan.follow), bias, biases, lora, terms)


def layer_args(w1: torch.Tensor, eps1: float, w2: torch.Tensor, eps2: float, qkv: list, o, gate_up: list, down,
               heads: int, kv_heads: int, head_dim: int, scale: float, adapters: dict | None = None,
               offsets: tuple[bool, bool] = (False, False), act: str = "silu") -> LayerArgs | str:
    """decode_layer's fixed arguments for a block of norm weights w1, w2 [hidden] (float32; offsets: Gemma's 1 + w,
    see rms_norm) and QuantLinears q/k/v (one shared decode call), o, gate/up (one shared call) and down on the avx2
    kernels, the MLP's activation act (one of ACTS), adapters[layer] = (A, B, scale) the LoRA term added to a layer's
    output (see lora_add); or why they do not fit."""
    adapters = adapters or {}
    parts = [_mm_args(qkv, adapters), _mm_args([o], adapters), _mm_args(gate_up, adapters),
             _mm_args([down], adapters)]
    why = next((p for p in parts if isinstance(p, str)), None)
    if why is not None:
        return why
    hidden, inter = o.out_features, down.in_features
    if not (w1.shape == w2.shape == (hidden,) and w1.dtype == w2.dtype == torch.float32 and w1.is_contiguous()
            and w2.is_contiguous() and head_dim % 8 == 0 and heads % kv_heads == 0):
        return "its norms or heads do not fit"
    args = LayerArgs(hidden, heads, kv_heads, head_dim, inter, eps1, eps2, scale, w1.data_ptr(), w2.data_ptr(),
                     int(offsets[0]), int(offsets[1]), ACTS[act], *(p[0] for p in parts))
    args.keep = (w1, w2, *(p[1] for p in parts))
    return args


def _step_fits(args: LayerArgs, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kbuf: torch.Tensor,
               vbuf: torch.Tensor, T: int) -> bool:
    """decode_layer's sizes: x [1, 1, hidden] float32 contiguous, cos and sin [head_dim], cache buffers
    [1, Hkv, capacity > T, head_dim] with unit stride along head_dim, float32 or both bfloat16."""
    (B, Hkv, cap, D), ks, vs = kbuf.shape, kbuf.stride(), vbuf.stride()
    return (B == 1 and 0 <= T < cap and vbuf.shape == kbuf.shape and ks[3] == 1 and vs[3] == 1
            and kbuf.dtype == vbuf.dtype in KV_DTYPES and Hkv == args.Hkv and D == args.D and cos.numel() == D
            and sin.numel() == D and x.numel() == args.hidden and x.is_contiguous())


def decode_layer(args: LayerArgs, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kbuf: torch.Tensor,
                 vbuf: torch.Tensor, T: int) -> torch.Tensor | None:
    """One decoded token through a whole pre-norm block (decode_layer in cpu_avx2.c): x [1, 1, hidden] float32
    contiguous, cos and sin [head_dim] contiguous float32 (its position's); k and v are written at position T of
    the cache buffers kbuf, vbuf [1, Hkv, capacity > T, head_dim] (unit stride along head_dim; float32 or both
    bfloat16, as rope_decode_attention). Returns the block's output, a new tensor shaped like x; None where the
    library cannot be had or the sizes do not fit."""
    lib = fast_library()
    if isinstance(lib, str) or not _step_fits(args, x, cos, sin, kbuf, vbuf, T):
        return None
    ks, vs = kbuf.stride(), vbuf.stride()
    y = torch.empty(x.shape, dtype=torch.float32)
    rc = lib.decode_layer(ctypes.addressof(args), x.data_ptr(), cos.data_ptr(), sin.data_ptr(), kbuf.data_ptr(),
                          vbuf.data_ptr(), int(kbuf.dtype == torch.bfloat16), T, ks[1], ks[2], vs[1], vs[2],
                          y.data_ptr(), torch.get_num_threads())
    if rc == -1:
        raise MemoryError(f"avx2 kernel: no scratch memory for a decoder block over {T + 1} positions")
    return y if rc == 0 else None


def stack_args(layers: list[LayerArgs]) -> ctypes.Array:
    """decode_stack's first argument: the blocks' decode_layer arguments (layer_args()), in call order."""
    arr = (ctypes.c_void_p * len(layers))(*map(ctypes.addressof, layers))
    arr.keep = tuple(layers)
    arr.checked = None  # decode_stack's last buffers that passed its checks, and their addresses
    return arr


def decode_stack(stack: ctypes.Array, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kbufs: list,
                 vbufs: list, T: int, w: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor | None:
    """One decoded token through a decoder stack's blocks (stack_args(), every block's fixed arguments) and its
    final RMSNorm of weight w [hidden] (offset: Gemma's, see rms_norm; decode_stack in cpu_avx2.c): x, cos, sin and
    T as decode_layer; block i's k and v are written into kbufs[i], vbufs[i], which all have the first's shape,
    strides and dtype. Returns the norm's output, a new tensor shaped like x; None where the library cannot be had or
    the sizes do not fit."""
    lib = fast_library()
    k0, v0 = kbufs[0], vbufs[0]
    if (isinstance(lib, str) or not len(kbufs) == len(vbufs) == len(stack)
            or not _step_fits(stack.keep[0], x, cos, sin, k0, v0, T)
            or not (w.shape == (x.numel(),) and w.dtype == torch.float32 and w.is_contiguous())):
        return None
    ks, vs = k0.stride(), v0.stride()
    # The buffers' checks and address arrays are kept for the next token while the buffers are the same tensor
    # objects (weak references, so a dropped cache is freed): checking every block's buffers each token took 1.3-1.9%
    # of a SmolLM2-135M token (30 blocks, ~3 ms) and 0.3% of a 1.1B one (14 alternating rounds in one process).
    seen = stack.checked
    if seen is None or not (all(map(operator.is_, kbufs, map(weakref.ref.__call__, seen[0])))
                            and all(map(operator.is_, vbufs, map(weakref.ref.__call__, seen[1])))):
        for k, v in zip(kbufs, vbufs):
            if not (k.shape == v.shape == k0.shape and k.stride() == ks and v.stride() == vs and k.dtype == v.dtype
                    == k0.dtype):
                return None
        P = ctypes.c_void_p * len(stack)
        seen = stack.checked = ([weakref.ref(k) for k in kbufs], [weakref.ref(v) for v in vbufs],
                                P(*[k.data_ptr() for k in kbufs]), P(*[v.data_ptr() for v in vbufs]))
    y = torch.empty(x.shape, dtype=torch.float32)
    rc = lib.decode_stack(stack, len(stack), x.data_ptr(), cos.data_ptr(), sin.data_ptr(), seen[2], seen[3],
                          int(k0.dtype == torch.bfloat16), T, ks[1], ks[2], vs[1], vs[2], w.data_ptr(), eps,
                          int(offset), y.data_ptr(), torch.get_num_threads())
    if rc == -1:
        raise MemoryError(f"avx2 kernel: no scratch memory for a decoder stack over {T + 1} positions")
    return y if rc == 0 else None
