"""Latency, throughput, memory and size of a checkpoint, side by side with its dense baseline.

Each model is measured in a fresh subprocess (`python -m gptqkit.bench --child SPEC OUT`), so the peak memory is
that model's alone: the peak resident set (VmHWM) on CPU, torch.cuda.max_memory_allocated on CUDA.
Timings: a warm-up on a short prompt, then repetitions and their median. Prefill is one forward over a
`prompt_len`-token prompt (logits for the last position only, as generate() does), or with `prefill_chunk` that
prompt in pieces of at most that many tokens into the same cache, as generate(prefill_chunk=...); decode is a
greedy loop with the KV cache over exactly `new_tokens` tokens after that prompt (no EOS stop); the cache is cut
back to the prompt between decode runs.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


class BenchError(RuntimeError):
    pass


class Probe:
    """A reading that another process takes while this one waits, next to each decode run (spec["probe"]: the paths
    of two FIFOs). A benchmark holds each run against the DRAM bandwidth read just before and after it this way
    (benchmarks/cpu_decode.py): on a shared machine the bandwidth moves between levels within seconds, so a reading
    taken in another process minutes away can be a level off. The FIFOs are opened at the first reading, request
    then reply, as the reading process opens them; each reading is a line out and a number back."""

    def __init__(self, request: str, reply: str):
        self.paths, self.files = (request, reply), None

    def read(self) -> float:
        if self.files is None:
            self.files = (open(self.paths[0], "w"), open(self.paths[1]))
        try:
            self.files[0].write("\n")
            self.files[0].flush()
            line = self.files[1].readline()
        except BrokenPipeError:  # it stopped reading requests
            line = ""
        if not line:
            raise BenchError(f"the probe process closed {self.paths[0]} or {self.paths[1]} without a reading")
        return float(line)


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of the weight files in a model folder."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix in WEIGHT_SUFFIXES)


def vm_kib(field: str) -> int | None:
    """A /proc/self/status memory field (VmRSS, VmHWM) in KiB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def import_architecture(path: str | os.PathLike) -> str | None:
    """Import the transformers class that runs the model in `path` (from its config.json) without reading a weight;
    its name, or None where transformers has no class for it (custom code). measure() takes the runtime's RSS after
    this: the modeling code, and what it imports, is the same in a dense and a quantized process (a Llama one
    maps 93 MiB here, 164 MiB where triton is installed: transformers imports torch._dynamo, which imports
    triton), so it counts as runtime, not as the model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(path)
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__
    except (KeyError, ValueError, OSError):
        return None


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes, kind): allocated GPU memory since the last torch.cuda.reset_peak_memory_stats on CUDA, else this
    process's peak resident set (VmHWM), None where there is no /proc."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "GPU"
    hwm = vm_kib("VmHWM")
    return (None if hwm is None else 1024 * hwm), "RSS"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one model and time it, in this process (bench() runs this in a fresh subprocess per model)."""
    import resource

    if not Path(spec["path"]).is_dir():
        raise BenchError(f"{spec['path']} is not a model folder")
    from transformers import AutoModelForCausalLM

    from .cache import cache_for, cache_kwarg, output_cache
    from .checkpoint import load

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"]) if spec.get("dtype") else None
    import_architecture(spec["path"])
    rss_start = vm_kib("VmRSS")  # the runtime: interpreter, torch, transformers and the model's code, no weights
    t0 = time.perf_counter()
    if spec["quantized"]:
        model = load(spec["path"], device=device, dtype=dtype, kernel=spec.get("kernel", "auto"),
                     dense_dtype=spec.get("dense_dtype"))
        if spec.get("adapter"):
            from .finetune import with_adapter

            model = with_adapter(model, spec["adapter"])
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype or torch.float32,
                                                     low_cpu_mem_usage=True).to(device).eval()
    load_s = time.perf_counter() - t0
    rss_loaded = vm_kib("VmRSS")
    kv_cache = spec.get("kv_cache", "auto")
    cache_name = cache_kwarg(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(spec.get("seed", 0))
    ids = torch.randint(3, vocab, (1, spec["prompt_len"]), generator=gen).to(device)

    chunk = spec.get("prefill_chunk") or spec["prompt_len"]

    def prefill(x: torch.Tensor):
        _sync(device)
        t = time.perf_counter()
        cache = cache_for(model, kv_cache, x.shape[1] + spec["new_tokens"])  # the most decode() adds
        for s in range(0, x.shape[1], chunk):
            out = None  # the last piece's activations are freed before the next piece's are made
            out = model(x[:, s:s + chunk], **{cache_name: cache}, use_cache=True, logits_to_keep=1)
        _sync(device)
        return time.perf_counter() - t, out

    def decode(out, n: int) -> float:
        """n greedy steps after the prompt's cache in `out`; the cache is cut back to the prompt afterwards."""
        past, tok = output_cache(out), out.logits[:, -1:].argmax(-1)
        prompt_len = past.get_seq_length()
        _sync(device)
        t = time.perf_counter()
        for _ in range(n):
            step = model(tok, **{cache_name: past}, use_cache=True)
            past, tok = output_cache(step), step.logits[:, -1:].argmax(-1)
        _sync(device)
        seconds = time.perf_counter() - t
        past.crop(prompt_len - past.get_seq_length())  # a negative count drops that many tokens from the end
        return seconds

    with torch.inference_mode():
        # A warm-up is a full-length prefill and a few decode steps: the first prompt of a given length pays
        # one-time costs (the heap growing to its activation and dequantization buffers, page faults) that a
        # serving process pays once; on SmolLM2 that first run took 1.2-1.5x the later ones.
        for _ in range(spec.get("warmup", 1)):
            decode(prefill(ids)[1], min(4, spec["new_tokens"]))
        pre, out = [], None
        for _ in range(spec.get("prefill_runs") or spec["runs"]):
            out = None  # one prompt's cache at a time, as a user holds it: the last run's is freed first
            seconds, out = prefill(ids)
            pre.append(seconds)
        probe = Probe(*spec["probe"]) if spec.get("probe") else None
        dec, probes = [], []
        for _ in range(spec["runs"]):
            probes += [probe.read()] if probe else []
            dec.append(decode(out, spec["new_tokens"]))
        probes += [probe.read()] if probe else []
    r: dict[str, Any] = {
        "path": str(spec["path"]), "quantized": spec["quantized"], "device": str(device),
        "dtype": spec.get("dtype") or str(next(model.parameters()).dtype).removeprefix("torch."),
        "dense_dtype": spec.get("dense_dtype"), "threads": torch.get_num_threads(),
        "load_s": load_s, "prefill_s": pre, "decode_s": dec,
        "prefill_tokens_per_s": spec["prompt_len"] / statistics.median(pre),
        "decode_ms_per_token": 1e3 * statistics.median(dec) / spec["new_tokens"],
        "decode_tokens_per_s": spec["new_tokens"] / statistics.median(dec),
        "rss_loaded_bytes": rss_loaded * 1024 if rss_loaded else None,
        # VmHWM: the peak resident set of this process's memory over load and all runs. (ru_maxrss is not used
        # where VmHWM exists: Linux carries it over fork and exec, so it starts at the parent's resident size.)
        "peak_rss_bytes": 1024 * (vm_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        "rss_start_bytes": rss_start * 1024 if rss_start else None,
    }
    if probe:
        r["decode_probes"] = probes  # one before each decode run and one after the last
    if rss_start:
        # What the model adds to the process: its weights, buffers, KV cache and activations, and whatever
        # else loading and running it allocates. The runtime before it (~400 MiB here for a Llama: interpreter,
        # torch, transformers and its modeling code, see import_architecture) is in every peak alike, about 40%
        # of a 4-bit 1.1B model's.
        r["peak_rss_model_bytes"] = r["peak_rss_bytes"] - r["rss_start_bytes"]
    if spec["quantized"]:
        from .qlinear import QuantLinear

        kernels: dict[str, int] = {}
        for m in model.modules():
            if isinstance(m, QuantLinear):
                kernels[m.kernel.name] = kernels.get(m.kernel.name, 0) + 1
        r["kernels"] = kernels
    if device.type == "cuda":
        r["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return r


def run_measurement(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """measure(spec) in a fresh `python -m gptqkit.bench --child` process; its result dict."""
    with tempfile.TemporaryDirectory(prefix="gptqkit-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "gptqkit.bench", "--child", json.dumps(spec), str(out)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if spec.get("threads"):
            env["OMP_NUM_THREADS"] = str(spec["threads"])
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if p.returncode != 0 or not out.exists():
            tail = "\n".join(p.stderr.strip().splitlines()[-8:])
            raise BenchError(f"measuring {spec['path']} failed (exit {p.returncode}):\n{tail}")
        return json.loads(out.read_text())


def default_dtypes(device: str | torch.device) -> tuple[str, str | None, str]:
    """(dtype, dense_dtype, baseline dtype) bench uses when none is given.

    On CPU the checkpoint computes in fp32 with its embedding and lm_head in bf16 storage (gptqkit.dense; their
    decode GEMV widens bf16 in registers), and the baseline runs in bf16, what a CPU user runs a dense model in.
    fp32 activations are what the 4-bit kernels take without a cast, and torch's bf16 decode ops are slow on CPU
    even with bf16 instructions: on the 1.1B shape fp32 decoded 1.4x faster than all-bf16 on an AVX2 EPYC and 1.8x
    on an AVX512-BF16 one (where SDPA took 1.0 ms per call in bf16 against 0.14 ms in fp32). Prefill keeps bf16
    speed there: the approximate kernels run their dequantize + GEMM in bf16 (kernels.cpu_int4.dense_dtype)."""
    if torch.device(device).type == "cuda":
        return "float16", None, "float16"
    return "float32", "bfloat16", "bfloat16"


def bench(ckpt: str | os.PathLike, baseline: str | os.PathLike | None = None, prompt_len: int = 128,
          new_tokens: int = 64, runs: int = 3, device: str = "cpu", threads: int | None = None,
          dtype: str | None = None, baseline_dtype: str | None = None, kernel: str = "auto", warmup: int = 1,
          timeout: float | None = None, prefill_runs: int | None = None,
          dense_dtype: str | None = None, kv_cache: str = "auto",
          prefill_chunk: int | None = None, adapter: str | os.PathLike | None = None) -> dict[str, Any]:
    """Measure a GPTQ checkpoint and, if given, its dense baseline, each in a fresh subprocess.

    dtype (of activations and unquantized tensors) and dense_dtype default to what runs fastest here
    (default_dtypes): float16 on CUDA; on CPU the checkpoint computes in float32 with its embedding and lm_head
    stored in bfloat16. The baseline defaults to dtype when that is given, else bfloat16 on CPU: what a CPU user
    would run the dense model in. Returns {"settings", "quantized", "baseline", "ratios"} with sizes in bytes and
    times in seconds; ratios are quantized / baseline (memory, size) and baseline / quantized for time (a speed-up
    above 1 means the checkpoint is faster). dense_dtype: storage of the
    checkpoint's embedding and lm_head when it differs from dtype (see gptqkit.dense), e.g. dtype float32 with
    dense_dtype bfloat16. kv_cache: as generate's (auto: bf16 under gptqkit's float32 CPU attention, so the cache
    takes the bytes a bf16 baseline's does; model: the model's dtype). prefill_chunk: prefill the prompt in pieces of
    at most this many tokens, both models alike (less activation memory on long prompts, see generate()).
    adapter: a LoRA adapter folder the checkpoint runs with (finetune.with_adapter); its weights count in its size.

    >>> r = bench("smollm2-gptq-4bit", baseline="SmolLM2-135M-Instruct", threads=2)  # doctest: +SKIP
    >>> r["ratios"]["decode_speedup"]  # doctest: +SKIP
    """
    from . import kernels
    from .generate import check_prefill_chunk, is_checkpoint

    if kernel != "auto":
        kernels.load(kernel)  # an unknown name fails here, not in the subprocess
    d_dtype, d_dense, d_base = default_dtypes(device)
    if dtype is None:
        dtype, dense_dtype = d_dtype, dense_dtype or d_dense
    baseline_dtype = baseline_dtype or (dtype if dtype != d_dtype else d_base)
    check_prefill_chunk(prefill_chunk)
    if not is_checkpoint(ckpt):
        raise BenchError(f"{ckpt} is not a GPTQ checkpoint (no quantize_config.json or quantization_config)")
    if adapter is not None:
        from .finetune import adapter_folder

        adapter = str(adapter_folder(adapter))
    settings = {"prompt_len": prompt_len, "new_tokens": new_tokens, "runs": runs, "warmup": warmup,
                "prefill_runs": prefill_runs or runs, "device": device, "threads": threads, "kernel": kernel,
                "kv_cache": kv_cache, "prefill_chunk": prefill_chunk, "adapter": adapter}
    common = {**settings, "seed": 0, "adapter": None}  # the baseline runs without the adapter
    q = run_measurement({**common, "path": str(ckpt), "quantized": True, "dtype": dtype, "dense_dtype": dense_dtype,
                         "adapter": adapter}, timeout)
    q["size_bytes"] = size_on_disk(ckpt) + (size_on_disk(adapter) if adapter else 0)
    result: dict[str, Any] = {"settings": settings, "quantized": q, "baseline": None, "ratios": {}}
    if baseline is not None:
        b = run_measurement({**common, "path": str(baseline), "quantized": is_checkpoint(baseline),
                        "dtype": baseline_dtype}, timeout)
        b["size_bytes"] = size_on_disk(baseline)
        result["baseline"] = b
        mem = "gpu_peak_bytes" if "gpu_peak_bytes" in q else "peak_rss_bytes"
        result["ratios"] = {
            "size": q["size_bytes"] / b["size_bytes"],
            "peak_memory": q[mem] / b[mem],
            **({"peak_memory_model": q["peak_rss_model_bytes"] / b["peak_rss_model_bytes"]}
               if mem == "peak_rss_bytes" and q.get("peak_rss_model_bytes") and b.get("peak_rss_model_bytes") else {}),
            "prefill_speedup": q["prefill_tokens_per_s"] / b["prefill_tokens_per_s"],
            "decode_speedup": q["decode_tokens_per_s"] / b["decode_tokens_per_s"],
        }
    return result


def format_table(r: dict[str, Any]) -> str:
    """The result of bench() as a fixed-width table, one row per measure, with ratios."""
    q, b = r["quantized"], r["baseline"]
    mem = "gpu_peak_bytes" if "gpu_peak_bytes" in q else "peak_rss_bytes"
    mib = 2**20
    rows = [
        ("size on disk (MiB)", q["size_bytes"] / mib, b and b["size_bytes"] / mib, "size"),
        ("peak GPU memory (MiB)" if mem == "gpu_peak_bytes" else "peak RSS (MiB)", q[mem] / mib,
         b and b[mem] / mib, "peak_memory"),
        *([("  of which the model (MiB)", q["peak_rss_model_bytes"] / mib,
            b["peak_rss_model_bytes"] / mib if b and b.get("peak_rss_model_bytes") else None,
            "peak_memory_model" if b and "peak_memory_model" in r["ratios"] else None)]
          if mem == "peak_rss_bytes" and q.get("peak_rss_model_bytes") else []),
        (f"prefill, {r['settings']['prompt_len']} tokens"
         f"{' in pieces of %d' % r['settings']['prefill_chunk'] if r['settings'].get('prefill_chunk') else ''}"
         " (tokens/s)", q["prefill_tokens_per_s"],
         b and b["prefill_tokens_per_s"], "prefill_speedup"),
        ("decode latency (ms/token)", q["decode_ms_per_token"], b and b["decode_ms_per_token"], None),
        ("decode throughput (tokens/s)", q["decode_tokens_per_s"], b and b["decode_tokens_per_s"], "decode_speedup"),
        ("load time (s)", q["load_s"], b and b["load_s"], None),
    ]
    head_b = f"baseline {b['dtype']}" if b else ""
    lines = [f"{'':38s} {'gptqkit ' + q['dtype']:>16s} {head_b:>16s} {'ratio' if b else '':>8s}"]
    if q.get("dense_dtype"):
        lines[0] = lines[0].rstrip() + f"   (gptqkit's embedding and lm_head stored in {q['dense_dtype']})"
    if r["settings"].get("adapter"):
        lines[0] = lines[0].rstrip() + f"   (gptqkit with the LoRA adapter {r['settings']['adapter']})"
    for label, qv, bv, key in rows:
        ratio = f"{r['ratios'][key]:7.2f}x" if b and key else ""
        lines.append(f"{label:38s} {qv:16.2f} {'' if bv is None else f'{bv:16.2f}':>16s} {ratio:>8s}")
    s = r["settings"]
    lines.append(f"device {q['device']}, {q['threads']} threads; medians of {s['prefill_runs']} prefills and "
                 f"{s['runs']} greedy decodes of {s['new_tokens']} tokens with KV cache, after {s['warmup']} "
                 f"warm-up; kernels {q.get('kernels')}")
    if mem == "peak_rss_bytes" and q.get("peak_rss_model_bytes"):
        lines.append(f"of which the model: the peak less the runtime's RSS before loading (interpreter, torch, "
                     f"transformers and the model's code: {q['rss_start_bytes'] / mib:.0f} MiB)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- CLI


def add_bench_args(p) -> None:
    from .generate import ADAPTER_HELP, add_kv_cache_arg, add_prefill_chunk_arg

    p.add_argument("ckpt", help="GPTQ checkpoint folder")
    p.add_argument("--baseline", default=None, help="the dense model folder to compare with (e.g. the original)")
    p.add_argument("--prompt-len", type=int, default=128, help="prefill prompt length (default 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per run (default 64)")
    p.add_argument("--runs", type=int, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--prefill-runs", type=int, default=None, help="timed prefills (default: --runs)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", default=None, help="activations/unquantized tensors (default: float16 on CUDA; "
                                                 "float32 with a bfloat16 embedding and lm_head on CPU)")
    p.add_argument("--baseline-dtype", default=None, help="dtype of the baseline (default: --dtype, else bfloat16 "
                                                          "on CPU)")
    p.add_argument("--dense-dtype", default=None, help="storage dtype of the checkpoint's embedding and lm_head "
                                                       "(e.g. --dtype float32 --dense-dtype bfloat16, the CPU default)")
    p.add_argument("--kernel", default="auto")
    p.add_argument("--adapter", default=None, metavar="DIR", help=ADAPTER_HELP)
    add_kv_cache_arg(p)
    add_prefill_chunk_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run_bench(args) -> int:
    from . import bundled

    baseline = args.baseline
    if baseline and baseline.lower() in (bundled.NAME.lower(), "smollm2"):
        baseline = str(bundled.smollm2())
    r = bench(args.ckpt, baseline=baseline, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
              runs=args.runs, device=args.device, threads=args.threads, dtype=args.dtype,
              baseline_dtype=args.baseline_dtype, kernel=args.kernel, warmup=args.warmup,
              prefill_runs=args.prefill_runs, dense_dtype=args.dense_dtype, kv_cache=args.kv_cache,
              prefill_chunk=args.prefill_chunk, adapter=args.adapter)
    print(json.dumps(r, indent=2) if args.json else format_table(r))
    return 0


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--child":
    Path(sys.argv[3]).write_text(json.dumps(measure(json.loads(sys.argv[2]))))
