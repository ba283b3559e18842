"""Checkpoint format edge cases: each test builds a checkpoint with gptqkit, rewrites its files into the layout
another tool writes, loads it with gptqkit.checkpoint.load and compares the logits with the in-memory quantized
model (reference kernel, float32: exact equality).

Bit-level facts (v1/v2 zeros, the 3-bit word layout) are checked with slow decoders written here from FORMAT.md,
independent of gptqkit.packing.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import random_samples
from gptqkit.checkpoint import CheckpointError, load, read_quant_config, save
from gptqkit.config import QuantConfig
from gptqkit.inspect import inspect_checkpoint
from gptqkit.qlinear import QuantLinear
from gptqkit.quant import rtn
from gptqkit.sequential import quantize_model

VOCAB = 256
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    yield


def tiny(arch: str = "llama", seed: int = 0) -> nn.Module:
    """A random 2-layer model whose Linear widths are multiples of 128 (hidden 128, intermediate 256)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                  tie_word_embeddings=False)
    cfg = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)  # qwen2: q/k/v carry a bias
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def quantized(cfg: QuantConfig, arch: str = "llama") -> nn.Module:
    model = tiny(arch)
    quantize_model(model, random_samples(4, 32, vocab=VOCAB), cfg, progress=False)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def assert_loads_same(model: nn.Module, path: Path) -> nn.Module:
    loaded = load(path, kernel="torch")
    assert torch.equal(logits(model), logits(loaded))
    return loaded


def qlayers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def edit_config(path: Path, fn, files=("quantize_config.json", "config.json")) -> None:
    """Apply fn to the quantization dict in each of `files` that exists."""
    for name in files:
        f = path / name
        if not f.exists():
            continue
        d = json.loads(f.read_text())
        q = d["quantization_config"] if name == "config.json" else d
        fn(q)
        f.write_text(json.dumps(d, indent=2))


def edit_tensors(path: Path, fn, name: str = "model.safetensors") -> None:
    sd = load_file(str(path / name))
    fn(sd)
    save_file(sd, str(path / name), metadata={"format": "pt"})


# Independent bit-stream codec (FORMAT.md): 32 values fill `bits` words, value j at stream bits [j*b, (j+1)*b),
# words taken lowest bits first. Plain Python ints on one column of words.


def decode_column(words: list[int], bits: int) -> list[int]:
    stream = 0
    for i, w in enumerate(words):
        stream |= (w & 0xFFFFFFFF) << (32 * i)
    return [(stream >> (j * bits)) & ((1 << bits) - 1) for j in range(len(words) * 32 // bits)]


def encode_column(values: list[int], bits: int) -> list[int]:
    stream = 0
    for j, v in enumerate(values):
        stream |= v << (j * bits)
    words = [(stream >> (32 * i)) & 0xFFFFFFFF for i in range(len(values) * bits // 32)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def v1_to_v2(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """qzeros [G, N*b/32] packed along N: add 1 to every field (v1 stores zero - 1, v2 stores zero)."""
    rows = []
    for row in qzeros.tolist():
        fields = []
        for u in range(0, len(row), bits):  # units of `bits` words hold 32 fields (one word for 2/4/8 bits: 32/b)
            fields += decode_column(row[u:u + bits], bits)
        rows.append(encode_column([f + 1 for f in fields], bits))
    return torch.tensor(rows, dtype=torch.int32)


# ------------------------------------------------------------------------------------------------ v1 / v2 zeros


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("key", ["checkpoint_format", "format"])
def test_v1_and_v2_zeros_give_the_same_weights(tmp_path, bits, key):
    cfg = QuantConfig(bits=bits, group_size=32, sym=False)
    model = quantized(cfg)
    v1 = save(model, tmp_path / "v1", cfg, dtype="keep")
    v2 = tmp_path / "v2"
    shutil.copytree(v1, v2)
    edit_tensors(v2, lambda sd: sd.update({k: v1_to_v2(t, bits) for k, t in sd.items() if k.endswith("qzeros")}))
    if bits == 4:  # FORMAT.md's shortcut for 4 bits: v2 = v1 + 0x11111111 in every word (no field overflows)
        old, new = load_file(str(v1 / "model.safetensors")), load_file(str(v2 / "model.safetensors"))
        for k in (k for k in old if k.endswith("qzeros")):
            assert torch.equal((old[k].to(torch.int64) + 0x11111111) & 0xFFFFFFFF, new[k].to(torch.int64) & 0xFFFFFFFF)

    def to_v2(q):
        q.pop("checkpoint_format", None)
        q.pop("format", None)
        q[key] = "gptq_v2"  # GPTQModel writes `format`, gptqkit and optimum `checkpoint_format`
    edit_config(v2, to_v2)
    a, b = assert_loads_same(model, v1), assert_loads_same(model, v2)
    assert read_quant_config(v2)[0].checkpoint_format == "gptq_v2"
    for (n, la), lb in zip(qlayers(a).items(), qlayers(b).values()):
        assert lb.checkpoint_format == "gptq_v2"
        assert torch.equal(la.dequantize(), lb.dequantize()), n


def test_v2_written_by_gptqkit_stores_zero_without_offset(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32, sym=True, checkpoint_format="gptq_v2")
    model = quantized(cfg)
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    sd = load_file(str(out / "model.safetensors"))
    assert (sd["model.layers.0.mlp.up_proj.qzeros"] == 0x88888888 - 2**32).all()  # zero 8 in every nibble
    assert_loads_same(model, out)
    assert inspect_checkpoint(out)["format_check"].startswith("ok")


def test_inspect_flags_zeros_that_do_not_fit_the_declared_format(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32, sym=True, checkpoint_format="gptq_v2")
    out = save(quantized(cfg), tmp_path / "ckpt", cfg, dtype="keep")
    edit_config(out, lambda q: q.update(checkpoint_format="gptq"))  # v2 tensors declared as v1
    assert inspect_checkpoint(out)["format_check"].startswith("mismatch: 14 layers")


# ------------------------------------------------------------------------------------------------ 3-bit packing


def test_3bit_codes_cross_words_and_load(tmp_path):
    cfg = QuantConfig(bits=3, group_size=32, sym=False)
    model = quantized(cfg)
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    loaded = assert_loads_same(model, out)
    sd = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"  # K=256 -> 24 words per column, N=128 -> 12 zero words per group
    qweight, qzeros, scales, g_idx = (sd[f"{name}.{t}"] for t in ("qweight", "qzeros", "scales", "g_idx"))
    assert qweight.shape == (256 * 3 // 32, 128) and qzeros.shape == (8, 128 * 3 // 32)
    cols = [0, 1, 77, 127]
    codes = torch.tensor([decode_column(qweight[:, n].tolist(), 3) for n in cols]).T  # [K, len(cols)]
    zeros = torch.tensor([[z + 1 for z in decode_column(qzeros[g].tolist(), 3)] for g in range(8)])  # [G, N], v1
    W = scales.float()[g_idx.long()][:, cols] * (codes.float() - zeros[g_idx.long()][:, cols].float())
    assert torch.equal(W, loaded.get_submodule(name).dequantize()[:, cols])
    # codes 10 and 21 of each 32 straddle two words: make sure the layer actually uses the high bits there
    assert (codes[10::32] >= 4).any() and (codes[21::32] >= 2).any()


# ------------------------------------------------------------------------------------------------ act-order


def test_act_order_g_idx_is_not_monotone_and_loads(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32, desc_act=True)
    model = quantized(cfg)
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    sd = load_file(str(out / "model.safetensors"))
    g = sd["model.layers.0.self_attn.q_proj.g_idx"]
    assert (g[1:] < g[:-1]).any(), "act-order should scatter rows across groups"
    assert torch.equal(torch.bincount(g.long()), torch.full((4,), 32))  # each group still has 32 rows
    loaded = assert_loads_same(model, out)
    assert torch.equal(loaded.get_submodule("model.layers.0.self_attn.q_proj").g_idx, g)
    assert inspect_checkpoint(out)["layers"][0]["act_order"] is True


# ------------------------------------------------------------------------------------------------ configuration


def test_missing_sym_warns_and_means_true(tmp_path, caplog):
    cfg = QuantConfig(bits=4, group_size=32, sym=True)
    model = quantized(cfg)
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    edit_config(out, lambda q: q.pop("sym"))
    with caplog.at_level(logging.WARNING):
        qc, _ = read_quant_config(out)
        assert_loads_same(model, out)
    assert qc.sym is True
    assert any("sym" in r.getMessage() for r in caplog.records)


def test_config_only_in_config_json(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32)
    model = quantized(cfg)
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    (out / "quantize_config.json").unlink()
    assert Path(read_quant_config(out)[1]).name == "config.json"
    assert_loads_same(model, out)


def legacy(out: Path, name: str = "gptq_model-4bit-32g") -> None:
    """Rewrite a checkpoint the way AutoGPTQ <= 0.4 wrote it: one `gptq_model-4bit-32g.safetensors` named by
    model_file_base_name, quant_config.json (as some forks call it), no quantization_config in config.json."""
    (out / "model.safetensors").rename(out / f"{name}.safetensors")
    q = json.loads((out / "quantize_config.json").read_text())
    q = {k: q[k] for k in ("bits", "group_size", "desc_act", "damp_percent", "sym", "true_sequential")}
    q["model_file_base_name"] = name
    (out / "quantize_config.json").unlink()
    (out / "quant_config.json").write_text(json.dumps(q))
    conf = json.loads((out / "config.json").read_text())
    del conf["quantization_config"]
    (out / "config.json").write_text(json.dumps(conf))


def test_legacy_file_name_and_quant_config_json(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32, desc_act=True)
    model = quantized(cfg)
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    legacy(out)
    # A stale file next to it must not be read: model_file_base_name names the weights.
    stale = {k: torch.zeros_like(t) if k.endswith("scales") else t
             for k, t in load_file(str(out / "gptq_model-4bit-32g.safetensors")).items()}
    save_file(stale, str(out / "zz-stale.safetensors"))
    qc, src = read_quant_config(out)
    assert Path(src).name == "quant_config.json" and qc.bits == 4 and qc.group_size == 32
    assert_loads_same(model, out)
    info = inspect_checkpoint(out)
    assert "gptq_model-4bit-32g.safetensors" in info["layout"] and info["config_file"] == "quant_config.json"


def test_legacy_checkpoint_without_g_idx(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32)
    model = quantized(cfg)
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    legacy(out)
    edit_tensors(out, lambda sd: [sd.pop(k) for k in list(sd) if k.endswith("g_idx")],
                 "gptq_model-4bit-32g.safetensors")
    assert_loads_same(model, out)


def test_legacy_config_without_group_size_infers_it_from_scales(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32)
    model = quantized(cfg)
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    legacy(out)
    edit_config(out, lambda q: q.pop("group_size"), files=("quant_config.json",))
    assert_loads_same(model, out)


def test_group_size_mismatch_names_the_file_and_the_fix(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32)
    model = quantized(cfg)
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    edit_config(out, lambda q: q.update(group_size=64))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*group_size=32"):
        load(out, kernel="torch")


def test_dynamic_skip_and_override(tmp_path):
    """GPTQModel's `dynamic`: "-:regex" leaves a module in floating point, "+:regex" changes its bits/group."""
    dynamic = {r"-:.*\.mlp\.down_proj$": {}, r"+:.*\.self_attn\.(q|k)_proj$": {"bits": 8, "group_size": 64}}
    cfg = QuantConfig(bits=4, group_size=32, dynamic=dynamic)
    original = tiny()
    model = copy.deepcopy(original)
    quantize_model(model, random_samples(4, 32, vocab=VOCAB), cfg, progress=False)  # applies the rules itself
    for name, m in original.named_modules():
        if not isinstance(m, nn.Linear) or "layers." not in name:
            continue
        got, mc = model.get_submodule(name), cfg.for_module(name)
        if mc is None:  # skipped: the float Linear stays, untouched
            assert type(got) is nn.Linear and torch.equal(got.weight, m.weight)
        else:
            assert isinstance(got, QuantLinear) and (got.bits, got.group_size) == (mc.bits, mc.group_size)
    assert cfg.dynamic == dynamic, "no layer was left unquantized for its size: the rules are all there is"
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    sd = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.weight" in sd and "model.layers.0.mlp.down_proj.qweight" not in sd
    assert sd["model.layers.0.self_attn.q_proj.qweight"].shape == (128 * 8 // 32, 128)
    loaded = assert_loads_same(model, out)
    assert type(loaded.model.layers[0].mlp.down_proj) is nn.Linear
    q = loaded.model.layers[1].self_attn.q_proj
    assert (q.bits, q.group_size) == (8, 64) and loaded.model.layers[1].self_attn.v_proj.bits == 4
    bits = {r["name"]: r["bits"] for r in inspect_checkpoint(out)["layers"]}
    assert bits["model.layers.0.self_attn.k_proj"] == 8 and bits["model.layers.0.mlp.up_proj"] == 4
    assert "model.layers.0.mlp.down_proj" not in bits
    info = inspect_checkpoint(out)
    assert info["dynamic_skipped"][r"-:.*\.mlp\.down_proj$"] == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    assert info["bits"] == [4, 8]


# ------------------------------------------------------------------------------------------------ bias, lm_head


def test_bias_present(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32)
    model = quantized(cfg, arch="qwen2")
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    sd = load_file(str(out / "model.safetensors"))
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias"} <= set(sd)
    assert "model.layers.0.self_attn.o_proj.bias" not in sd
    loaded = assert_loads_same(model, out)
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    assert loaded.model.layers[0].self_attn.o_proj.bias is None


def test_bias_absent(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32)
    model = quantized(cfg)
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    assert not [k for k in load_file(str(out / "model.safetensors")) if re.search(r"proj\.bias$", k)]
    loaded = assert_loads_same(model, out)
    assert all(m.bias is None for m in qlayers(loaded).values())


def test_lm_head_unquantized(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32)
    model = quantized(cfg)
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    sd = load_file(str(out / "model.safetensors"))
    assert sd["lm_head.weight"].dtype == torch.float32 and "lm_head.qweight" not in sd
    assert json.loads((out / "quantize_config.json").read_text())["lm_head"] is False
    loaded = assert_loads_same(model, out)
    assert type(loaded.lm_head) is nn.Linear


def test_lm_head_quantized(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32, lm_head=True)
    model = quantized(cfg.replace(lm_head=False))
    r = rtn(model.lm_head.weight.detach(), cfg)
    model.lm_head = QuantLinear.from_result(r, None, 4, 32)
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    assert "lm_head.qweight" in load_file(str(out / "model.safetensors"))
    loaded = assert_loads_same(model, out)
    assert isinstance(loaded.lm_head, QuantLinear)
    assert any(r["name"] == "lm_head" for r in inspect_checkpoint(out)["layers"])


def test_config_json_keeps_rope_theta_for_transformers_4(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = QuantConfig(bits=4, group_size=32)
    conf = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                       num_attention_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32).eval()
    quantize_model(model, random_samples(2, 16, vocab=VOCAB), cfg, progress=False)
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    assert json.loads((out / "config.json").read_text()).get("rope_theta") == 100000.0
    assert_loads_same(model, out)


def test_tied_lm_head_is_stored_for_loaders_that_do_not_retie(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32)
    model = quantized(cfg)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    sd = load_file(str(out / "model.safetensors"))
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    loaded = assert_loads_same(model, out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
