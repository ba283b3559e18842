"""The end-to-end job: read a source model safely, calibrate, quantize block by block, save the checkpoint.

The source model is only read. Output goes to a temporary sibling folder renamed into place at the end. Every run
keeps its finished blocks in a work folder (`OUT.work`, removed after success) so that `resume=True` continues an
interrupted run and produces the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .bench import peak_memory
from .checkpoint import WRITE_ERRNOS, WriteError, check_output_dir, save
from .config import QuantConfig
from .sequential import LayerLog, WorkDir, default_compute_dtype, find_blocks, quantize_model

log = logging.getLogger(__name__)

DEFAULT_SEQLEN = 2048

# A hub id is "name" or "org/name" (huggingface_hub's rules); anything else given as a model is a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[\w])?(?:/[A-Za-z0-9](?:[\w.-]{0,94}[\w])?)?")


class ModelError(ValueError):
    """A source model that cannot be quantized as given; the message names the problem and the fix."""


@dataclass
class QuantizeReport:
    out: Path
    config: QuantConfig
    layers: list[LayerLog] = field(default_factory=list)
    seconds: float = 0.0
    calibration_tokens: int = 0
    # The run's peak memory: allocated GPU memory with a CUDA device (the model stays in host memory, one block
    # goes to the GPU), else the process's peak resident set (VmHWM; it includes whatever the process held before).
    peak_memory_bytes: int | None = None
    peak_memory_kind: str = "RSS"


def _is_hub_id(s: str) -> bool:
    if not _HUB_ID.fullmatch(s) or "--" in s or ".." in s or s.endswith(".git"):
        return False
    # "models/llama" where ./models is a folder is a mistyped local path, not the hub repo models/llama.
    return "/" not in s or not Path(s.split("/")[0]).is_dir()


def load_source(model: str | os.PathLike, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                device: str = "cpu", allow_pickle: bool = False):
    """(model, tokenizer) from a local folder or a hub id. A local folder must hold a config and weights.

    Only a hub id ("name" or "org/name" that is not a local path) ever reaches the network. Weights are read from
    safetensors (or GGUF); pickled *.bin/*.pt weights only with allow_pickle=True, and then with weights_only=True.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(model).expanduser()
    kw: dict = {}
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"model path {p} is a file; give the model's folder (config.json + weights)")
        if not (p / "config.json").exists() and not list(p.glob("*.gguf")):
            raise ModelError(f"{p} has no config.json; give a Hugging Face model folder (config.json + weights)")
        weights = [f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf", ".pt")]
        if not weights:
            raise ModelError(f"{p} has a config.json but no weights (*.safetensors); the folder is incomplete")
        ggufs = [f for f in weights if f.suffix == ".gguf"]
        if ggufs and len(ggufs) == len(weights):
            kw["gguf_file"] = ggufs[0].name
        pickles = [f for f in weights if f.suffix in (".bin", ".pt")]
        if pickles and len(pickles) == len(weights) and not allow_pickle:
            raise ModelError(f"{p} holds only pickled weights ({pickles[0].name}); pickles can run code, so gptqkit "
                             "refuses them by default: pass --allow-pickle (read with weights_only=True) or convert "
                             "the model to safetensors")
        if (p / "quantize_config.json").exists() or "quantization_config" in json.loads(
                (p / "config.json").read_text() if (p / "config.json").exists() else "{}"):
            raise ModelError(f"{p} is already quantized; quantize the original floating-point model instead")
        model = str(p)
    elif not _is_hub_id(str(model)):
        raise ModelError(f"model path {model} does not exist; give an existing folder or a hub id like org/name")
    if not allow_pickle and "gguf_file" not in kw:
        kw["use_safetensors"] = True
    try:
        m = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype, trust_remote_code=trust_remote_code,
                                                 low_cpu_mem_usage=True, **kw)
        kw.pop("use_safetensors", None)
        tok = AutoTokenizer.from_pretrained(str(model), trust_remote_code=trust_remote_code, **kw)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"{model} needs custom code; pass --trust-remote-code if you trust its author") from e
        if "Unrecognized configuration class" in str(e):
            kind = re.search(r"(\w+Config)'>", str(e))
            raise ModelError(f"{model} is not a causal language model ({kind.group(1) if kind else 'its config'} has "
                             "no AutoModelForCausalLM class); gptqkit quantizes decoder-only LMs") from e
        raise
    except OSError as e:
        offline = [k for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(k, "").upper() in
                   {"1", "ON", "YES", "TRUE"}]
        why = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        if "safetensors" in why and not allow_pickle:
            where = "the repo has no safetensors weights: pass --allow-pickle to read its pickled ones"
        elif offline and not p.exists():
            where = f"give a local folder or unset {offline[0]}"
        else:
            where = "check the path, or that the hub is reachable for a hub id"
        raise ModelError(f"cannot load {model}: {why}; {where}") from e
    if getattr(m, "hf_quantizer", None) is not None:  # a GGUF file is dequantized on load; forget its quantizer
        m.hf_quantizer = None
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
    for name, prm in m.named_parameters():
        if not torch.isfinite(prm).all():
            raise ModelError(f"{model}: parameter {name} contains NaN or Inf; the source model is broken, fix or "
                             "re-download its weights")
    return m, tok


def fingerprint(model: nn.Module, samples: list[dict], cfg: QuantConfig, seed: int, batch_size: int = 1,
                compute_dtype: torch.dtype = torch.float32) -> dict:
    """What a resumed run must share with the interrupted one (hashes of the weights, data and settings).

    Everything that changes the bytes of a finished block is here: a block made with another batch size or compute
    dtype (bf16 on a GPU, fp32 on a CPU without bf16 units) would not match an uninterrupted run.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        # Name, shape, dtype, the first 1 MiB and a strided sample of the rest: cheap on a 70B model.
        flat = t.detach().reshape(-1)
        h.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
        step = max(1, flat.numel() >> 20)
        for part in (flat[: (1 << 20) // t.element_size()], flat[::step]):
            h.update(part.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    d = hashlib.sha256()
    for s in samples:
        d.update(s["input_ids"].numpy().tobytes())
    settings = {k: v for k, v in cfg.to_dict().items() if k != "meta"}
    settings.update(mse=cfg.mse, method=cfg.quant_method, order=cfg.uses_group_aware_order, batch_size=batch_size,
                    compute_dtype=str(compute_dtype))
    return {"model": h.hexdigest(), "calibration data": d.hexdigest(), "seed": seed,
            "settings": json.dumps(settings, sort_keys=True)}


def _dataset_name(dataset) -> str:
    """How the calibration set is recorded in the checkpoint: a name, a file name (never a full path), or a kind."""
    if isinstance(dataset, (str, os.PathLike)):
        p = Path(dataset)
        return p.name if p.suffix or len(p.parts) > 1 else str(dataset)
    return type(dataset).__name__


def quantize(model: str | os.PathLike, out: str | os.PathLike, cfg: QuantConfig = QuantConfig(), *,
             dataset="wikitext2", nsamples: int = 128, seqlen: int | None = None, seed: int = 0, data_dir=None,
             device: str = "cpu", batch_size: int = 1, resume: bool = False, overwrite: bool = False,
             save_dtype: str | None = "auto", max_shard_size: str | int = "5GB", trust_remote_code: bool = False,
             allow_pickle: bool = False, progress: bool = True, first_blocks: int | None = None,
             adapter: str | os.PathLike | None = None) -> QuantizeReport:
    """Quantize a Hugging Face causal LM with GPTQ and write the standard checkpoint to `out`.

    `cfg` is not modified; the report's config carries the layers left unquantized (`dynamic`).
    first_blocks: quantize only the first K decoder blocks; the later ones (and lm_head, unless cfg.lm_head) stay in
    floating point, recorded as one "-:" `dynamic` rule that gptqkit, GPTQModel and vLLM read, e.g. to fine-tune
    them afterwards (gptqkit.finetune). adapter: a LoRA adapter folder (peft's format) merged into the model before
    it is calibrated, the QLoRA -> merge -> GPTQ flow (gptqkit.finetune.merge_adapter); the source is not modified.

    >>> quantize("path/to/llama", "llama-gptq", QuantConfig(bits=4, group_size=128), dataset="c4")  # doctest: +SKIP
    """
    from .data import calibration_samples

    t0 = time.perf_counter()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the report's peak is this run's
    for arg, v in (("nsamples", nsamples), ("seqlen", 1 if seqlen is None else seqlen), ("batch_size", batch_size),
                   ("first_blocks", 1 if first_blocks is None else first_blocks)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg}={v!r} is invalid; use a positive integer (--{arg.replace('_', '-')})")
    cfg = cfg.replace()  # quantize_model records skipped layers in cfg.dynamic; keep the caller's object as given
    out = Path(out).expanduser()
    source = Path(model).expanduser() if Path(model).expanduser().exists() else None
    check_output_dir(out, source, overwrite)
    if adapter is not None:
        from .finetune import adapter_folder, merge_adapter

        adapter = adapter_folder(adapter)  # a missing or incomplete adapter fails before the model is read
    m, tok = load_source(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if adapter is not None:
        m = merge_adapter(m, adapter)
    prefix, blocks = find_blocks(m)  # an unsupported architecture fails here, before any data is read
    if first_blocks is not None:
        cfg = cfg.replace(dynamic={**(cfg.dynamic or {}), **first_blocks_rule(prefix, len(blocks), first_blocks)})
    compute_dtype = default_compute_dtype(torch.device(device), next(blocks.parameters()).dtype)
    max_len = getattr(m.config, "max_position_embeddings", None) or getattr(m.config, "n_positions", None)
    if seqlen is None:  # the paper's 2048, capped by the model's context (GPT-2: 1024)
        seqlen = min(DEFAULT_SEQLEN, max_len or DEFAULT_SEQLEN)
    if max_len and seqlen > max_len:
        raise ValueError(f"seqlen={seqlen} exceeds the model's context of {max_len} tokens; use --seqlen {max_len} "
                         "or less")
    samples = calibration_samples(tok, dataset, nsamples=nsamples, seqlen=seqlen, seed=seed, data_dir=data_dir)
    # Always keep a work folder: any run that dies can be resumed, not only those started with resume=True.
    work_path = out.parent / f"{out.name}.work"
    if work_path.is_dir() and not (work_path / "manifest.json").exists() and not any(work_path.glob("block_*")):
        shutil.rmtree(work_path)  # debris of a run killed while creating it: nothing to resume
    try:
        work = WorkDir(work_path, fingerprint(m, samples, cfg, seed, batch_size, compute_dtype), resume)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        if not any(work_path.glob("block_*.json")):
            shutil.rmtree(work_path, ignore_errors=True)
        raise _write_error(e, work_path) from e
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    try:
        logs = quantize_model(m, samples, cfg, device=device, batch_size=batch_size, pad_id=pad, work_dir=work,
                              progress=progress, compute_dtype=compute_dtype)
    except BaseException as e:
        if not any(work.path.glob("block_*.json")):
            shutil.rmtree(work.path, ignore_errors=True)  # nothing finished: leave nothing behind
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise _write_error(e, work.path) from e
        raise
    meta = {"damp_percent": cfg.damp_percent, "calibration": {
        "dataset": _dataset_name(dataset), "nsamples": len(samples), "seqlen": seqlen, "seed": seed}}
    try:
        save(m, out, cfg, tok, max_shard_size=max_shard_size, dtype=save_dtype, source=source, overwrite=overwrite,
             meta=meta)
    except WriteError as e:
        raise WriteError(f"{e}; the quantized blocks are kept in {work.path}: rerun with --resume once it is fixed") \
            from e
    shutil.rmtree(work.path, ignore_errors=True)
    peak, kind = peak_memory(torch.device(device))
    return QuantizeReport(out=out, config=cfg, layers=logs, seconds=time.perf_counter() - t0,
                          calibration_tokens=int(sum(int(s["attention_mask"].sum()) for s in samples)),
                          peak_memory_bytes=peak, peak_memory_kind=kind)


def first_blocks_rule(prefix: str, n: int, k: int) -> dict[str, dict]:
    """The `dynamic` rule that leaves blocks k .. n-1 of the ModuleList `prefix` (e.g. "model.layers") in floating
    point: {"-:^model\\.layers\\.(k|k+1|...)\\.": {}}; none where k == n."""
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"first_blocks={k!r} is invalid: the model has {n} decoder blocks; give 1 to {n} "
                         "(--first-blocks)")
    if k == n:
        return {}
    return {f"-:^{re.escape(prefix)}\\.({'|'.join(str(i) for i in range(k, n))})\\.": {}}


def _write_error(e: OSError, work: Path) -> WriteError:
    return WriteError(f"cannot write the work folder {work}: {e.strerror or e}; free disk space or fix the folder's "
                      "permissions, then rerun with --resume")
