"""Per-layer speed of gptqkit's Triton kernel against fp16 torch.matmul (cuBLAS) on Llama-7B shapes, one CUDA GPU.

    python benchmarks/gpu_kernels.py                          # int4 g128, M = 1 4 16 64, the three 7B shapes
    python benchmarks/gpu_kernels.py --m 1 4 16 32 64 128 256 --bits 4 --group-size 128 --act-order

For each layer shape K x N (in x out: 4096x4096 q/k/v/o, 4096x11008 gate/up, 11008x4096 down) and batch rows M:

    dense     x @ W with W [K, N] in the activation dtype (fp16 default)   (cuBLAS)
    gptqkit   the kernel's forward, i.e. whatever triton_gptq.plan() chose for this shape
    fused     the fastest fused-kernel tiling among triton_gptq.candidates()
    deq+mm    dequantize to fp16 with the Triton kernel, then cuBLAS: the prefill path

Times are per call, the median of CUDA-graph replays of many calls (gptqkit.kernels.triton_gptq.graph_us): a decode
step replays so, and eager timing of a few-microsecond kernel measures Python's launch instead. The calls rotate
over several copies of the weights and inputs, together at least twice the L2 size, so each one streams its
weights from DRAM. Achieved bandwidth = bytes a call must move (weights + zeros + scales + x + y) / time, as a
fraction of the device-to-device copy bandwidth measured in the same run (read + write of 1 GiB).
Targets from the issue: at least 3x fp16 at M = 1 on 4096x11008, at least 2x at M = 16.
"""

from __future__ import annotations

import argparse
import sys

import torch

import gpu_check  # benchmarks/gpu_check.py, beside this script

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))


def random_layer(K: int, N: int, bits: int, group_size: int, act_order: bool, device="cuda"):
    """A QuantLinear with random codes, symmetric zero points and plausible scales, made on the GPU."""
    from gptqkit.qlinear import QuantLinear

    layer = QuantLinear(K, N, bits, group_size, False, device=device)
    layer.qweight.copy_(torch.randint(-2**31, 2**31 - 1, layer.qweight.shape, dtype=torch.int32, device=device))
    mid = (1 << (bits - 1)) - 1  # v1 stores zero - 1: the symmetric zero 2^(bits-1)
    field = sum(mid << (i * bits) for i in range(32 // bits))
    layer.qzeros.fill_(field - (1 << 32) if field >= 1 << 31 else field)
    layer.scales.copy_((torch.rand(layer.scales.shape, device=device) * 0.004 + 0.004).half())
    if act_order:
        g = K if group_size == -1 else group_size
        layer.g_idx.copy_((torch.randperm(K, device=device) // g).int())
    return layer


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    from triton.testing import do_bench

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def bench(fns: list) -> float:
    """Microseconds per call, replayed from a CUDA graph (a decode step runs so: no Python launch cost)."""
    from gptqkit.kernels.triton_gptq import graph_us

    return graph_us(fns, calls=4 * len(fns))


def bench_shape(K: int, N: int, args, dtype: torch.dtype, bw: float, l2: int, sms: int) -> dict:
    """Print one table row per M for the K x N layer; return {(K, N, M): speedup over dense}."""
    from gptqkit.kernels import triton_gptq as tg

    g = K if args.group_size == -1 else args.group_size
    G = -(-K // g)
    qbytes = K * N * args.bits // 8 + G * N * (2 + args.bits / 8) + (4 * K if args.act_order else 0)
    copies = max(2, -(-2 * l2 // int(qbytes)))  # enough weight copies to overflow L2 twice
    layers = [random_layer(K, N, args.bits, args.group_size, args.act_order) for _ in range(copies)]
    for layer in layers:
        tg.prepare(layer)
    dense = [tg.dequantize(layers[i % copies], dtype) for i in range(max(2, -(-2 * l2 // (K * N * 2))))]
    out = {}
    for M in args.m:
        xs = [torch.randn(M, K, device="cuda", dtype=dtype) for _ in range(len(dense))]
        io = M * (K + N) * 2
        tg.forward(layers[0], xs[0])  # the first call of a shape times its tilings (plan())
        t_dense = bench([lambda i=i: xs[i] @ dense[i] for i in range(len(dense))])
        t_auto = bench([lambda i=i: tg.forward(layers[i], xs[i % len(xs)]) for i in range(copies)])
        cfg = tg.plan(layers[0], M, dtype)
        t_fused = float("inf")
        if M <= tg.FUSED_MAX_M:
            run = tg.fused_matmul if M > 1 else tg.gemv
            for c in tg.candidates(M, K, N, args.bits, g, sms):
                t = bench([lambda i=i, c=c: run(layers[i], xs[i % len(xs)], c) for i in range(copies)])
                t_fused = min(t_fused, t)
                if args.all:
                    print(f"{'':>17} candidate {c}: {t:8.1f} us")
        t_deq = bench([lambda i=i: tg.dequant_matmul(layers[i], xs[i % len(xs)]) for i in range(copies)])
        speed = t_dense / t_auto
        bw_int = (qbytes + io) / (t_auto * 1e-6) / bw
        bw_fp = (K * N * 2 + io) / (t_dense * 1e-6) / bw
        plan = "dequant + cuBLAS" if cfg is None else (
            f"{'tensor-core' if cfg.dot else 'gemv'} N{cfg.block_n} rows{cfg.rows} splitK{cfg.split_k} "
            f"warps{cfg.num_warps}")
        fused = f"{t_fused:8.1f}" if t_fused < float("inf") else f"{'-':>8}"
        print(f"{f'{K}x{N}':>12} {M:>4} | {t_dense:8.1f} {t_auto:8.1f} {fused} {t_deq:8.1f} | "
              f"{speed:6.2f}x {bw_int:6.0%} {bw_fp:7.0%} | {plan}")
        out[(K, N, M)] = speed
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64], help="rows of x (batch x tokens)")
    ap.add_argument("--bits", type=int, default=4, choices=(2, 4, 8))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action="store_true", help="random g_idx (desc_act checkpoints)")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--all", action="store_true", help="also print every fused tiling's time")
    args = ap.parse_args()
    if gpu_check.missing("gpu_kernels.py"):
        return 2
    import triton
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    bw = copy_bandwidth()
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB; torch {torch.__version__}, "
          f"triton {triton.__version__}")
    print(f"measured copy bandwidth: {bw / 1e9:.0f} GB/s; int{args.bits} g{args.group_size}"
          f"{' act-order' if args.act_order else ''}, activations {args.dtype}\n")
    head = (f"{'K x N':>12} {'M':>4} | {'dense us':>8} {'gptqkit':>8} {'fused':>8} {'deq+mm':>8} | {'speedup':>7} "
            f"{'BW int':>6} {'BW fp16':>7} | plan")
    print(head)
    print("-" * len(head))
    results = {}
    for K, N in SHAPES:
        results.update(bench_shape(K, N, args, dtype, bw, l2, props.multi_processor_count))
        torch.cuda.empty_cache()
    print()
    for (K, N, M), target in (((4096, 11008, 1), 3.0), ((4096, 11008, 16), 2.0)):
        if (K, N, M) in results:
            s = results[(K, N, M)]
            print(f"target {K}x{N} M={M}: {s:.2f}x vs >= {target}x: {'met' if s >= target else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
