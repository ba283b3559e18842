"""GrowingCache: the same tokens as DynamicCache, appended in place, and safe when a layer's tensors are replaced."""

from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from gptqkit import cache as C
from gptqkit.cache import GrowingCache, GrowingLayer

STORIES = Path(__file__).resolve().parents[2] / "shared" / "assets" / "models" / "stories260K"


def tiny_config(layers: int = 2):
    """A Llama config whose attention's keys and values are kv()'s: 2 heads of 4."""
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=16)


def kv(T, seed, heads=2, dim=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, heads, T, dim, generator=g), torch.randn(1, heads, T, dim, generator=g)


def test_appends_in_place_and_doubles(monkeypatch):
    monkeypatch.setattr(C, "HEADROOM", 4)
    appends = []
    append = C._append
    monkeypatch.setattr(C, "_append", lambda *a: appends.append(a[2].shape[-2]) or append(*a))
    layer, ref = GrowingLayer(), DynamicLayer()
    ptrs, caps = set(), []
    for step, T in enumerate([3, 1, 1, 1, 1, 1, 5, 1, 1]):
        k, v = kv(T, step)
        a, b = layer.update(k, v), ref.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert a[0].data_ptr() == layer._kbuf.data_ptr()  # a view of the buffer, no copy
        ptrs.add(layer._kbuf.data_ptr())
        caps.append(layer._kbuf.shape[-2])
    # tokens 3, 4, .., 8, 13, 14, 15: the first buffer holds 3 + 4 headroom; the 8th and 15th double it
    assert caps == [7, 7, 7, 7, 7, 14, 14, 14, 28]
    assert len(ptrs) == 3
    # steps that fit the buffer take the short path; _append (keys, then values) only starts or grows a buffer
    assert appends == [3, 3, 1, 1, 1, 1]


def test_crop_then_update_overwrites_the_dropped_tokens():
    layer, ref = GrowingLayer(), DynamicLayer()
    for s, T in enumerate([6, 1, 1]):
        k, v = kv(T, s)
        layer.update(k, v)
        ref.update(k, v)
    layer.crop(-3)
    ref.crop(-3)
    buf = layer._kbuf.data_ptr()
    k, v = kv(2, 9)
    a, b = layer.update(k, v), ref.update(k, v)
    assert layer._kbuf.data_ptr() == buf and a[0].shape[-2] == 7
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_replaced_tensors_start_a_new_buffer():
    """Beam search reorders a layer with index_select: keys become a new tensor, which the next update must use."""
    layer, ref = GrowingLayer(), DynamicLayer()
    k, v = kv(4, 1)
    k, v = k.expand(2, -1, -1, -1).clone(), v.expand(2, -1, -1, -1).clone()
    k[1] += 1
    for lay in (layer, ref):
        lay.update(k, v)
        lay.reorder_cache(torch.tensor([1, 1]))
    old = layer._kbuf.data_ptr()
    k2, v2 = kv(1, 2)
    k2, v2 = k2.expand(2, -1, -1, -1).clone(), v2.expand(2, -1, -1, -1).clone()
    a, b = layer.update(k2, v2), ref.update(k2, v2)
    assert layer._kbuf.data_ptr() != old
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_config_keeps_sliding_window_layers():
    from transformers import MistralConfig

    cfg = MistralConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=64, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    ref, ours = DynamicCache(config=cfg), GrowingCache(cfg)
    assert [type(a).__name__ for a in ref.layers] != [type(b).__name__ for b in ours.layers]
    for a, b in zip(ref.layers, ours.layers):
        assert type(b) is (GrowingLayer if type(a) is DynamicLayer else type(a))
    assert isinstance(GrowingCache(), DynamicCache)


@pytest.mark.skipif(not STORIES.exists(), reason="shared assets not found")
def test_generate_gives_the_same_tokens_as_dynamic_cache():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    ids = torch.tensor([[1, 403, 407, 261, 378, 13]])
    cache = GrowingCache(model.config)
    with torch.inference_mode():
        a = model.generate(ids, max_new_tokens=300, do_sample=False)  # crosses a doubling at 6 + 256 tokens
        b = model.generate(ids, max_new_tokens=300, do_sample=False, **{C.cache_kwarg(model): cache})
    assert torch.equal(a, b)
    assert all(type(layer) is GrowingLayer for layer in cache.layers)
    assert cache.layers[0]._kbuf.shape[-2] == 2 * (6 + C.HEADROOM) >= cache.get_seq_length() == 305


def test_free_slot_and_extend():
    """free_slot() gives the length while the next positions fit the buffer and nothing replaced the views; extend()
    counts positions written there, which the next update then follows."""
    layer = GrowingLayer()
    assert layer.free_slot() is None  # no buffer yet
    k, v = kv(3, 0)
    layer.update(k, v)
    cap = layer._kbuf.shape[-2]
    assert layer.free_slot() == 3 and layer.free_slot(cap - 3) == 3 and layer.free_slot(cap - 2) is None
    k1, v1 = kv(1, 1)
    layer._kbuf[:, :, 3:4] = k1
    layer._vbuf[:, :, 3:4] = v1
    layer.extend(1)
    k2, v2 = kv(1, 2)
    keys, values = layer.update(k2, v2)
    assert torch.equal(keys, torch.cat([k, k1, k2], -2)) and torch.equal(values, torch.cat([v, v1, v2], -2))
    layer.crop(-1)  # a new view: the next write must go through update's checks
    assert layer.free_slot() is None
    k3, v3 = kv(cap, 3)  # more than the buffer holds: a new one
    old = layer._kbuf
    keys, values = layer.update(k3, v3)
    assert layer._kbuf is not old and torch.equal(keys, torch.cat([k, k1, k3], -2))
    assert layer.free_slot() == 4 + cap
    assert layer._kset is None and layer._vset is None  # the cropped views of the old buffers are not kept


def test_a_bf16_cache_stores_rounded_keys_and_grows():
    """dtype=bf16: float32 keys and values are stored rounded (as .to(torch.bfloat16)), through a regrowth, with no
    new buffer while they fit; layers made from a config and layers made on first use (no config) alike."""
    cfg = tiny_config()
    for cache in (GrowingCache(dtype=torch.bfloat16), GrowingCache(cfg, dtype=torch.bfloat16)):
        k, v = kv(300, 7)
        cache.update(k[:, :, :10], v[:, :, :10], 1)
        buf = cache.layers[1]._kbuf
        assert buf.dtype == torch.bfloat16 and buf.shape[-2] == 10 + C.HEADROOM
        cache.update(k[:, :, 10:20], v[:, :, 10:20], 1)
        assert cache.layers[1]._kbuf is buf
        keys, values = cache.update(k[:, :, 20:], v[:, :, 20:], 1)  # 300 > 266: a new buffer, larger than 2 x 266
        assert cache.layers[1]._kbuf.shape[-2] == 300 + C.HEADROOM and cache.layers[1]._kbuf.dtype == torch.bfloat16
        assert torch.equal(keys, k.bfloat16()) and torch.equal(values, v.bfloat16())
        assert [type(a) for a in cache.layers] == [GrowingLayer, GrowingLayer]


@pytest.mark.skipif(not STORIES.exists(), reason="shared assets not found")
def test_cache_for_picks_bf16_under_gptqkit_attention():
    """cache_for: bf16 only for a float32 model on gptqkit's CPU attention (a plain SDPA model would get keys of
    another dtype than its queries), the model's dtype with "model"; an unknown choice is refused."""
    from transformers import AutoModelForCausalLM

    from gptqkit import attention
    from gptqkit.kernels import cpu_avx2

    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    assert C.kv_dtype(model) is None and C.cache_for(model).buffer_dtype is None
    if attention.use(model):  # the C library is here
        assert C.kv_dtype(model) == torch.bfloat16
        assert C.cache_for(model).buffer_dtype == torch.bfloat16 and C.cache_for(model, "model").buffer_dtype is None
        ids = torch.tensor([[1, 403, 407, 261, 378, 13]])
        with torch.inference_mode():
            a = model.generate(ids, max_new_tokens=40, do_sample=False, **{C.cache_kwarg(model): C.cache_for(model)})
            b = model.generate(ids, max_new_tokens=40, do_sample=False,
                               **{C.cache_kwarg(model): C.cache_for(model, "model")})
        assert torch.equal(a[0, :46], b[0, :46])  # 40 greedy tokens as with the float32 cache (here: 123 of them)
    else:
        assert isinstance(cpu_avx2.fast_library(), str)
    with pytest.raises(ValueError, match="kv_cache must be one of auto, model"):
        C.cache_for(model, "fp8")


def test_the_cache_argument_under_either_name():
    """transformers 5.24 renamed the KV cache argument `past_key_values` to `cache`: cache_kwarg reads which one a
    forward takes (through a mix-in's forward(**kwargs) to the class it extends), given_cache finds it under either,
    output_cache reads it back from an output."""
    import warnings
    from types import SimpleNamespace

    from torch import nn
    from transformers import AutoModelForCausalLM

    class New(nn.Module):
        def forward(self, x, cache=None):
            return x

    class Old(nn.Module):
        def forward(self, x, past_key_values=None, **kwargs):
            return x

    class MixIn(Old):
        def forward(self, x, **kwargs):
            return super().forward(x, **kwargs)

    assert [C.cache_kwarg(m) for m in (New(), Old(), MixIn())] == ["cache", "past_key_values", "past_key_values"]
    c = GrowingCache()
    assert C.given_cache({"cache": c}) is c and C.given_cache({"past_key_values": c, "x": 1}) is c
    assert C.given_cache({"use_cache": True}) is None
    assert C.output_cache(SimpleNamespace(past_key_values=c)) is c and C.output_cache(SimpleNamespace(cache=c)) is c
    # the installed transformers takes the name cache_kwarg gives without a deprecation warning, and hands the same
    # cache back
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    cache = GrowingCache(model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model(torch.tensor([[1, 2, 3]]), use_cache=True, **{C.cache_kwarg(model): cache})
    assert C.output_cache(out) is cache and cache.get_seq_length() == 3


def test_length_holds_the_probes_six_positions():
    """length=6 (the fused probes: five positions, then one decoded token): a new buffer holds the six, layers made
    from a config and on first use alike; a seventh position doubles it. Without a length a buffer takes HEADROOM."""
    cfg = tiny_config()
    for cache in (GrowingCache(length=6), GrowingCache(cfg, length=6)):
        k, v = kv(7, 9)
        cache.update(k[:, :, :5], v[:, :, :5], 0)
        buf = cache.layers[0]._kbuf
        assert buf.shape[-2] == 6 and cache.layers[0].free_slot(1) == 5 and cache.layers[0].free_slot(2) is None
        cache.update(k[:, :, 5:6], v[:, :, 5:6], 0)
        assert cache.layers[0]._kbuf is buf
        keys, _ = cache.update(k[:, :, 6:], v[:, :, 6:], 0)
        assert cache.layers[0]._kbuf.shape[-2] == 12 and torch.equal(keys, k)
    assert GrowingCache().length is None and GrowingCache(cfg).layers[0].length is None


def test_length_sizes_the_first_buffer_once():
    """length (the whole sequence's positions, where known): each layer's first buffer holds exactly that many, so a
    prompt fed in pieces and the decoded tokens after it all land in it; past it the buffer doubles. A first piece
    longer than length gets a buffer of its own size."""
    cfg = tiny_config()
    for cache in (GrowingCache(length=10), GrowingCache(cfg, length=10)):
        k, v = kv(11, 3)
        cache.update(k[:, :, :4], v[:, :, :4], 0)
        buf = cache.layers[0]._kbuf
        assert buf.shape[-2] == 10
        for s in range(4, 10):
            cache.update(k[:, :, s:s + 1], v[:, :, s:s + 1], 0)
        assert cache.layers[0]._kbuf is buf
        keys, values = cache.update(k[:, :, 10:], v[:, :, 10:], 0)
        assert cache.layers[0]._kbuf.shape[-2] == 20 and torch.equal(keys, k) and torch.equal(values, v)
    big = GrowingCache(length=3)
    k, v = kv(5, 4)
    big.update(k, v, 0)
    assert big.layers[0]._kbuf.shape[-2] == 5


def test_with_a_config_and_length_every_layer_is_made_at_the_first_update():
    """All layers' buffers are made at the first update (before the other layers' activations exist), each layer then
    starts in its own; a layer whose keys have another shape makes its own buffer instead; a cache without a length
    makes each layer's buffer at its own first update, as before."""
    cfg = tiny_config(3)
    cache = GrowingCache(cfg, dtype=torch.bfloat16, length=12)
    k, v = kv(5, 1)
    cache.update(k, v, 0)
    spares = [layer._spares for layer in cache.layers[1:]]
    assert all(s is not None and s[0].shape == (1, 2, 12, 4) and s[0].dtype == torch.bfloat16 for s in spares)
    assert cache.layers[0]._kbuf.shape == (1, 2, 12, 4) and cache.layers[0]._spares is None
    keys, values = cache.update(k, v, 1)
    assert cache.layers[1]._kbuf is spares[0][0] and cache.layers[1]._vbuf is spares[0][1]
    assert torch.equal(keys, k.bfloat16()) and torch.equal(values, v.bfloat16()) and cache.layers[1]._spares is None
    wide = torch.randn(1, 3, 5, 4)  # another shape: the spare does not fit
    keys, _ = cache.update(wide, wide, 2)
    assert cache.layers[2]._kbuf is not spares[1][0] and cache.layers[2]._kbuf.shape == (1, 3, 12, 4)
    assert torch.equal(keys, wide.bfloat16())
    plain = GrowingCache(cfg)
    plain.update(k, v, 0)
    assert all(layer._spares is None and layer._kbuf is None for layer in plain.layers[1:])
