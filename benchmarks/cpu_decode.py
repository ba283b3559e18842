"""CPU decode and prefill: dense vs gptqkit int4 on SmolLM2-135M-Instruct and a TinyLlama-1.1B-shaped model (and a
Llama-2-7B-shaped one with --models llama7b).

    python benchmarks/cpu_decode.py                       # both models, all columns
    python benchmarks/cpu_decode.py --models smollm2 --runs 5
    python benchmarks/cpu_decode.py --sweep               # per-layer int4-op vs dequantize+GEMM timings by rows M

Every model is measured in its own subprocess (gptqkit.bench.run_measurement): peak RSS is that model's alone.
"of which the model" is the peak less the process's RSS before loading: the runtime, i.e. the interpreter, torch,
transformers and the model's modeling code (gptqkit.bench.import_architecture; ~400 MiB for a Llama here, the same
in every column, GPTQModel's included).
Columns: dense bf16 (the baseline the issue names), dense fp32 (the fastest dense dtype on a CPU without native
bf16), gptqkit int4 with group 128 and 64 (bf16 activations), and GPTQModel on the same g128/g64 checkpoints in its
own virtual environment when benchmarks/peers/setup.sh has made it ($GPTQKIT_PEERS_DIR, default
~/.cache/gptqkit/peers). The quantized checkpoints use
round-to-nearest (gptqkit quantize --method rtn): speed does not depend on how the codes were chosen.

Roofline: DRAM read bandwidth (a sum over a 1 GiB fp32 tensor, best of 5, same threads, on 4 KiB and on huge pages)
divided by the weight bytes one decode token must read (every Linear and lm_head, in the layout the kernel reads: int4
codes plus bf16 scale/zero pairs for gptqkit; bf16 or fp32 for dense), ignoring the KV cache and activations. On the
shared VMs here the reading moves between levels (39-48 and 74-82 GB/s on one 2-core machine, a level lasting seconds
to minutes), so each decode run (new_tokens tokens, well under a second on the quantized models) is held against the
higher of two readings taken right before and right after it: a probe process (serve_probe) that holds its own
buffers reads them while the measured process waits on a FIFO (gptqkit.bench.Probe), so the readings add nothing to
the measured peak memory. A column's fraction is the median over its decode runs. The bandwidth is also read between
every two runs (a run: one column's fresh process) for the title's range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptqkit import bench as B
from gptqkit import memory
from gptqkit.generate import check_prefill_chunk

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT.parent / "shared/assets/corpora/calibration/tiny.txt"
STORIES = ROOT.parent / "shared/assets/models/stories260K"
PEERS = Path(os.environ.get("GPTQKIT_PEERS_DIR", Path.home() / ".cache" / "gptqkit" / "peers")).expanduser()
PEER_PY = PEERS / "gptqmodel/bin/python"  # made by benchmarks/peers/setup.sh, which writes gptqmodel/.ready

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                 rms_norm_eps=1e-5)
# Llama-2-7B, the most common GPTQ checkpoint: 13.5 GB in bf16, so building and measuring it needs ~16 GB of RAM
# and several minutes; only with --models llama7b.
LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
               rms_norm_eps=1e-5)
# --models name: (table title, folder prefix, LlamaConfig fields) of the random Llama-shaped models
SHAPES = {"tinyllama": ("TinyLlama-1.1B-shaped (random)", "tinyllama-shape", TINYLLAMA),
          "llama7b": ("Llama-2-7B-shaped (random)", "llama7b-shape", LLAMA7B)}

# Runs in GPTQModel's venv (no gptqkit there): the same protocol as gptqkit.bench.measure.
PEER_SCRIPT = r'''
import json, os, statistics, sys, time
spec = json.loads(sys.argv[1])
import torch
torch.set_num_threads(spec["threads"])
from gptqmodel import BACKEND, GPTQModel
def vm(field): return 1024 * int([ln for ln in open("/proc/self/status") if ln.startswith(field)][0].split()[1])
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(spec["path"]))]  # the runtime, as gptqkit.bench counts it
rss_start = vm("VmRSS")
t0 = time.perf_counter()
m = GPTQModel.load(spec["path"], device="cpu", backend=BACKEND.AUTO, dtype=torch.bfloat16)
load_s = time.perf_counter() - t0
model = m.model
ids = torch.randint(3, model.config.vocab_size, (1, spec["prompt_len"]), generator=torch.Generator().manual_seed(0))
chunk = spec.get("prefill_chunk") or spec["prompt_len"]
def prefill(x):
    t = time.perf_counter(); out = model(x[:, :chunk], use_cache=True, logits_to_keep=1)
    for s in range(chunk, x.shape[1], chunk):  # the rest of the prompt into the same cache
        past = out.past_key_values; out = None
        out = model(x[:, s:s + chunk], past_key_values=past, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t, out
def decode(out, n):
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    n0 = past.get_seq_length()
    t = time.perf_counter()
    for _ in range(n):
        s = model(tok, past_key_values=past, use_cache=True); past, tok = s.past_key_values, s.logits[:, -1:].argmax(-1)
    sec = time.perf_counter() - t
    past.crop(n0 - past.get_seq_length())
    return sec
with torch.inference_mode():
    decode(prefill(ids)[1], 4)  # as gptqkit.bench.measure: a full-length prefill warms up
    pre, out = [], None
    for _ in range(spec["prefill_runs"]):
        out = None; s, out = prefill(ids); pre.append(s)
    probe = [open(spec["probe"][0], "w"), open(spec["probe"][1])] if spec.get("probe") else None
    def reading():  # as gptqkit.bench.Probe
        probe[0].write("\n"); probe[0].flush()
        return float(probe[1].readline())
    dec, probes = [], []
    for _ in range(spec["runs"]):
        probes += [reading()] if probe else []
        dec.append(decode(out, spec["new_tokens"]))
    probes += [reading()] if probe else []
kinds = sorted({type(x).__name__ for x in model.modules() if hasattr(x, "qweight")})
json.dump({"load_s": load_s, "prefill_s": pre, "decode_s": dec, "kernels": kinds,
           "prefill_tokens_per_s": spec["prompt_len"] / statistics.median(pre),
           "decode_tokens_per_s": spec["new_tokens"] / statistics.median(dec),
           "decode_ms_per_token": 1e3 * statistics.median(dec) / spec["new_tokens"],
           "peak_rss_bytes": vm("VmHWM"), "peak_rss_model_bytes": vm("VmHWM") - rss_start,
           "threads": torch.get_num_threads(), **({"decode_probes": probes} if probe else {})},
          open(sys.argv[2], "w"))
'''


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bandwidth_buffers():
    """The two 1 GiB fp32 tensors read_bandwidth sums: on 4 KiB pages and on huge pages (gptqkit.memory, where
    gptqkit's loader puts the weights; 2-5% faster on the Zen 5 VM)."""
    yield torch.ones(2**28)
    yield memory.empty([2**28], torch.float32).fill_(1)


def read_bandwidth(buffers=None) -> float:
    """Bytes/s of a sum over a 1 GiB fp32 tensor, best of 5 with 1 thread and with all cores, on each of `buffers`
    (default: bandwidth_buffers(), made one at a time): the DRAM read bandwidth torch reaches (a lower bound on a
    loaded machine; one core alone may not saturate DRAM). Leaves torch's thread count as it found it."""
    best, before = float("inf"), torch.get_num_threads()
    for a in buffers if buffers is not None else bandwidth_buffers():
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            a.sum()
            best = min(best, *(_timed(a.sum) for _ in range(5)))
        del a
    torch.set_num_threads(before)
    return 2**30 / best


def serve_probe(request: str, reply: str) -> None:
    """The probe process: a bandwidth reading (bytes/s) on `reply` for each line on `request`, for one measured
    process after another (gptqkit.bench.Probe opens the FIFOs in the same order), until killed."""
    buffers = list(bandwidth_buffers())
    while True:
        with open(request) as req, open(reply, "w") as rep:
            for _ in req:
                rep.write(f"{read_bandwidth(buffers)}\n")
                rep.flush()


class ProbeProcess:
    """serve_probe in a subprocess, with its FIFOs in a temporary folder; `paths` goes into a spec as "probe"."""

    def __enter__(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="gptqkit-probe-")
        self.paths = [str(Path(self.tmp.name) / n) for n in ("request", "reply")]
        for f in self.paths:
            os.mkfifo(f)
        self.proc = subprocess.Popen([sys.executable, __file__, "--probe-server", *self.paths])
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        self.tmp.cleanup()


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------------- models


def calibration_texts() -> list[str]:
    return [t for t in CALIB.read_text().split("\n") if t.strip()][:32]


def variants(groups: list[int], heads: bool) -> list[tuple[str, int, bool]]:
    """(column label, group size, lm_head quantized) of each int4 checkpoint to measure."""
    return [(f"g{g}" + (" +head" if head else ""), g, head) for g in groups for head in ((False, True) if heads
                                                                                          else (False,))]


def smollm2(work: Path, groups: list[int], heads: bool = False) -> tuple[Path, dict[str, Path]]:
    """(dense bf16 folder, {label: int4 RTN checkpoint}) for the bundled SmolLM2-135M-Instruct; heads: also with the
    lm_head quantized (untied from the embedding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptqkit import bundled
    from gptqkit.config import QuantConfig
    from gptqkit.pipeline import quantize

    src = bundled.smollm2()
    dense = work / "smollm2-bf16"
    if not (dense / "config.json").exists():
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(dense)
        AutoTokenizer.from_pretrained(src).save_pretrained(dense)
    ckpts = {}
    for label, g, head in variants(groups, heads):
        out = ckpts[label] = work / f"smollm2-int4-rtn-g{g}{'-lmhead' if head else ''}"
        if not (out / "quantize_config.json").exists():
            log(f"quantizing SmolLM2 (RTN, 4 bits, group {g}{', lm_head too' if head else ''}) -> {out}")
            quantize(src, out, QuantConfig(bits=4, group_size=g, quant_method="rtn", lm_head=head),
                     dataset=calibration_texts(), nsamples=4, seqlen=64, progress=False, overwrite=True,
                     save_dtype="bfloat16")
    return dense, ckpts


def random_llama(work: Path, groups: list[int], key: str, heads: bool = False) -> tuple[Path, dict[str, Path]]:
    """(dense bf16 folder, {label: int4 RTN checkpoint}) for a random model of SHAPES[key]; heads: also with the
    lm_head quantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gptqkit.checkpoint import save
    from gptqkit.config import QuantConfig
    from gptqkit.qlinear import QuantLinear
    from gptqkit.quant import rtn

    title, prefix, shape = SHAPES[key]
    dense = work / f"{prefix}-bf16"
    if not (dense / "config.json").exists():
        log(f"building a random {title} model -> {dense}")
        torch.manual_seed(0)
        # made in bf16 directly: the 7B shape in fp32 would not fit in memory
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
        model.save_pretrained(dense)
        del model
    folders = {label: work / f"{prefix}-int4-rtn-g{g}{'-lmhead' if head else ''}" for label, g, head in
               variants(groups, heads)}
    for folder in [dense, *folders.values()]:
        # Random token ids drive the benchmark; a tokenizer is there because GPTQModel's loader insists on one.
        if folder.exists() and not (folder / "tokenizer.json").exists():
            AutoTokenizer.from_pretrained(STORIES).save_pretrained(folder)
    for (label, g, head), out in zip(variants(groups, heads), folders.values()):
        if (out / "quantize_config.json").exists():
            continue
        log(f"quantizing the {title} model (RTN, 4 bits, group {g}{', lm_head too' if head else ''}) -> {out}")
        cfg = QuantConfig(bits=4, group_size=g, quant_method="rtn", lm_head=head)
        model = LlamaForCausalLM.from_pretrained(dense, dtype=torch.bfloat16)
        for block in model.model.layers:
            for name, lin in list(block.named_modules()):
                if isinstance(lin, torch.nn.Linear):
                    q = QuantLinear.from_result(rtn(lin.weight.detach(), cfg), None, 4, g)
                    parent, _, child = name.rpartition(".")
                    setattr(block.get_submodule(parent), child, q)
        if head:
            model.lm_head = QuantLinear.from_result(rtn(model.lm_head.weight.detach(), cfg), None, 4, g)
        save(model, out, cfg, AutoTokenizer.from_pretrained(STORIES), dtype="bfloat16", overwrite=True)
        del model
    return dense, folders


# ---------------------------------------------------------------------------------------------- measuring


def weight_bytes_per_token(folder: Path, dense_bytes: int, kernel: str = "avx2") -> int:
    """Bytes of weights one decode step reads: quantized Linears in the layout `kernel` reads (avx2: qweight's
    0.5 bytes per weight plus an fp16 scale and a uint8 zero per group and column; cpu: the int4 op's codes plus
    bf16 scale/zero pairs), other 2-D weights at `dense_bytes` per value (the embedding only as a tied lm_head)."""
    from safetensors import safe_open

    from gptqkit.kernels.cpu_int4 import _int4_layout

    shapes = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                shapes[k] = tuple(fh.get_slice(k).get_shape())
    config = json.loads((folder / "config.json").read_text())
    total = 0
    for k, shape in shapes.items():
        if k.endswith(".qweight"):
            base = k[:-len(".qweight")]
            K, N = shapes[base + ".g_idx"][0], shape[1]
            G = shapes[base + ".scales"][0]
            g = -(-K // G)
            if kernel.startswith("avx2"):  # avx2 and avx2-q8 read qweight in place
                total += K * N // 2 + G * N * 3
            else:
                src, gop, _ = _int4_layout(torch.arange(K) // g, K)
                total += src.numel() * N // 2 + src.numel() // gop * N * 4
        elif k.endswith(".weight") and len(shape) == 2:
            if "embed_tokens" in k and not (config.get("tie_word_embeddings") and "lm_head.weight" not in shapes):
                continue
            total += shape[0] * shape[1] * dense_bytes
    return total


def measure(path: Path, quantized: bool, dtype: str, a, kernel: str = "auto", dense_dtype: str | None = None) -> dict:
    spec = {"path": str(path), "quantized": quantized, "dtype": dtype, "device": "cpu", "threads": a.threads,
            "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "runs": a.runs, "prefill_runs": a.prefill_runs,
            "warmup": 1, "kernel": kernel, "dense_dtype": dense_dtype, "prefill_chunk": a.prefill_chunk,
            "probe": a.probe}
    log(f"  measuring {path.name} ({dtype}, kernel {kernel}, embedding/lm_head {dense_dtype or dtype}) ...")
    r = B.run_measurement(spec)
    r["new_tokens"] = a.new_tokens
    r["size_bytes"] = B.size_on_disk(path)
    return r


def measure_peer(path: Path, a) -> dict:
    spec = {"path": str(path), "threads": a.threads, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
            "runs": a.runs, "prefill_runs": a.prefill_runs, "prefill_chunk": a.prefill_chunk, "probe": a.probe}
    log(f"  measuring {path.name} with GPTQModel ...")
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": str(a.threads), "OMP_NUM_THREADS": str(a.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="gptqmodel-bench-") as tmp:  # GPTQModel writes logs into its cwd
        out = Path(tmp) / "r.json"
        p = subprocess.run([str(PEER_PY), "-c", PEER_SCRIPT, json.dumps(spec), str(out)], cwd=tmp, env=env,
                           capture_output=True, text=True)
        if p.returncode != 0 or not out.exists():
            last = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
            return {"error": f"exit {p.returncode}: {last[0][:160]}"}
        return {**json.loads(out.read_text()), "new_tokens": a.new_tokens}


def table(title: str, cols: dict[str, dict], base: str = "dense bf16") -> str:
    mib = 2**20
    b = cols.get(base, {})

    def row(label, fn, fmt="{:10.2f}"):
        cells = []
        for r in cols.values():
            try:
                cells.append(fmt.format(fn(r)) if "error" not in r else f"{'-':>10s}")
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append(f"{'-':>10s}")
        return f"{label:28s}" + "".join(f" {c:>13s}" for c in cells)

    head = f"{'':28s}" + "".join(f" {k:>13s}" for k in cols)
    lines = [title, head,
             row("decode tokens/s", lambda r: r["decode_tokens_per_s"]),
             row("  x dense bf16", lambda r: r["decode_tokens_per_s"] / b["decode_tokens_per_s"], "{:9.2f}x"),
             row("  best run tokens/s", lambda r: r["new_tokens"] / min(r["decode_s"])),
             row("decode ms/token", lambda r: r["decode_ms_per_token"]),
             row("prefill tokens/s", lambda r: r["prefill_tokens_per_s"]),
             row("  x dense bf16", lambda r: r["prefill_tokens_per_s"] / b["prefill_tokens_per_s"], "{:9.2f}x"),
             row("peak RSS MiB", lambda r: r["peak_rss_bytes"] / mib, "{:10.0f}"),
             row("  / dense bf16", lambda r: r["peak_rss_bytes"] / b["peak_rss_bytes"], "{:10.2f}"),
             row("  of which the model MiB", lambda r: r["peak_rss_model_bytes"] / mib, "{:10.0f}"),
             row("  / dense bf16", lambda r: r["peak_rss_model_bytes"] / b["peak_rss_model_bytes"], "{:10.2f}"),
             row("size on disk MiB", lambda r: r["size_bytes"] / mib, "{:10.0f}"),
             row("weight MB read / token", lambda r: r["bytes_per_token"] / 1e6, "{:10.1f}"),
             row("DRAM read GB/s at its decodes", lambda r: statistics.median(r["run_bandwidth"]) / 1e9, "{:10.1f}"),
             row("roofline tokens/s", lambda r: statistics.median(r["run_bandwidth"]) / r["bytes_per_token"],
                 "{:10.1f}"),
             row("  fraction achieved", lambda r: statistics.median(r["run_fraction"]), "{:10.2f}"),
             row("  lowest, highest decode", lambda r: f"{min(r['run_fraction']):.2f}-{max(r['run_fraction']):.2f}",
                 "{:>10s}")]
    errors = [f"  {k}: {r['error']}" for k, r in cols.items() if "error" in r]
    return "\n".join(lines + errors)


def merge_rounds(rs: list[dict], prompt_len: int, nbytes: int) -> dict:
    """One column from its rounds' measurements: the timings pooled and their medians taken again, the highest peak
    RSS, and per decode run the bandwidth it is held against (the higher of the probe's readings on either side of
    it; without them, the run's r["bandwidth"]) and the roofline fraction it reached (nbytes: weight bytes read per
    token); a failed round fails the column."""
    failed = next((r for r in rs if "error" in r), None)
    if failed is not None:
        return failed
    pre, dec = [t for r in rs for t in r["prefill_s"]], [t for r in rs for t in r["decode_s"]]
    n = rs[0]["new_tokens"]
    return {**rs[0], "prefill_s": pre, "decode_s": dec, "prefill_tokens_per_s": prompt_len / statistics.median(pre),
            "decode_tokens_per_s": n / statistics.median(dec), "decode_ms_per_token": 1e3 * statistics.median(dec) / n,
            **{k: max(r[k] for r in rs) for k in ("peak_rss_bytes", "peak_rss_model_bytes") if k in rs[0]},
            "bytes_per_token": nbytes, "run_bandwidth": [b for r in rs for b in held_against(r)],
            "run_fraction": [n / d * nbytes / b for r in rs for d, b in zip(r["decode_s"], held_against(r))]}


def held_against(r: dict) -> list[float]:
    """The bandwidth each of r's decode runs is held against."""
    p = r.get("decode_probes")
    if p and len(p) == len(r["decode_s"]) + 1:
        return [max(a, b) for a, b in zip(p, p[1:])]
    return [r["bandwidth"]] * len(r["decode_s"])


def run_model(name: str, dense: Path, ckpts: dict[str, Path], a) -> tuple[str, dict]:
    readings = [read_bandwidth()]
    log(f"DRAM read bandwidth: {readings[0] / 1e9:.2f} GB/s; load average {os.getloadavg()}")
    # (column, measurement, bytes one decode token reads), in the order they run
    tasks = [("dense bf16", lambda: measure(dense, False, "bfloat16", a), weight_bytes_per_token(dense, 2))]
    if not a.no_fp32:
        tasks.append(("dense fp32", lambda: measure(dense, False, "float32", a), weight_bytes_per_token(dense, 4)))
    for kernel in a.kernels.split(","):
        for label, ck in ckpts.items():
            for act in a.acts.split(","):
                # bf16: everything in bf16; fp32: fp32 activations, embedding and lm_head stored in bf16
                tasks.append((f"{kernel} {label}" + (" fp32" if act == "fp32" else ""),
                              lambda ck=ck, act=act, kernel=kernel: measure(
                                  ck, True, {"bf16": "bfloat16", "fp32": "float32"}[act], a, kernel,
                                  "bfloat16" if act == "fp32" else None),
                              weight_bytes_per_token(ck, 2, kernel)))
    peer_ok = (PEERS / "gptqmodel" / ".ready").exists() and PEER_PY.exists()
    if peer_ok and not a.no_peer:
        for label, ck in ckpts.items():
            tasks.append((f"GPTQModel {label}",
                          lambda ck=ck: {**measure_peer(ck, a), "size_bytes": B.size_on_disk(ck)},
                          weight_bytes_per_token(ck, 2, "cpu")))  # it runs the same int4 op as the cpu kernel
    runs: dict[str, list] = {col: [] for col, _, _ in tasks}
    for i in range(a.rounds):  # rounds alternate the order, so a slow spell of this shared machine hits all columns
        for col, run, _ in (tasks if i % 2 == 0 else tasks[::-1]):
            r = run()
            readings.append(read_bandwidth())
            runs[col].append({**r, "bandwidth": max(readings[-2:])})
    cols: dict[str, dict] = {col: merge_rounds(runs[col], a.prompt_len, nbytes) for col, _, nbytes in tasks}
    pieces = f" in pieces of {a.prefill_chunk}" if a.prefill_chunk else ""
    title = (f"{name}: {a.threads} threads, prompt {a.prompt_len} tokens{pieces}, {a.new_tokens} new tokens, median of "
             f"{a.rounds * a.runs} decodes / {a.rounds * a.prefill_runs} prefills ({a.rounds} rounds of fresh "
             f"processes); DRAM read {min(readings) / 1e9:.1f}-{max(readings) / 1e9:.1f} GB/s over "
             f"{len(readings)} readings, one between every two runs; each decode run held against readings right "
             f"before and after it")
    text = table(title, cols)
    cols["bandwidth_bytes_per_s"] = readings
    if not peer_ok:
        text += f"\nGPTQModel: not installed at {PEER_PY.parent.parent}"
    return text, cols


# ---------------------------------------------------------------------------------------------- the sweep


def sweep(threads: int, ms: list[int]) -> str:
    """Per-layer ms per call by rows M: the avx2 C kernel (fp32 and int8 activations), the int4 op (cpu kernel) and
    the avx2 kernels' dequantize + GEMM (what they run from M_MAX rows on)."""
    import dataclasses

    from gptqkit.kernels import cpu_avx2, cpu_int4
    from gptqkit.qlinear import QuantLinear
    from gptqkit.quant import QuantResult

    torch.set_num_threads(threads)
    dt = cpu_int4.dense_dtype(torch.float32, reduced=True)
    lines = [f"kernel sweep, {threads} threads, ms per call (best of 5): avx2 C kernel (fp32 / int8 activations) vs "
             f"int4 op vs dequantize + GEMM ({dt}); avx2 M_MAX = {cpu_avx2.M_MAX}, int4 op PREFILL_M = "
             f"{cpu_int4.prefill_m()}",
             f"{'K x N':>12s} {'M':>5s} {'avx2':>9s} {'avx2-q8':>9s} {'int4 op':>9s} {'dense':>9s} {'q8 GB/s':>10s}"]
    for K, N in ((576, 1536), (1536, 576), (2048, 2048), (2048, 5632), (5632, 2048)):
        g = 128 if K % 128 == 0 else 64
        gen = torch.Generator().manual_seed(0)
        res = QuantResult(torch.randint(0, 16, (N, K), generator=gen).to(torch.uint8),
                          (torch.rand(-(-K // g), N, generator=gen) * 0.01).half().float(),
                          torch.full((-(-K // g), N), 8, dtype=torch.int32), (torch.arange(K) // g).to(torch.int32))
        a, b = QuantLinear.from_result(res, None, 4, g), QuantLinear.from_result(res, None, 4, g)
        a.use_kernel(cpu_avx2)
        b.use_kernel(cpu_int4)
        plan = b._cpu_plan
        cross = None
        for M in ms:
            x = torch.randn(M, K)
            xb = x.to(torch.bfloat16)
            t = {}
            for path, f in (("avx2", lambda: cpu_avx2.matmul(a, x)),
                            ("q8", lambda: cpu_avx2.matmul(a, x, int8=True)),
                            ("int4", lambda: cpu_int4.forward(b, xb)),
                            ("dense", lambda: cpu_avx2.dense_matmul(a, x.to(dt)).float())):
                b._cpu_plan = dataclasses.replace(plan, prefill_m=1 << 30)
                with torch.inference_mode():
                    f()
                    t[path] = min(_timed(f) for _ in range(5)) * 1e3
            b._cpu_plan = plan
            if cross is None and t["dense"] < t["q8"]:
                cross = M
            lines.append(f"{f'{K}x{N}':>12s} {M:5d} {t['avx2']:9.3f} {t['q8']:9.3f} {t['int4']:9.3f} "
                         f"{t['dense']:9.3f} {K * N / 2 / t['q8'] / 1e6:10.1f}")
        lines.append(f"{f'{K}x{N}':>12s} dense path first faster than avx2-q8 at M = {cross}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,tinyllama", help="of smollm2, tinyllama, llama7b")
    p.add_argument("--groups", default="128,64")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every column this many times in fresh processes, in alternating order, and pool "
                        "the timings (the machines here are shared: one round's columns can see different loads)")
    # 5: on SmolLM2 single 512-token prefills ranged over 650-1010 tokens/s in one process, so a median of 2 moved
    # a column by a third between runs
    p.add_argument("--prefill-runs", type=int, default=5)
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prefill the prompt this many tokens at a time, every column alike (default: all at once)")
    p.add_argument("--work", default=str(Path(os.environ.get("GPTQKIT_CACHE", Path.home() / ".cache/gptqkit"))
                                         / "bench"))
    p.add_argument("--no-fp32", action="store_true", help="skip the dense fp32 column")
    p.add_argument("--kernels", default="avx2-q8,avx2,cpu",
                   help="gptqkit kernels to measure, one column per group each")
    p.add_argument("--acts", default="bf16,fp32",
                   help="gptqkit activation modes, a column each: bf16 (all bf16), fp32 (fp32 activations with the "
                        "embedding and lm_head stored in bf16, gptqkit.dense)")
    p.add_argument("--no-peer", action="store_true", help="skip GPTQModel")
    p.add_argument("--lm-head", action="store_true",
                   help="also checkpoints with the lm_head quantized too (columns '... +head')")
    p.add_argument("--sweep", action="store_true", help="only the per-layer kernel sweep")
    p.add_argument("--sweep-m", default="1,2,4,8,16,24,32,48,64,96,128,256")
    p.add_argument("--json", default=None, help="also write all measurements to this file")
    p.add_argument("--probe-server", nargs=2, metavar=("REQUEST", "REPLY"), help=argparse.SUPPRESS)  # serve_probe
    a = p.parse_args()
    if a.probe_server:
        serve_probe(*a.probe_server)
        return 0
    if a.sweep:
        print(sweep(a.threads, [int(m) for m in a.sweep_m.split(",")]))
        return 0
    unknown = [n for n in a.models.split(",") if n != "smollm2" and n not in SHAPES]
    if unknown:
        p.error(f"--models: {', '.join(unknown)} not among smollm2, {', '.join(SHAPES)}")
    try:  # its specs go to the children as they are, past bench()'s own check
        check_prefill_chunk(a.prefill_chunk)
    except ValueError as e:
        p.error(f"--prefill-chunk: {e}")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    groups = [int(g) for g in a.groups.split(",")]
    out, raw = [], {"load_average": os.getloadavg()}
    with ProbeProcess() as probe:
        a.probe = probe.paths
        for name in a.models.split(","):
            if name == "smollm2":
                (dense, ckpts), title = smollm2(work, groups, a.lm_head), "SmolLM2-135M-Instruct"
            else:
                (dense, ckpts), title = random_llama(work, groups, name, a.lm_head), SHAPES[name][0]
            text, cols = run_model(title, dense, ckpts, a)
            print(text + "\n", flush=True)
            out.append(text)
            raw[name] = cols
    raw["load_average_end"] = os.getloadavg()
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
