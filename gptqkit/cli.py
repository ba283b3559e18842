"""The `gptqkit` command: thin subcommands, each calling one public function. Only this module prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from . import __version__, bench, generate
from .generate import ADAPTER_HELP, is_checkpoint


def _model_arg(s: str) -> str:
    from . import bundled

    return str(bundled.smollm2()) if s.lower() in (bundled.NAME.lower(), "smollm2") else s


def load_any(p: str, device: str = "cpu", kernel: str = "auto", trust_remote_code: bool = False,
             allow_pickle: bool = False, dtype=None, adapter: str | None = None):
    """(model, tokenizer, is_quantized) for a gptqkit/GPTQ checkpoint or a floating-point model folder, with the
    LoRA adapter folder `adapter` on it (finetune.with_adapter)."""
    from transformers import AutoTokenizer

    from .checkpoint import load
    from .finetune import adapter_folder, with_adapter
    from .pipeline import load_source

    p = _model_arg(p)
    if adapter is not None:
        adapter_folder(adapter)  # a missing or incomplete adapter fails before the model is read
    if is_checkpoint(p):
        model = load(p, device=device, kernel=kernel, dtype=dtype, trust_remote_code=trust_remote_code,
                     allow_pickle=allow_pickle)
        tok, quantized = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code), True
    else:
        kw = {"dtype": dtype} if dtype is not None else {}
        model, tok = load_source(p, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, **kw)
        model, quantized = model.to(device), False
    return (model if adapter is None else with_adapter(model, adapter)), tok, quantized


def cmd_quantize(a) -> int:
    from .config import QuantConfig
    from .pipeline import quantize

    cfg = QuantConfig(bits=a.bits, group_size=a.group_size, desc_act=a.desc_act, sym=not a.asym,
                      damp_percent=a.damp, true_sequential=not a.no_true_sequential, static_groups=a.static_groups,
                      act_group_aware=not a.natural_order, checkpoint_format=a.format, mse=a.mse, quant_method=a.method,
                      lm_head=a.lm_head)
    r = quantize(_model_arg(a.model), a.out, cfg, dataset=a.dataset, nsamples=a.nsamples, seqlen=a.seqlen,
                 seed=a.seed, data_dir=a.data_dir, device=a.device, batch_size=a.batch_size, resume=a.resume,
                 overwrite=a.overwrite, save_dtype=a.save_dtype, max_shard_size=a.max_shard_size,
                 trust_remote_code=a.trust_remote_code, allow_pickle=a.allow_pickle, progress=not a.quiet,
                 first_blocks=a.first_blocks, adapter=a.adapter)
    skips = [k for k in r.config.dynamic or {} if k.startswith("-:")]
    peak = "" if r.peak_memory_bytes is None else f", peak {r.peak_memory_kind} {r.peak_memory_bytes / 2**30:.2f} GiB"
    print(f"quantized {len(r.layers)} layers in {r.seconds:.1f} s on {r.calibration_tokens} calibration tokens{peak} "
          f"-> {r.out}" + (f" ({len(skips)} dynamic rule{'s leave' if len(skips) > 1 else ' leaves'} layers in "
                           "floating point: gptqkit inspect lists them)" if skips else ""))
    return 0


def cmd_finetune(a) -> int:
    from .finetune import finetune

    r = finetune(a.ckpt, a.out, dataset=a.dataset, nsamples=a.nsamples, seqlen=a.seqlen, steps=a.steps, lr=a.lr,
                 seed=a.seed, data_dir=a.data_dir, lora_rank=a.lora, head=not a.no_head, overwrite=a.overwrite,
                 progress=not a.quiet)
    k = max(1, len(r.losses) // 10)
    first, last = sum(r.losses[:k]) / k, sum(r.losses[-k:]) / k
    what = f"LoRA rank {a.lora} adapter" if a.lora else "checkpoint"
    print(f"fine-tuned {r.trained} values for {len(r.losses)} steps in {r.seconds:.1f} s: training loss "
          f"{first:.4f} -> {last:.4f} (mean of the first and last {k} steps) -> {what} {r.out}")
    return 0


def cmd_eval(a) -> int:
    from .data import eval_tokens
    from .evaluate import perplexity

    model, tok, quantized = load_any(a.model, a.device, a.kernel, a.trust_remote_code, a.allow_pickle,
                                     adapter=a.adapter)
    tokens = eval_tokens(tok, a.dataset, data_dir=a.data_dir, max_chars=a.max_chars)
    t = time.perf_counter()
    ppl = perplexity(model, tokens, seqlen=a.seqlen, max_windows=a.max_windows, device=a.device,
                     progress=not a.quiet)
    n = min(tokens.shape[1] // a.seqlen, a.max_windows or 1 << 30)
    print(f"{a.dataset} perplexity {ppl:.4f} ({n} windows of {a.seqlen} tokens, "
          f"{'quantized' if quantized else 'original'} model{' with adapter ' + a.adapter if a.adapter else ''}, "
          f"{time.perf_counter() - t:.1f} s)")
    return 0


def cmd_inspect(a) -> int:
    from .inspect import describe, inspect_checkpoint

    info = inspect_checkpoint(a.ckpt)
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(describe(info))
    return 0


def cmd_demo(a) -> int:
    """The main job on the bundled model: quantize SmolLM2-135M-Instruct, save, load, compare perplexity."""
    import tempfile

    from . import bundled
    from .checkpoint import load
    from .config import QuantConfig
    from .data import eval_tokens
    from .evaluate import perplexity
    from .pipeline import load_source, quantize

    src = bundled.smollm2()
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="gptqkit-demo-")) / "smollm2-gptq-4bit"
    cfg = QuantConfig(bits=4, group_size=64)
    print(f"quantizing {bundled.NAME} ({src}) to 4 bits, group 64, on {a.nsamples} x {a.seqlen} tokens of c4 ...")
    r = quantize(src, out, cfg, dataset="c4", nsamples=a.nsamples, seqlen=a.seqlen, data_dir=a.data_dir,
                 overwrite=True, progress=not a.quiet)
    print(f"quantized {len(r.layers)} layers in {r.seconds:.1f} s -> {out}")
    m, tok = load_source(src)
    tokens = eval_tokens(tok, "wikitext2", data_dir=a.data_dir, max_chars=a.max_chars)
    p0 = perplexity(m, tokens, seqlen=2048, progress=not a.quiet)
    q = load(out)
    p1 = perplexity(q, tokens, seqlen=2048, progress=not a.quiet)
    size0 = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    size1 = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"WikiText-2 test, first {a.max_chars} characters, {tokens.shape[1] // 2048} windows of 2048 tokens:")
    print(f"  original fp32   perplexity {p0:8.3f}   weights {size0 / 2**20:7.1f} MiB")
    print(f"  gptqkit 4-bit   perplexity {p1:8.3f}   weights {size1 / 2**20:7.1f} MiB (loaded from {out})")
    print("(SmolLM2's weights came from a Q4_1 GGUF: the original already sits on a 4-bit grid)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptqkit", description="GPTQ quantization for Hugging Face causal LMs")
    p.add_argument("--version", action="version", version=f"gptqkit {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save a GPTQ checkpoint")
    q.add_argument("model", help=f"model folder, hub id, or '{'SmolLM2-135M-Instruct'}' (bundled)")
    q.add_argument("out", help="output folder (must not exist or be empty, unless --overwrite)")
    q.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default 4)")
    q.add_argument("--group-size", type=int, default=128, help="input columns per group; -1 for one group")
    q.add_argument("--desc-act", action="store_true", help="act-order: quantize columns by decreasing activation")
    q.add_argument("--static-groups", action="store_true", help="fix groups before act-order permutes columns")
    q.add_argument("--natural-order", action="store_true",
                   help="without --desc-act, walk columns in their stored order (the paper's GPTQ) instead of "
                        "whole groups by activation importance (the default; same checkpoint layout)")
    q.add_argument("--asym", action="store_true", help="asymmetric zero points (default symmetric)")
    q.add_argument("--mse", action=argparse.BooleanOptionalAction, default=True,
                   help="search clipping ranges that minimise the error (default on; --no-mse: the full range)")
    q.add_argument("--no-true-sequential", action="store_true", help="solve all Linears of a block at once")
    q.add_argument("--damp", type=float, default=0.01, help="damp_percent (default 0.01)")
    q.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    q.add_argument("--lm-head", action="store_true",
                   help="quantize the output layer too (GPTQModel's and vLLM's lm_head: fewer bytes per decoded token, "
                        "some accuracy: +5%% WikiText-2 perplexity on SmolLM2 at 4 bits); a tied lm_head is untied. "
                        "transformers' from_pretrained and AutoGPTQ cannot load the result")
    q.add_argument("--first-blocks", type=int, default=None, metavar="K",
                   help="quantize only the first K decoder blocks; the rest (and lm_head) stay in floating point, "
                        "e.g. to fine-tune them on the quantized ones (gptqkit.finetune)")
    q.add_argument("--adapter", default=None, metavar="DIR",
                   help="merge this LoRA adapter (peft's format, e.g. trained with QLoRA) into the model before "
                        "quantizing it; needs the peft extra")
    q.add_argument("--format", choices=("gptq", "gptq_v2"), default="gptq", help="checkpoint_format to write")
    q.add_argument("--dataset", default="wikitext2", help="wikitext2, c4, c4-new, ptb, ptb-new, or a .txt/.jsonl")
    q.add_argument("--data-dir", default=None, help="local corpora folder (default: $GPTQKIT_DATA)")
    q.add_argument("--nsamples", type=int, default=128)
    q.add_argument("--seqlen", type=int, default=None, help="tokens per sample (default 2048, capped by the context)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch-size", type=int, default=1)
    q.add_argument("--device", default="cpu", help="compute device for one block at a time: cpu or cuda")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.work")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    q.add_argument("--save-dtype", default="auto", help="dtype of unquantized tensors: auto (fp16/bf16), float32")
    q.add_argument("--max-shard-size", default="5GB")
    q.add_argument("--trust-remote-code", action="store_true", help="run the model's own code (only if trusted)")
    q.add_argument("--allow-pickle", action="store_true",
                   help="read pickled *.bin source weights (weights_only=True); refused by default")
    q.set_defaults(fn=cmd_quantize)

    f = sub.add_parser("finetune", help="fine-tune a checkpoint's float tail, or LoRA adapters on its quantized "
                                        "layers")
    f.add_argument("ckpt", help="a GPTQ checkpoint (quantize --first-blocks K leaves a float tail to tune)")
    f.add_argument("out", help="the tuned checkpoint, or with --lora the adapter folder (peft's format)")
    f.add_argument("--lora", type=int, default=None, metavar="R",
                   help="train LoRA adapters of rank R on the quantized layers instead (needs the peft extra)")
    f.add_argument("--no-head", action="store_true", help="keep lm_head frozen (tail fine-tuning)")
    f.add_argument("--dataset", default="wikitext2", help="wikitext2, c4, ptb, or a .txt/.jsonl of training texts")
    f.add_argument("--data-dir", default=None, help="local corpora folder (default: $GPTQKIT_DATA)")
    f.add_argument("--nsamples", type=int, default=128)
    f.add_argument("--seqlen", type=int, default=512)
    f.add_argument("--steps", type=int, default=100)
    f.add_argument("--lr", type=float, default=1e-4)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    f.set_defaults(fn=cmd_finetune)

    e = sub.add_parser("eval", help="perplexity (GPTQ paper protocol) of a model or checkpoint")
    e.add_argument("model")
    e.add_argument("--dataset", default="wikitext2")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--max-chars", type=int, default=None, help="evaluate on the first N characters only")
    e.add_argument("--device", default="cpu")
    e.add_argument("--kernel", default="auto")
    e.add_argument("--adapter", default=None, metavar="DIR", help=ADAPTER_HELP)
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--allow-pickle", action="store_true")
    e.set_defaults(fn=cmd_eval)

    i = sub.add_parser("inspect", help="show a checkpoint's layout, config and quantized layers")
    i.add_argument("ckpt")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    g = sub.add_parser("generate", help="generate text from a checkpoint or model, streaming to the terminal")
    generate.add_generate_args(g)
    g.set_defaults(fn=generate.run_generate)

    b = sub.add_parser("bench", help="size, peak memory, prefill and decode speed, against a dense baseline")
    bench.add_bench_args(b)
    b.set_defaults(fn=bench.run_bench)

    d = sub.add_parser("demo", help="the main job on the bundled SmolLM2-135M-Instruct")
    d.add_argument("--out", default=None)
    d.add_argument("--data-dir", default=None)
    d.add_argument("--nsamples", type=int, default=64)
    d.add_argument("--seqlen", type=int, default=512)
    d.add_argument("--max-chars", type=int, default=120_000)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(levelname).1s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("gptqkit: interrupted; rerun with --resume to continue a quantization", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, RuntimeError,
            OSError, ImportError) as e:  # ImportError: an optional extra (peft) not installed; the message names it
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"gptqkit: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
