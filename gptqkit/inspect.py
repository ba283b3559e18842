"""What a GPTQ checkpoint holds: layout, format, and which modules are quantized at which bits.

Read from the config files and the safetensors headers only, plus two small tensors per layer (g_idx to detect
act-order, the first row of qzeros to check the declared zero format), so it is quick on any model size.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .checkpoint import CONFIG_FILES, read_quant_config, weight_files

# Top-level names of the decoder stack in the architectures transformers ships; anything else that is a 2-D
# `.weight` outside it (embeddings, lm_head, vision towers) is not counted as an unquantized block Linear.
_EMBEDDING = ("embed", "wte", "wpe", "lm_head", "shared")


def _layout(path: Path, files: list[Path], raw: dict) -> str:
    if (path / "model.safetensors.index.json").exists():
        return f"sharded safetensors ({len(files)} shards + index)"
    base = raw.get("model_file_base_name")
    if base and files[0].stem == base:
        return f"legacy single file {files[0].name} (model_file_base_name)"
    if len(files) > 1:
        return f"{len(files)} files without an index ({', '.join(f.name for f in files[:3])}...)"
    return f"single file {files[0].name}"


def _stored_zero(field_row: list[int], bits: int) -> int | None:
    """The first zero field of a qzeros row (2/4/8 bits: lowest bits of the first word), or None for 3 bits."""
    return None if bits == 3 else field_row[0] & ((1 << bits) - 1)


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """A JSON-able summary of a GPTQ checkpoint folder (gptqkit's or another tool's).

    >>> info = inspect_checkpoint("smollm2-gptq-4bit")  # doctest: +SKIP
    >>> info["layout"], info["checkpoint_format"], info["layers"][0]["bits"]  # doctest: +SKIP
    ('single file model.safetensors', 'gptq', 4)
    """
    from safetensors import safe_open

    path = Path(path)
    cfg, cfg_file = read_quant_config(path)
    raw = json.loads(Path(cfg_file).read_text())
    raw = raw.get("quantization_config", raw) if Path(cfg_file).name == "config.json" else raw
    files = weight_files(path, raw)
    config_files = [n for n in CONFIG_FILES if (path / n).exists()
                    and (n != "config.json" or "quantization_config" in json.loads((path / n).read_text()))]
    shapes: dict[str, tuple] = {}
    gidx, zero_rows = {}, {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
                if k.endswith(".g_idx"):
                    gidx[k[:-6]] = st.get_tensor(k)
                elif k.endswith(".qzeros"):
                    zero_rows[k[:-7]] = st.get_slice(k)[0:1].reshape(-1).tolist()
    layers, qbytes, nweights = [], 0, 0
    for k in sorted(shapes):
        if not k.endswith(".qweight"):
            continue
        name = k[:-8]
        rows, N = shapes[k]
        G = shapes[f"{name}.scales"][0]
        K = shapes[f"{name}.g_idx"][0] if f"{name}.g_idx" in shapes else None
        mc = cfg.for_module(name) or cfg
        bits = rows * 32 // K if K else mc.bits
        K = K or rows * 32 // bits
        g = gidx.get(name)
        act = bool(g is not None and (g[1:] < g[:-1]).any().item())
        rule = next((p for p in (cfg.dynamic or {}) if p[:2] != "-:" and re.match(p.removeprefix("+:"), name)),
                    None)
        layers.append({"name": name, "in_features": K, "out_features": N, "bits": bits,
                       "group_size": -1 if G == 1 else -(-K // G), "groups": G, "act_order": act,
                       "bias": f"{name}.bias" in shapes, "dynamic_rule": rule,
                       "stored_zero": _stored_zero(zero_rows.get(name, [0]), bits)})
        for t in ("qweight", "qzeros", "scales", "g_idx"):
            if f"{name}.{t}" in shapes:
                n = 1
                for s in shapes[f"{name}.{t}"]:
                    n *= s
                qbytes += n * (2 if t == "scales" else 4)
        nweights += K * N
    qnames = {r["name"] for r in layers}
    dense = sorted(k[:-7] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2
                   and not any(e in k for e in _EMBEDDING) and k[:-7] not in qnames)
    skipped = {p: [n for n in dense if re.match(p[2:], n)] for p in (cfg.dynamic or {}) if p.startswith("-:")}
    return {
        "path": str(path), "layout": _layout(path, files, raw), "config_file": Path(cfg_file).name,
        "config_files": config_files, "weight_files": [f.name for f in files],
        "checkpoint_format": cfg.checkpoint_format, "format_check": _format_check(cfg, layers),
        "sym": raw.get("sym", "missing (read as True)"), "quantizer": (raw.get("meta") or {}).get("quantizer"),
        "quantization_config": raw, "layers": layers, "bits": sorted({r["bits"] for r in layers}),
        "lm_head_quantized": "lm_head" in qnames, "dynamic": cfg.dynamic or {}, "dynamic_skipped": skipped,
        "unquantized_linear": len(dense), "unquantized_linear_names": dense,
        "size_bytes": sum(f.stat().st_size for f in files),
        "bits_per_weight": qbytes * 8 / nweights if nweights else 0.0,
    }


def _format_check(cfg, layers: list[dict]) -> str:
    """Whether the stored zeros fit the declared format. Symmetric zeros are 2^(bits-1): v1 stores one less."""
    if not cfg.sym:
        return "not checked (asymmetric zeros vary)"
    bad = []
    for r in layers:
        if r["stored_zero"] is None:
            continue
        expect = 2 ** (r["bits"] - 1) - (1 if cfg.checkpoint_format == "gptq" else 0)
        if r["stored_zero"] != expect:
            bad.append(r["name"])
    if not bad:
        return "ok: symmetric zeros stored as " + ("zero - 1 (v1)" if cfg.checkpoint_format == "gptq" else
                                                      "zero (v2)")
    return (f"mismatch: {len(bad)} layers (first {bad[0]}) store symmetric zeros that do not fit "
            f"checkpoint_format={cfg.checkpoint_format}")


def describe(info: dict) -> str:
    """The human-readable report `gptqkit inspect` prints."""
    zeros = "qzeros store zero - 1 (v1)" if info["checkpoint_format"] == "gptq" else "qzeros store zero (v2)"
    out = [f"{info['path']}: {info['layout']}",
           f"config: {info['config_file']} (present in: {', '.join(info['config_files'])})",
           f"format: {info['checkpoint_format']}, {zeros}; check: {info['format_check']}",
           f"sym: {info['sym']}; quantizer: {', '.join(info['quantizer'] or ['unknown'])}; "
           f"lm_head: {'quantized' if info['lm_head_quantized'] else 'floating point'}"]
    for rule, over in info["dynamic"].items():
        hit = info["dynamic_skipped"].get(rule)
        out.append(f"dynamic {rule}: {json.dumps(over)}" + (f" -> {len(hit)} modules left in floating point"
                                                          if hit is not None else ""))
    out.append(f"{'module':60s} {'in':>6s} {'out':>6s} {'bits':>4s} {'group':>5s} {'act-order':>9s} {'bias':>5s}")
    for r in info["layers"]:
        out.append(f"{r['name']:60s} {r['in_features']:6d} {r['out_features']:6d} {r['bits']:4d} "
                   f"{r['group_size']:5d} {str(r['act_order']):>9s} {str(r['bias']):>5s}"
                   + (f"  ({r['dynamic_rule']})" if r["dynamic_rule"] else ""))
    per_bits = {b: sum(r["bits"] == b for r in info["layers"]) for b in info["bits"]}
    out.append(f"{len(info['layers'])} quantized layers ({', '.join(f'{n} at {b} bits' for b, n in per_bits.items())}"
               f"), {info['unquantized_linear']} unquantized Linear weights"
               + (f" ({', '.join(info['unquantized_linear_names'][:3])}"
                  f"{' ...' if info['unquantized_linear'] > 3 else ''})" if info["unquantized_linear"] else "")
               + f"; size on disk {info['size_bytes'] / 2**20:.1f} MiB; {info['bits_per_weight']:.3f} bits per "
               "quantized weight (codes + scales + zeros + g_idx)")
    return "\n".join(out)
