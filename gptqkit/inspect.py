"""What a GPTQ checkpoint holds: layout, format, and which modules are quantized at which bits."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import read_quant_config, weight_files


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """A JSON-able summary read from the config and the safetensors headers (g_idx is read to detect act-order)."""
    from safetensors import safe_open

    path = Path(path)
    cfg, cfg_file = read_quant_config(path)
    raw = json.loads(Path(cfg_file).read_text())
    raw = raw.get("quantization_config", raw) if Path(cfg_file).name == "config.json" else raw
    files = weight_files(path, raw)
    if (path / "model.safetensors.index.json").exists():
        layout = f"sharded safetensors ({len(files)} shards + index)"
    elif raw.get("model_file_base_name") and files[0].stem == raw["model_file_base_name"]:
        layout = f"legacy single file {files[0].name} (model_file_base_name)"
    else:
        layout = f"single file {files[0].name}"
    shapes, gidx, dense = {}, {}, 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
                if k.endswith(".g_idx"):
                    gidx[k[:-6]] = st.get_tensor(k)
                elif k.endswith(".weight") and len(shapes[k]) == 2 and "embed" not in k and "lm_head" not in k \
                        and "wte" not in k and "wpe" not in k:
                    dense += 1
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
        layers.append({"name": name, "in_features": K, "out_features": N, "bits": bits,
                       "group_size": -1 if G == 1 else -(-K // G), "groups": G, "act_order": act})
        for t in ("qweight", "qzeros", "scales", "g_idx"):
            if f"{name}.{t}" in shapes:
                n = 1
                for s in shapes[f"{name}.{t}"]:
                    n *= s
                qbytes += n * (2 if t == "scales" else 4)
        nweights += K * N
    return {
        "path": str(path), "layout": layout, "config_file": Path(cfg_file).name,
        "checkpoint_format": cfg.checkpoint_format, "quantization_config": raw, "layers": layers,
        "unquantized_linear": dense, "size_bytes": sum(f.stat().st_size for f in files),
        "bits_per_weight": qbytes * 8 / nweights if nweights else 0.0,
    }
