"""Save and load the standard GPTQ checkpoint (see FORMAT.md in the project's shared notes).

Layout written: config.json (with quantization_config), quantize_config.json (the same dict), safetensors shards
(model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json), generation_config.json and
the tokenizer files. Quantized Linears contribute qweight/qzeros/scales/g_idx[/bias]; everything else is stored in
floating point. Writing goes to a temporary sibling folder that is renamed into place at the end.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import pickle
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch import nn

from . import attention, fused, kernels, memory
from .kernels import cpu_avx2, cpu_avx2_q8
from .config import ConfigError, QuantConfig
from .qlinear import QuantLinear
from .sequential import input_groups, is_linear

log = logging.getLogger(__name__)

CONFIG_FILES = ("quantize_config.json", "quant_config.json", "config.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and what is wrong."""


class WriteError(OSError):
    """The disk or the permissions stopped a write; the message names the folder and the fix. Nothing was lost."""


# Errors that mean "the disk or the permissions", reported as one WriteError line that names the folder.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG)


def _same_or_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def check_output_dir(out: str | os.PathLike, source: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Refuse an output folder that would destroy something: the source model, or a non-empty folder."""
    out = Path(out).expanduser()
    if source is not None and Path(source).exists() and _same_or_inside(out, Path(source)):
        raise FileExistsError(f"output {out} is the source model folder or inside it; choose another output folder "
                              "(gptqkit never writes into the model it reads)")
    if source is not None and Path(source).exists() and _same_or_inside(Path(source), out):
        raise FileExistsError(f"output {out} contains the source model {source}; choose another output folder "
                              "(replacing it would delete the model being read)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is a file; choose a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output {out} exists and is not empty; pass --overwrite to replace it or choose "
                              "another folder")
    return out


def _resolve_dtype(model: nn.Module, dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "keep":
        return None
    if dtype == "auto":
        # Ecosystem loaders expect half precision next to GPTQ tensors; keep bf16 sources bf16 (fp16 may overflow).
        # `dtype` first: transformers 5 warns on every read of the old `torch_dtype` name
        src = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
        return torch.bfloat16 if str(src).endswith("bfloat16") else torch.float16
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def state_dict_for_save(model: nn.Module, dtype: torch.dtype | None, store_tied: bool = True
                        ) -> dict[str, torch.Tensor]:
    """The model's persistent tensors. A tied duplicate (lm_head sharing the embedding) is stored as its own copy
    when store_tied: AutoGPTQ 0.7.1 ties before loading and then reads lm_head only from lm_head.weight (without
    it, lm_head stays zero); transformers and gptqkit re-tie on load. store_tied=False stores it once, as the
    embedding (the transformers convention, smaller by vocab x hidden)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    qbuffers = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, QuantLinear)
                for b in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            if not store_tied:
                continue
            t = t.clone()  # safetensors refuses two names for one storage
        seen.add(key)
        if dtype is not None and t.is_floating_point() and name not in qbuffers:
            t = t.to(dtype)
        out[name] = t.detach().contiguous().cpu()
    return out


def save(model: nn.Module, out: str | os.PathLike, cfg: QuantConfig, tokenizer=None, *,
         max_shard_size: str | int = "5GB", dtype: str | torch.dtype | None = "auto",
         source: str | os.PathLike | None = None, overwrite: bool = False,
         meta: dict[str, Any] | None = None, store_tied: bool = True) -> Path:
    """Write `model` (with QuantLinear modules) as a GPTQ checkpoint folder, atomically.

    >>> save(qmodel, "smollm2-gptq-4bit", QuantConfig(bits=4, group_size=64), tokenizer)  # doctest: +SKIP
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out = check_output_dir(out, source, overwrite)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise _write_error(e, out) from e
    try:
        torch_dtype = _resolve_dtype(model, dtype)
        sd = state_dict_for_save(model, torch_dtype, store_tied)
        split = split_torch_state_dict_into_shards(sd, max_shard_size=max_shard_size,
                                                   filename_pattern="model{suffix}.safetensors")
        for fname, names in split.filename_to_tensors.items():
            save_file({n: sd[n] for n in names}, str(tmp / fname), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        qdict = cfg.to_dict(meta)
        if not cfg.sym and cfg.checkpoint_format == "gptq":
            # GPTQModel refuses asymmetric v1 files from quantizers it does not know (old AutoGPTQ files could
            # wrap a zero point of 0; gptqkit never writes one), while AutoGPTQ 0.7.1 cannot read gptq_v2.
            log.warning("asymmetric checkpoint in the gptq (v1) format: AutoGPTQ and transformers load it, GPTQModel "
                        "refuses it; quantize with --format gptq_v2 for GPTQModel")
        conf = model.config.to_dict()
        conf.pop("_name_or_path", None)  # the source's path: run-specific, and the same inputs must give the same bytes
        conf.pop("quantization_config", None)
        conf["quantization_config"] = qdict
        rope = conf.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in conf:
            # transformers 4 (AutoGPTQ 0.7.1 runs on 4.38) reads rope_theta only at the top level and silently
            # falls back to 10000 without it; transformers 5 reads rope_parameters and ignores this copy.
            conf["rope_theta"] = rope["rope_theta"]
        if torch_dtype is not None:
            conf["torch_dtype"] = conf["dtype"] = str(torch_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(qdict, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # safetensors creates its files 0600; give every file the mode open() gave config.json (the umask's).
        mode = (tmp / "config.json").stat().st_mode & 0o777
        for f in tmp.iterdir():
            os.chmod(f, mode)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        replace_folder(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise _write_error(e, out) from e
        raise
    try:
        _fsync_dir(out.parent)  # make the rename durable; the checkpoint is complete either way
    except OSError:
        pass
    return out


def replace_folder(tmp: Path, out: Path) -> None:
    """Rename the finished folder `tmp` onto `out`, a sibling. An existing `out` is moved aside first and put back
    if the rename fails, so at every moment one complete folder is there."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_error(e: OSError, out: Path) -> WriteError:
    return WriteError(f"cannot write the checkpoint {out}: {e.strerror or e}; free disk space or fix the "
                      f"permissions of {out.parent} (nothing was changed: the source and any old {out.name} are "
                      "intact)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_partials(out: Path) -> None:
    """Remove `.OUT.partial-PID` folders left by a save that was killed (its process is gone)."""
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        pid = p.name.removeprefix(f".{out.name}.partial-")
        if pid == p.name or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing %s, left by an interrupted save", p)
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


# ---------------------------------------------------------------------------------------------------- loading


def read_quant_config(path: str | os.PathLike) -> tuple[QuantConfig, str]:
    """(QuantConfig, the file it came from), looking where loaders look: quantize_config.json, quant_config.json,
    then config.json["quantization_config"]."""
    path = Path(path)
    for name in CONFIG_FILES:
        f = path / name
        if not f.exists():
            continue
        d = _read_json(f)
        if name == "config.json":
            d = d.get("quantization_config")
            if d is None:
                break
        if not isinstance(d, dict):
            raise CheckpointError(f"{f} does not hold a quantization config (a JSON object with bits, group_size, "
                                  "...); the file is corrupt")
        try:
            return QuantConfig.from_dict(d, source=str(f)), str(f)
        except (ConfigError, TypeError) as e:
            raise CheckpointError(str(e)) from e
    raise CheckpointError(f"{path} is not a GPTQ checkpoint: no quantize_config.json, quant_config.json or "
                          "quantization_config in config.json; quantize the model first with `gptqkit quantize`")


def _read_json(f: Path) -> Any:
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({e}); the file is truncated or corrupt, download or copy it "
                              "again") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{f} holds a JSON {type(d).__name__}, not an object; the file is corrupt")
    return d


def weight_files(path: Path, cfg_dict: dict | None = None, allow_pickle: bool = False) -> list[Path]:
    """The checkpoint's weight files, checking that every shard an index names exists."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map; the index is corrupt, download or copy it again")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}; the download or "
                                  "copy is incomplete, fetch the missing files")
        return [path / n for n in names]
    base = (cfg_dict or {}).get("model_file_base_name")
    if base and (path / f"{base}.safetensors").exists():
        return [path / f"{base}.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    if bins:
        if not allow_pickle:
            raise CheckpointError(f"{path} holds only pickled weights ({bins[0].name}); pickles can run code, so "
                                  "gptqkit refuses them by default: pass --allow-pickle (loaded with weights_only=True)"
                                  " or convert the checkpoint to safetensors")
        return bins
    raise CheckpointError(f"{path} has no weight files (*.safetensors); the checkpoint is incomplete")


# The safetensors header's dtype names (format facts: 8-byte little-endian header length, JSON header, then the data;
# each tensor's "data_offsets" count from the end of the header).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _safetensors_header(fh) -> tuple[int, dict]:
    """(header length n, header) of an open safetensors file; its tensors' data_offsets count from byte 8 + n."""
    n = int.from_bytes(fh.read(8), "little")
    return n, json.loads(fh.read(n))


def read_safetensors(f: Path, streamed: set[str] = frozenset(), copy: bool = True) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors. Decode reads the quantized layers' and the `streamed` ones (an untied dense
    lm_head) whole every token, so they are read into memory of their own on huge pages (gptqkit.memory): the
    quantized layers' into one mapping, since QuantLinear keeps them as they are. The rest are what
    safetensors.torch.load_file gives, views of the memory-mapped file: an embedding then costs only the pages of the
    rows looked up, and a tensor cast at load is read once. safetensors checks the header against the file's size.
    copy=False: all of them views of the file, as load_file gives (see load())."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not copy:
        return load_file(str(f))

    with safe_open(str(f), "pt") as st, open(f, "rb") as fh:  # safe_open raises for a truncated or corrupt file
        names = list(st.keys())
        n, header = _safetensors_header(fh)
        layers = {k[: -len(".qweight")] for k in names if k.endswith(".qweight")}
        kept = [k for k in names if k.rpartition(".")[0] in layers]
        read = [k for k in names if k in streamed and k not in kept]
        if sys.byteorder != "little" or any(header[k]["dtype"] not in SAFETENSORS_DTYPES for k in kept + read):
            kept = read = []  # safetensors swaps bytes and knows every dtype
        sd = {k: st.get_tensor(k) for k in names if k not in kept and k not in read}

        def spec(k: str) -> tuple[list[int], torch.dtype]:
            return header[k]["shape"], SAFETENSORS_DTYPES[header[k]["dtype"]]

        sd.update(zip(kept, memory.empty_many([spec(k) for k in kept])))
        sd.update((k, memory.empty(*spec(k))) for k in read)
        for k in sorted(kept + read, key=lambda k: header[k]["data_offsets"][0]):  # the file's order
            b0, b1 = header[k]["data_offsets"]
            if b1 > b0:
                fh.seek(8 + n + b0)
                got = fh.readinto((ctypes.c_char * (b1 - b0)).from_address(sd[k].data_ptr()))
                if got != b1 - b0:
                    raise ValueError(f"{k} ends {b1 - b0 - got} bytes past the end of the file")
    return {k: sd[k] for k in names}


def safetensors_offset(files: list[Path], name: str) -> tuple[Path, int] | None:
    """(file, byte offset in it) of tensor `name`'s data among a checkpoint's safetensors files; None where none
    holds it."""
    for f in files:
        if f.suffix != ".safetensors":
            continue
        with open(f, "rb") as fh:
            n, header = _safetensors_header(fh)
        entry = header.get(name)
        if entry is not None:
            return f, 8 + n + entry["data_offsets"][0]
    return None


def read_tensors(files: list[Path], streamed: set[str] = frozenset(), copy: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's weight files; safetensors ones as read_safetensors gives them."""
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                part = read_safetensors(f, streamed, copy)
            else:
                part = torch.load(f, map_location="cpu", weights_only=True)  # never unpickles code
        except pickle.UnpicklingError as e:
            what = re.search(r"GLOBAL (\S+)", str(e))
            raise CheckpointError(f"{f} holds more than tensors{f' (it imports {what.group(1)})' if what else ''}; "
                                  "gptqkit never runs code from a checkpoint, even with --allow-pickle: convert it "
                                  "to safetensors with a tool you trust") from e
        except Exception as e:  # safetensors raises its own error types for truncated headers and data
            why = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(f"{f} cannot be read ({type(e).__name__}: {why}); the file is truncated or "
                                  "corrupt, download or copy it again") from e
        if not isinstance(part, dict) or not all(isinstance(t, torch.Tensor) for t in part.values()):
            raise CheckpointError(f"{f} does not hold a state dict of tensors; convert the checkpoint to "
                                  "safetensors")
        sd.update(part)
    return sd


def _module_config(cfg: QuantConfig, name: str) -> QuantConfig:
    mc = cfg.for_module(name)
    return mc if mc is not None else cfg


def _quant_linear_for(name: str, module: nn.Module, sd: dict, cfg: QuantConfig, file_hint: str,
                      infer_group: bool = False) -> QuantLinear:
    """A QuantLinear on the meta device sized like `module`, after checking the checkpoint tensors' shapes.

    infer_group: the config names no group size (old GPTQ-for-LLaMa / AutoGPTQ files), so take it from the
    tensors: G = scales.shape[0] groups over K inputs."""
    w = module.weight
    N, K = (w.shape[1], w.shape[0]) if type(module).__name__ == "Conv1D" else (w.shape[0], w.shape[1])
    mc = _module_config(cfg, name)
    bits = mc.bits
    qweight, scales = sd[f"{name}.qweight"], sd.get(f"{name}.scales")
    if scales is None or f"{name}.qzeros" not in sd:
        raise CheckpointError(f"{file_hint}: {name} has qweight but no scales/qzeros; the checkpoint is incomplete")
    if tuple(qweight.shape) != (K * bits // 32, N):
        raise CheckpointError(f"{file_hint}: {name}.qweight has shape {tuple(qweight.shape)} but a {K}->{N} layer at "
                              f"{bits} bits needs {(K * bits // 32, N)}; the config's bits do not match the tensors")
    G = scales.shape[0]
    if infer_group:
        if G > 1 and K % G:
            raise CheckpointError(f"{file_hint}: {name}.scales has {G} groups, which do not divide its {K} inputs, "
                                  "and the config has no group_size; add the group size used to quantize to it")
        mc = mc.replace(group_size=-1 if G == 1 else K // G)
    group_size = -1 if mc.group_size == -1 and G == 1 else mc.group_size
    expect_g = 1 if group_size == -1 else -(-K // group_size)
    if G != expect_g:
        inferred = K // G if K % G == 0 else None
        raise CheckpointError(
            f"{file_hint}: {name}.scales has {G} groups but group_size={mc.group_size} over {K} inputs gives "
            f"{expect_g}; the config does not match the tensors"
            + (f" (the tensors suggest group_size={inferred})" if inferred else ""))
    if tuple(scales.shape) != (G, N) or tuple(sd[f"{name}.qzeros"].shape) != (G, N * bits // 32):
        raise CheckpointError(f"{file_hint}: {name} scales/qzeros shapes {tuple(scales.shape)}/"
                              f"{tuple(sd[f'{name}.qzeros'].shape)} disagree with a {K}->{N} layer at {bits} bits")
    bias = f"{name}.bias" in sd
    with torch.device("meta"):
        return QuantLinear(K, N, bits, group_size, bias, cfg.checkpoint_format)


class _EmptyOnMeta(TorchFunctionMode):
    """torch.empty makes meta tensors: how nn.Linear and nn.Embedding make their weights, which init_empty_weights
    then moves to meta. Made on the CPU first, they are never touched, but they are malloc'd and freed one by one
    among the skeleton's small allocations, which leaves glibc's heap with holes as large as the model in fp32 (303 MiB
    for SmolLM2-135M); a later prompt's activations land in those untouched pages, so the process's resident memory
    crept up with each prefill, 12-15 MiB on SmolLM2 over three. Buffers computed from other factories (rotary
    inv_freq from arange) stay on the CPU, as init_empty_weights leaves them; load() builds a model with a buffer
    that torch.empty made (left on meta here) again without this mode."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
         kernel: str = "auto", trust_remote_code: bool = False, allow_pickle: bool = False,
         dense_dtype: torch.dtype | str | None = None) -> nn.Module:
    """Load a GPTQ checkpoint (gptqkit's or another tool's) into a transformers model with QuantLinear layers.

    The skeleton is built without allocating weights; Linears that have `qweight` in the checkpoint become
    QuantLinear and take the checkpoint tensors as they are. dtype: of the unquantized tensors and activations
    (default float32 on CPU, float16 on CUDA). dense_dtype: storage dtype of the input embedding and lm_head when
    it should differ from dtype (gptqkit.dense): e.g. dtype float32 with dense_dtype bfloat16 on a CPU without
    native bf16 computes in fp32 and keeps those two matrices at 2 bytes per weight. On CPU a model that runs SDPA
    decodes one token's attention in C (gptqkit.attention; every other call stays SDPA;
    `model.set_attn_implementation("sdpa")` undoes it); with the avx2 kernels its RMSNorms, its gated MLPs'
    silu(gate) * up and its rotary attention's one-token step (rotation, cache write, attention) also run decode
    rows in C (gptqkit.fused).

    >>> model = load("smollm2-gptq-4bit")  # doctest: +SKIP
    >>> model(torch.tensor([[1, 2, 3]])).logits.shape  # doctest: +SKIP
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give the folder written by `gptqkit quantize`")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json; this is not a transformers model folder")
    cfg, cfg_file = read_quant_config(path)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise CheckpointError(f"{path} needs custom code to build the model; pass --trust-remote-code only if "
                                  "you trust its author") from e
        raise
    if hasattr(hf_config, "quantization_config"):
        # transformers would route this config to its own GPTQ integration; gptqkit builds the layers itself.
        del hf_config.quantization_config
    raw = _read_json(Path(cfg_file))
    raw = raw.get("quantization_config", raw) if Path(cfg_file).name == "config.json" else raw
    files = weight_files(path, raw, allow_pickle)
    with init_empty_weights(), _EmptyOnMeta():
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code, dtype=dtype)
    if any(b.is_meta for b in model.buffers()):  # a buffer made by torch.empty, then filled: built as before
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code, dtype=dtype)
    head = model.get_output_embeddings()
    untied = type(head) is nn.Linear and not getattr(hf_config, "tie_word_embeddings", False)
    # On CPU, read into memory only what fits: pages of a memory-mapped file can be dropped and read again under
    # memory pressure, anonymous memory cannot (without swap), so a model near the machine's size keeps the file's
    # pages. (Other devices copy the weights over from the file's pages, as before.)
    size, free = sum(f.stat().st_size for f in files), memory.available()
    copy = device.type == "cpu" and (free is None or size <= 0.8 * free)
    if device.type == "cpu" and not copy:
        log.info("%s: %.1f GiB of weight files against %.1f GiB of available memory: the weights stay views of the "
                 "memory-mapped files (decode reads them ~9%% slower)", path, size / 2**30, free / 2**30)
    streamed = {f"{n}.weight" for n, m in model.named_modules() if m is head} if untied else set()
    sd = read_tensors(files, streamed, copy)
    hint = files[0].name if len(files) == 1 else f"{path.name}/*.safetensors"
    infer_group = "group_size" not in raw
    if infer_group:
        log.warning("%s has no 'group_size'; taking each layer's group size from its scales", cfg_file)

    qnames = [k[: -len(".qweight")] for k in sd if k.endswith(".qweight")]
    if not qnames:
        raise CheckpointError(f"{hint} has no qweight tensors although {cfg_file} declares GPTQ; the weights are not "
                              "quantized or belong to another model")
    for name in qnames:
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"{hint}: {name}.qweight names a module that {type(model).__name__} does not have; "
                                  "the checkpoint belongs to another architecture") from e
        if not is_linear(module):
            raise CheckpointError(f"{hint}: {name} holds qweight but is a {type(module).__name__}, not a Linear")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                _quant_linear_for(name, module, sd, cfg, hint, infer_group))

    head = model.get_output_embeddings()
    if isinstance(head, QuantLinear) and getattr(model.config, "tie_word_embeddings", False):
        # A quantized lm_head cannot share the embedding's weight; tying would hang a stray `weight` on it.
        log.info("%s: lm_head is quantized, so it is not tied to the input embedding", hint)
        model.config.tie_word_embeddings = False
    qbuf = {f"{n}.{b}" for n in qnames for b in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    if dense_dtype is not None:
        from .dense import dense_names, store_dense

        dense_dtype = getattr(torch, dense_dtype) if isinstance(dense_dtype, str) else dense_dtype
        stored = dense_names(model)  # left as read: store_dense casts them once, straight into their storage
    else:
        stored = set()
    for k, t in sd.items():
        if t.is_floating_point() and k not in qbuf and k not in stored:
            sd[k] = t.to(dtype)
    for n in qnames:
        if f"{n}.g_idx" not in sd:  # very old checkpoints omit g_idx: groups are consecutive then
            ql = model.get_submodule(n)
            g = ql.in_features if ql.group_size == -1 else ql.group_size
            sd[f"{n}.g_idx"] = (torch.arange(ql.in_features) // g).to(torch.int32)
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{hint} has tensors the model does not: {', '.join(result.unexpected_keys[:5])}"
                              f"{' ...' if len(result.unexpected_keys) > 5 else ''}; it belongs to another model")
    model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{hint} lacks tensors the model needs: {', '.join(still_meta[:5])}"
                              f"{' ...' if len(still_meta) > 5 else ''}; the checkpoint is incomplete")
    model.to(device)
    model.eval()
    if dense_dtype is not None:
        store_dense(model, dense_dtype, compute=dtype, from_file=True)
        _rows_from_file(model, sd, files)
    use_kernels(model, device, kernel)
    if device.type == "cpu":
        attention.use(model)
        fused.use_layers(model)  # blocks whose swapped parts (use_kernels) and attention allow one C call each
        fused.use_stack(model)  # and a stack of such blocks: one C call per token
    return model


def _rows_from_file(model: nn.Module, sd: dict[str, torch.Tensor], files: list[Path]) -> None:
    """An input embedding that kept the checkpoint's own tensor (gptqkit.dense: untied and 16-bit) looks its rows up
    in the file from now on, instead of in its memory-mapped pages."""
    from .dense import StoredEmbedding

    emb = model.get_input_embeddings()
    name = next((f"{n}.weight" for n, m in model.named_modules() if m is emb), None)
    if (not isinstance(emb, StoredEmbedding) or name not in sd or emb.weight.device.type != "cpu"
            or emb.weight.data_ptr() != sd[name].data_ptr() or sys.byteorder != "little"):
        return
    where = safetensors_offset(files, name)
    if where is not None:
        emb.read_rows_from(*where)
        log.info("input embedding: rows are read from %s as they are looked up", where[0].name)


def use_kernels(model: nn.Module, device: str | torch.device, kernel: str = "auto") -> Counter:
    """Pick a kernel for every QuantLinear (see gptqkit.kernels), log which and why, and prepare them."""
    chosen: Counter = Counter()
    reasons: Counter = Counter()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            k, why = kernels.select(m, device, kernel)
            m.use_kernel(k)
            chosen[k.name] += 1
            reasons.update(why)
    log.info("kernels: %s", ", ".join(f"{k} for {n} layers" for k, n in chosen.items()))
    for r, n in reasons.items():
        log.info("kernel fallback on %d layers: %s", n, r)
    if chosen.keys() & {cpu_avx2.name, cpu_avx2_q8.name}:
        cpu_avx2.pack_derived([m for m in model.modules() if isinstance(m, QuantLinear)])
        groups = decode_call_groups(model, device)
        shared, why = 0, Counter()
        for group in (g for g in groups if len(g) > 1):
            reason = cpu_avx2.share_input(group)
            shared += reason is None
            why.update([reason] if reason else [])
        log.info("decode: %d groups of layers that read the same input share one kernel call", shared)
        for r, n in why.items():
            log.info("%d groups of layers with one input run separately: %s", n, r)
        calls = cpu_avx2.read_ahead([m for g in groups for m in g])
        log.info("decode: %d kernel calls each read the next two calls' codes ahead", calls)
        fused.use_norms(model)  # part of the same C decode path; the reference kernels keep the model's own modules
        fused.use_mlps(model)
        fused.use_attention(model)
    return chosen


@torch.no_grad()
def decode_call_groups(model: nn.Module, device: str | torch.device) -> list[list[QuantLinear]]:
    """QuantLinears grouped by the input tensor they read in a one-token forward (a block's q/k/v, its gate/up; the
    others alone), groups in call order; none if that forward fails (the layers then run one by one, without
    read-ahead)."""
    qls = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    try:
        groups = input_groups(qls, lambda: model(torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False))
    except Exception as e:  # a model whose forward needs more than input ids: sharing is only an optimisation
        log.info("no shared decode calls or read-ahead: a one-token forward failed (%s: %s)", type(e).__name__, e)
        return []
    return [[qls[n] for n in g] for g in groups]
