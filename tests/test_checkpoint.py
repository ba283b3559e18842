"""Save -> load round trips: the checkpoint tensors, the config keys, and the loaded model's logits."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import random_model, random_samples
from gptqkit.checkpoint import load, save
from gptqkit.config import QuantConfig
from gptqkit.inspect import inspect_checkpoint
from gptqkit.qlinear import QuantLinear
from gptqkit.sequential import quantize_model


def quantized(arch="llama", cfg=QuantConfig(bits=4, group_size=32)):
    model = random_model(arch)
    quantize_model(model, random_samples(4, 32), cfg, progress=False)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=32),
                                 QuantConfig(bits=3, group_size=-1, desc_act=True, sym=False),
                                 QuantConfig(bits=2, group_size=32, checkpoint_format="gptq_v2", sym=False),
                                 QuantConfig(bits=8, group_size=32, desc_act=True)])
def test_save_load_logits_equal(tmp_path, arch, cfg):
    model = quantized(arch, cfg)
    out = save(model, tmp_path / "ckpt", cfg, dtype="keep")
    loaded = load(out, kernel="torch")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # every persistent buffer round-trips byte for byte
    a, b = model.state_dict(), loaded.state_dict()
    for k, t in a.items():
        if k.endswith(("qweight", "qzeros", "scales", "g_idx")):
            assert torch.equal(t, b[k]) and t.dtype == b[k].dtype, k


def test_checkpoint_files_and_config_keys(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32, desc_act=True)
    model = quantized(cfg=cfg)
    out = save(model, tmp_path / "ckpt", cfg)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "quantize_config.json"]
    conf = json.loads((out / "config.json").read_text())
    q = conf["quantization_config"]
    assert q == json.loads((out / "quantize_config.json").read_text())
    for key, val in [("quant_method", "gptq"), ("bits", 4), ("group_size", 32), ("desc_act", True), ("sym", True),
                     ("damp_percent", 0.01), ("true_sequential", True), ("static_groups", False),
                     ("checkpoint_format", "gptq")]:
        assert q[key] == val, key
    assert q["meta"]["quantizer"][0].startswith("gptqkit:")
    assert conf["torch_dtype"] == "float16"
    sd = load_file(str(out / "model.safetensors"))
    n = "model.layers.0.self_attn.q_proj"
    assert sd[f"{n}.qweight"].dtype == torch.int32 and sd[f"{n}.qweight"].shape == (64 * 4 // 32, 64)
    assert sd[f"{n}.qzeros"].dtype == torch.int32 and sd[f"{n}.qzeros"].shape == (2, 64 * 4 // 32)
    assert sd[f"{n}.scales"].dtype == torch.float16 and sd[f"{n}.scales"].shape == (2, 64)
    assert sd[f"{n}.g_idx"].dtype == torch.int32 and sd[f"{n}.g_idx"].shape == (64,)
    assert f"{n}.weight" not in sd
    assert (sd[f"{n}.qzeros"] == 0x77777777).all()  # symmetric 4-bit, v1
    assert sd["model.embed_tokens.weight"].dtype == torch.float16


def test_sharded_save_and_tied_embeddings(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32)
    model = quantized(cfg=cfg)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    out = save(model, tmp_path / "ckpt", cfg, max_shard_size="20KB", dtype="keep", store_tied=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert "lm_head.weight" not in index["weight_map"]  # stored once, tied on load
    loaded = load(out, kernel="torch")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_save_never_leaves_partial_output(tmp_path, monkeypatch):
    import safetensors.torch

    cfg = QuantConfig(bits=4, group_size=32)
    model = quantized(cfg=cfg)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save(model, tmp_path / "ckpt", cfg)
    assert list(tmp_path.iterdir()) == []


def test_inspect_reports_layout_bits_and_act_order(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32, desc_act=True)
    out = save(quantized(cfg=cfg), tmp_path / "ckpt", cfg)
    info = inspect_checkpoint(out)
    assert info["layout"].startswith("single file model.safetensors")
    assert info["checkpoint_format"] == "gptq"
    assert len(info["layers"]) == 2 * 7
    row = info["layers"][0]
    assert row["bits"] == 4 and row["group_size"] == 32 and row["act_order"] is True
    # 4-bit codes + fp16 scales + packed zeros per 32 + int32 g_idx per input row
    assert 4.5 < info["bits_per_weight"] < 6


def test_quantlinear_state_dict_is_the_checkpoint():
    ql = quantized().model.layers[0].mlp.down_proj
    assert isinstance(ql, QuantLinear)
    assert set(ql.state_dict()) == {"qweight", "qzeros", "scales", "g_idx"}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox", "gemma"])
def test_the_skeleton_allocates_no_weights(arch):
    """load() builds the model under init_empty_weights and _EmptyOnMeta: the Linears' and embeddings' weights are
    made on the meta device, not made on the CPU and moved (no CPU torch.empty as large as a weight), while buffers
    computed otherwise (rotary inv_freq) are the real ones."""
    import contextlib

    from accelerate import init_empty_weights
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    from conftest import random_model
    from gptqkit.checkpoint import _EmptyOnMeta

    class CpuBytes(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.device.type == "cpu":
                CpuBytes.n += out.numel() * out.element_size()
            return out

    ref = random_model(arch)
    biggest = max(p.numel() * p.element_size() for p in ref.parameters())
    for meta, most in ((contextlib.nullcontext, None), (_EmptyOnMeta, biggest)):
        CpuBytes.n = 0
        with init_empty_weights(), CpuBytes(), meta():
            m = AutoModelForCausalLM.from_config(ref.config, dtype=torch.float32)
        assert all(p.is_meta for p in m.parameters())
        if most is None:
            # the measure sees them
            assert CpuBytes.n >= sum(p.numel() * p.element_size() for p in ref.parameters()) / 2
        else:
            assert CpuBytes.n < most
    for (n, b), (n2, b2) in zip(m.named_buffers(), ref.named_buffers()):
        assert n == n2 and not b.is_meta and torch.equal(b, b2)


def test_a_buffer_made_by_torch_empty_is_built_for_real(tmp_path_factory, monkeypatch):
    """A module that makes a buffer with torch.empty and fills it (left on meta under _EmptyOnMeta) gets its model
    built again the usual way, so the buffer holds its values instead of failing the load."""
    from transformers.models.llama import modeling_llama

    from conftest import stories_checkpoint

    ckpt = stories_checkpoint(tmp_path_factory)
    init = modeling_llama.LlamaRotaryEmbedding.__init__

    def with_filled_buffer(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.register_buffer("filled", torch.empty(4).fill_(2.0), persistent=False)

    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "__init__", with_filled_buffer)
    model = load(ckpt, kernel="torch")
    assert torch.equal(model.model.rotary_emb.filled, torch.full((4,), 2.0))


def test_a_sharded_checkpoints_embedding_is_read_from_its_shard(tmp_path):
    """A sharded checkpoint: safetensors_offset finds each tensor's shard and the offset of its bytes (the embedding
    in the first shard, lm_head in a later one); load() with a bf16 dense dtype looks the untied fp16 embedding's rows
    up there, and the model's logits are the mapped lookup's."""
    from safetensors import safe_open

    from gptqkit.checkpoint import safetensors_offset

    cfg = QuantConfig(bits=4, group_size=32)
    model = quantized(cfg=cfg)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.model.embed_tokens.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().half())
    out = save(model, tmp_path / "ckpt", cfg, max_shard_size="20KB", dtype="keep")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.embed_tokens.weight"]
    files = [out / f for f in sorted(set(index["weight_map"].values()))]
    assert len(files) > 1 and index["weight_map"]["lm_head.weight"] != files[0].name
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        f, offset = safetensors_offset(files, name)
        with safe_open(str(f), "pt") as st:
            t = st.get_tensor(name)
        assert f.name == index["weight_map"][name]
        with open(f, "rb") as fh:
            fh.seek(offset)
            assert fh.read(t.nbytes) == t.contiguous().view(torch.uint8).numpy().tobytes()
    loaded = load(out, kernel="torch", dense_dtype="bfloat16")
    emb = loaded.model.embed_tokens
    assert emb.rows is not None and emb.weight.dtype == torch.float16
    with safe_open(str(out / shard), "pt") as f:
        want = f.get_tensor("model.embed_tokens.weight")
    ids = torch.tensor([[0, 5, 5, 255, 17]])
    with torch.no_grad():
        assert torch.equal(emb(ids), want[ids].float())
        fast = loaded(ids).logits
        emb.rows = None
        assert torch.equal(fast, loaded(ids).logits)
