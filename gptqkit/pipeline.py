"""The end-to-end job: read a source model safely, calibrate, quantize block by block, save the checkpoint.

The source model is only read. Output goes to a temporary sibling folder renamed into place at the end; with a
work folder (`OUT.work`), every finished block is kept so that `resume=True` continues an interrupted run and
produces the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import check_output_dir, save
from .config import QuantConfig
from .sequential import LayerLog, WorkDir, find_blocks, quantize_model

log = logging.getLogger(__name__)


class ModelError(ValueError):
    pass


@dataclass
class QuantizeReport:
    out: Path
    config: QuantConfig
    layers: list[LayerLog] = field(default_factory=list)
    seconds: float = 0.0
    calibration_tokens: int = 0


def load_source(model: str | os.PathLike, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                device: str = "cpu"):
    """(model, tokenizer) from a local folder or a hub id. A local folder must hold a config and weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(model)
    kw: dict = {}
    if p.exists():
        if not (p / "config.json").exists() and not list(p.glob("*.gguf")):
            raise ModelError(f"{p} has no config.json; give a Hugging Face model folder (config.json + weights)")
        weights = [f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf", ".pt")]
        if not weights:
            raise ModelError(f"{p} has a config.json but no weights (*.safetensors); the folder is incomplete")
        ggufs = [f for f in weights if f.suffix == ".gguf"]
        if ggufs and len(ggufs) == len(weights):
            kw["gguf_file"] = ggufs[0].name
        if (p / "quantize_config.json").exists() or "quantization_config" in json.loads(
                (p / "config.json").read_text() if (p / "config.json").exists() else "{}"):
            raise ModelError(f"{p} is already quantized; quantize the original floating-point model instead")
    elif str(model).count("/") > 1 or str(model).startswith((".", "/", "~")):
        raise ModelError(f"model path {model} does not exist; give an existing folder or a hub id like org/name")
    try:
        m = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype, trust_remote_code=trust_remote_code,
                                                 low_cpu_mem_usage=True, **kw)
        tok = AutoTokenizer.from_pretrained(str(model), trust_remote_code=trust_remote_code, **kw)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"{model} needs custom code; pass --trust-remote-code if you trust its author") from e
        raise
    except OSError as e:
        raise ModelError(f"cannot load {model}: {str(e).splitlines()[0]}; check the path, or that the hub is "
                         "reachable for a hub id") from e
    if getattr(m, "hf_quantizer", None) is not None:  # a GGUF file is dequantized on load; forget its quantizer
        m.hf_quantizer = None
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
    for name, prm in m.named_parameters():
        if not torch.isfinite(prm).all():
            raise ModelError(f"{model}: parameter {name} contains NaN or Inf; the source model is broken")
    return m, tok


def fingerprint(model: nn.Module, samples: list[dict], cfg: QuantConfig, seed: int, source: str) -> dict:
    """What a resumed run must share with the interrupted one (hashes of the weights, data and settings)."""
    h = hashlib.sha256()
    _, blocks = find_blocks(model)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()[:1 << 20])
    d = hashlib.sha256()
    for s in samples:
        d.update(s["input_ids"].numpy().tobytes())
    return {"model": h.hexdigest(), "calibration data": d.hexdigest(), "seed": seed,
            "settings": json.dumps({k: v for k, v in cfg.to_dict().items() if k != "meta"}, sort_keys=True)
            + f" mse={cfg.mse} method={cfg.quant_method}", "source": str(source)}


def quantize(model: str | os.PathLike, out: str | os.PathLike, cfg: QuantConfig = QuantConfig(), *,
             dataset="wikitext2", nsamples: int = 128, seqlen: int = 2048, seed: int = 0, data_dir=None,
             device: str = "cpu", batch_size: int = 1, resume: bool = False, overwrite: bool = False,
             save_dtype: str | None = "auto", max_shard_size: str | int = "5GB", trust_remote_code: bool = False,
             progress: bool = True) -> QuantizeReport:
    """Quantize a Hugging Face causal LM with GPTQ and write the standard checkpoint to `out`.

    >>> quantize("path/to/llama", "llama-gptq", QuantConfig(bits=4, group_size=128), dataset="c4")  # doctest: +SKIP
    """
    from .data import calibration_samples

    t0 = time.perf_counter()
    out = Path(out)
    source = Path(model) if Path(model).exists() else None
    check_output_dir(out, source, overwrite)
    m, tok = load_source(model, trust_remote_code=trust_remote_code)
    max_len = getattr(m.config, "max_position_embeddings", None) or getattr(m.config, "n_positions", None)
    if seqlen < 1:
        raise ValueError(f"seqlen={seqlen} is invalid; use a positive number of tokens such as 2048")
    if max_len and seqlen > max_len:
        raise ValueError(f"seqlen={seqlen} exceeds the model's context of {max_len} tokens; use --seqlen {max_len} "
                         "or less")
    samples = calibration_samples(tok, dataset, nsamples=nsamples, seqlen=seqlen, seed=seed, data_dir=data_dir)
    # Always keep a work folder: any run that dies can be resumed, not only those started with resume=True.
    work = WorkDir(out.parent / f"{out.name}.work", fingerprint(m, samples, cfg, seed, str(model)), resume)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    logs = quantize_model(m, samples, cfg, device=device, batch_size=batch_size, pad_id=pad, work_dir=work,
                          progress=progress)
    meta = {"damp_percent": cfg.damp_percent, "calibration": {
        "dataset": dataset if isinstance(dataset, str) else type(dataset).__name__, "nsamples": len(samples),
        "seqlen": seqlen, "seed": seed}}
    save(m, out, cfg, tok, max_shard_size=max_shard_size, dtype=save_dtype, source=source, overwrite=overwrite,
         meta=meta)
    shutil.rmtree(work.path, ignore_errors=True)
    return QuantizeReport(out=out, config=cfg, layers=logs, seconds=time.perf_counter() - t0,
                          calibration_tokens=int(sum(int(s["attention_mask"].sum()) for s in samples)))
