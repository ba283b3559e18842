"""The C attention for one decoded token (gptqkit.attention, cpu_avx2.decode_attention) against torch's SDPA:
the product itself on many shapes, and a loaded model decoding with it against the same model on SDPA."""

import pytest
import torch
import torch.nn.functional as F

from gptqkit import attention
from gptqkit.kernels import cpu_avx2
from conftest import stories_checkpoint

needs_avx2 = pytest.mark.skipif(isinstance(cpu_avx2.library(), str),
                                reason=f"avx2 kernel unavailable: {cpu_avx2.library()}")


def sdpa64(q, k, v, scale):
    """float64 SDPA with the key/value heads repeated for their query heads, in the output layout [1, 1, H, D]."""
    r = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(r, 1), v.double().repeat_interleave(r, 1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


@needs_avx2
@pytest.mark.parametrize("kv", [torch.float32, torch.bfloat16], ids=["fp32-cache", "bf16-cache"])
@pytest.mark.parametrize("vnni", [False, True], ids=["avx2", "avx512"])
@pytest.mark.parametrize("H,Hkv,D,L", [(32, 4, 64, 520), (9, 3, 64, 1), (9, 3, 64, 13), (8, 8, 128, 77),
                                       (4, 1, 80, 300), (6, 2, 8, 9), (2, 2, 192, 40), (12, 2, 96, 33),
                                       (5, 5, 16, 7), (4, 2, 32, 21)])
def test_decode_attention_matches_sdpa(H, Hkv, D, L, vnni, kv):
    """GQA ratios 1-8, head sizes 8-192 (a last pass of fewer than 64 dimensions), lengths with and without a
    last partial block of 8 positions, keys and values read through a cache buffer's strides; one very large
    score (a position that takes almost all the weight) so the softmax's max subtraction matters. Both builds: the
    AVX-512 one takes the query heads of a key/value head together (1-4 at a time, a thread's range of heads
    cutting through a group), the AVX2 one a head at a time. A bf16 cache is read exactly (its values widened; by
    even and odd elements where D is a multiple of 32, 32 and 96 taking a last pass of 32): the oracle takes the
    same bf16 keys and values."""
    if vnni and not cpu_avx2.has_vnni():
        pytest.skip("this CPU has no AVX512-VNNI")
    lib = cpu_avx2.library(vnni=vnni)
    gen = torch.Generator().manual_seed(H * L + D)
    kb, vb = torch.randn(1, Hkv, L + 29, D, generator=gen), torch.randn(1, Hkv, L + 29, D, generator=gen)
    q = torch.randn(1, 1, H, D, generator=gen).transpose(1, 2)  # [1, H, 1, D] as the attention layers make it
    kb[0, 0, L // 2] = q[0, 0, 0] * 30
    kb, vb = kb.to(kv), vb.to(kv)
    k, v = kb[:, :, :L], vb[:, :, :L]  # as GrowingCache passes them: views into a larger buffer
    out = cpu_avx2.decode_attention(q, k, v, D ** -0.5, lib=lib)
    assert out.shape == (1, 1, H, D)
    ref = sdpa64(q, k, v, D ** -0.5)
    assert (out.double() - ref).abs().max() < 2e-6 * ref.abs().max()


@needs_avx2
def test_decode_attention_takes_any_query_layout():
    """A query whose [H, D] rows are not packed (a slice of a wider tensor) gives the same result as a packed one."""
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 2, 20, 16, generator=gen), torch.randn(1, 2, 20, 16, generator=gen)
    wide = torch.randn(1, 4, 1, 40, generator=gen)
    q = wide[..., 8:24]
    assert q.stride(1) != 16
    assert torch.equal(cpu_avx2.decode_attention(q, k, v, 0.25), cpu_avx2.decode_attention(q.clone(), k, v, 0.25))


@needs_avx2
def test_decode_attention_declines_other_shapes():
    """None (the caller runs SDPA) for what it does not take: several queries, batches, other dtypes (a bf16 query,
    an fp16 cache, keys and values of two dtypes), D % 8."""
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 10, 64)
    assert cpu_avx2.decode_attention(q, k, k, 0.125) is not None
    assert cpu_avx2.decode_attention(torch.randn(1, 4, 3, 64), k, k, 0.125) is None
    assert cpu_avx2.decode_attention(torch.randn(2, 4, 1, 64), torch.randn(2, 2, 10, 64), torch.randn(2, 2, 10, 64),
                                     0.125) is None
    assert cpu_avx2.decode_attention(q.bfloat16(), k.bfloat16(), k.bfloat16(), 0.125) is None
    assert cpu_avx2.decode_attention(q, k.half(), k.half(), 0.125) is None
    assert cpu_avx2.decode_attention(q, k, k.bfloat16(), 0.125) is None
    assert cpu_avx2.decode_attention(torch.randn(1, 4, 1, 12), torch.randn(1, 2, 10, 12),
                                     torch.randn(1, 2, 10, 12), 0.125) is None


@pytest.fixture(scope="module")
def stories_ckpt(tmp_path_factory):
    return stories_checkpoint(tmp_path_factory)


@needs_avx2
def test_loaded_model_decodes_like_sdpa(stories_ckpt, monkeypatch):
    """load() switches a CPU model to the C decode attention; teacher-forced decoding gives SDPA's logits to fp32
    rounding, while prefill and a padded batch (which it hands to SDPA) give them exactly."""
    from gptqkit.cache import GrowingCache, cache_kwarg, output_cache
    from gptqkit.checkpoint import load

    model = load(stories_ckpt, kernel="avx2")  # fp32 activations: no int8 rounding to amplify differences
    assert model.config._attn_implementation == attention.NAME
    ids = torch.randint(3, model.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))

    def decode():
        with torch.no_grad():
            out = model(ids[:, :32], **{cache_kwarg(model): GrowingCache(model.config)}, use_cache=True)
            steps = [model(ids[:, t:t + 1], **{cache_kwarg(model): output_cache(out)}, use_cache=True).logits[0, -1]
                     for t in range(32, 96)]
            batch = torch.stack([ids[0, :40], ids[0, 40:80]])
            mask = torch.ones_like(batch)
            mask[1, :7] = 0  # left padding: a mask reaches the attention, so SDPA runs
            padded = model(batch, attention_mask=mask).logits
        return out.logits, torch.stack(steps), padded

    calls = []
    for fn in ("decode_attention", "rope_decode_attention"):  # the latter: gptqkit.fused's whole attention step
        c_fn = getattr(cpu_avx2, fn)
        monkeypatch.setattr(cpu_avx2, fn, lambda *a, c_fn=c_fn: calls.append(a[0].shape) or c_fn(*a))
    fast = decode()
    assert len(calls) == 64 * model.config.num_hidden_layers  # every decode step of every layer, nothing else
    model.set_attn_implementation("sdpa")
    ref = decode()
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[2], ref[2])
    assert (fast[1] - ref[1]).abs().max() < 1e-4 * ref[1].abs().max()
    assert (fast[1].argmax(-1) == ref[1].argmax(-1)).all()


def test_use_leaves_other_implementations(stories_dir):
    """Only SDPA models switch: an eager model keeps eager."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir, attn_implementation="eager")
    assert not attention.use(model) and model.config._attn_implementation == "eager"
