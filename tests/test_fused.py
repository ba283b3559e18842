"""gptqkit.fused: the C RMSNorm, silu(g) * u and rotary attention step against float64 and transformers' own
modules, and which modules use_norms() / use_mlps() / use_attention() swap."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptqkit import attention, fused
from gptqkit.cache import cache_kwarg
from gptqkit.kernels import cpu_avx2
from gptqkit.qlinear import QuantLinear
from conftest import random_model, rtn_checkpoint, stories_checkpoint

needs_avx2 = pytest.mark.skipif(isinstance(cpu_avx2.library(), str),
                                reason=f"avx2 kernel unavailable: {cpu_avx2.library()}")


def prefill_then_decode(model, ids, cache=None, prompt=32):
    """(logits of a `prompt`-token prefill, last logits of each following token of ids decoded one at a time), into
    `cache` (default a DynamicCache)."""
    from transformers.cache_utils import DynamicCache

    with torch.no_grad():
        cache = cache if cache is not None else DynamicCache(config=model.config)
        out = model(ids[:, :prompt], **{cache_kwarg(model): cache}, use_cache=True)
        steps = [model(ids[:, t:t + 1], **{cache_kwarg(model): cache}, use_cache=True).logits[0, -1]
                 for t in range(prompt, ids.shape[1])]
    return out.logits, torch.stack(steps)


def llama_norm64(x, w, eps):
    """transformers' Llama RMSNorm in float64 (the oracle for the float32 C function)."""
    x = x.double()
    return w.double() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@needs_avx2
@pytest.mark.parametrize("rows,K", [(1, 2048), (3, 576), (1, 100), (7, 24), (2, 5)])
def test_c_rms_norm_matches_the_formula(rows, K):
    g = torch.Generator().manual_seed(K)
    x = torch.randn(rows, K, generator=g) * 3
    w = torch.randn(K, generator=g)
    y = cpu_avx2.rms_norm(x, w, 1e-5)
    ref = llama_norm64(x, w, 1e-5)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ((y.double() - ref).abs() <= 4e-7 * ref.abs() + 1e-7).all()
    gemma = cpu_avx2.rms_norm(x, w, 1e-5, offset=True)  # Gemma's (x * r) * (1 + w)
    ref = llama_norm64(x, 1 + w.double(), 1e-5)
    assert ((gemma.double() - ref).abs() <= 4e-7 * ref.abs() + 1e-7).all()
    # a non-contiguous view normalises the same rows
    xt = torch.randn(K, rows, generator=g).T
    assert torch.equal(cpu_avx2.rms_norm(xt, w, 1e-5), cpu_avx2.rms_norm(xt.contiguous(), w, 1e-5))


@needs_avx2
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma"])
def test_use_swaps_rms_norms_and_keeps_outputs(arch):
    """Every RMSNorm of a Llama/Mistral/Qwen2/Gemma model is swapped (Gemma's with its 1 + w, found by the probe);
    the state dict is the same tensors; prefill gives the same logits exactly (many rows stay in torch) and decode
    rows agree to float32 rounding."""
    model = random_model(arch)
    for p in model.parameters():  # random but not all-ones norm weights
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    before = model.state_dict()
    n_norms = sum("RMSNorm" in type(m).__name__ for m in model.modules())
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = prefill_then_decode(model, ids)
    assert fused.use_norms(model) == n_norms == 2 * model.config.num_hidden_layers + 1
    assert sum(isinstance(m, fused.RMSNorm) for m in model.modules()) == n_norms
    assert {m.offset for m in model.modules() if isinstance(m, fused.RMSNorm)} == {arch == "gemma"}
    after = model.state_dict()
    assert after.keys() == before.keys() and all(after[k] is before[k] or torch.equal(after[k], before[k])
                                                 for k in before)
    fast = prefill_then_decode(model, ids)
    assert torch.equal(fast[0], ref[0])
    assert (fast[1] - ref[1]).abs().max() <= 1e-5 * ref[1].abs().max()
    assert fused.use_norms(model) == 0  # already swapped


def test_use_keeps_norms_that_compute_something_else():
    """LayerNorm fails the probe and keeps its class; so does a module that merely looks like a norm."""

    class Scale(nn.Module):  # one 1-D weight and an eps, but not a norm
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))
            self.eps = 1e-6

        def forward(self, x):
            return x * self.weight

    seq = nn.Sequential(nn.LayerNorm(8), Scale())
    assert fused.use_norms(seq) == 0 and type(seq[0]) is nn.LayerNorm and type(seq[1]) is Scale


def test_rms_norm_trains_its_weight():
    """A weight that requires grad takes torch's formula even for one row, so it gets its gradient."""
    ours = fused.RMSNorm(nn.Parameter(torch.rand(64) + 0.5), 1e-6)
    x = torch.randn(1, 1, 64)
    ours(x).sum().backward()
    ref = nn.Parameter(ours.weight.detach().clone())
    (ref * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))).sum().backward()
    assert ours.weight.grad is not None and torch.allclose(ours.weight.grad, ref.grad)


@needs_avx2
def test_c_calls_decline_mismatched_shapes():
    """Shapes the C functions would read or write past get None (the callers then run torch, which raises or
    broadcasts)."""
    assert cpu_avx2.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6) is None
    assert cpu_avx2.act_mul(torch.randn(2, 8), torch.randn(1, 8)) is None
    q, kv, cs, buf = torch.randn(64), torch.randn(32), torch.randn(16), torch.zeros(1, 2, 5, 16)
    ok = (q, kv, kv, cs, cs, buf, buf.clone(), 4, 0.25)
    assert cpu_avx2.rope_decode_attention(*ok) is not None
    for i, bad in [(1, torch.randn(16)), (0, torch.randn(40)), (3, torch.randn(8)), (6, torch.zeros(1, 2, 4, 16)),
                   (5, torch.zeros(2, 2, 5, 16)), (7, 5), (7, -1)]:
        args = list(ok)
        args[i] = bad
        assert cpu_avx2.rope_decode_attention(*args) is None, i


def test_rms_norm_other_dtypes_match_transformers():
    """bf16 input (and any call the C function does not take) runs transformers' formula itself: bit-equal."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(64, eps=1e-6)
    ref.weight.data.uniform_(0.5, 1.5)
    ours = fused.RMSNorm(ref.weight, 1e-6)
    for x in (torch.randn(2, 3, 64).bfloat16(), torch.randn(40, 64), torch.randn(1, 64, requires_grad=True)):
        assert torch.equal(ours(x), ref(x))


@needs_avx2
def test_load_swaps_the_norms(tmp_path_factory):
    """load() on CPU swaps the checkpoint model's norms, and generation still matches the unswapped model."""
    from gptqkit.checkpoint import load

    model = load(stories_checkpoint(tmp_path_factory), kernel="avx2")
    swapped = [m for m in model.modules() if isinstance(m, fused.RMSNorm)]
    assert len(swapped) == 2 * model.config.num_hidden_layers + 1
    ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model.generate(ids, max_new_tokens=24, do_sample=False)
        plain = load(stories_checkpoint(tmp_path_factory), kernel="avx2")
        for name, m in list(plain.named_modules()):
            if isinstance(m, fused.RMSNorm):  # back to the formula in torch, for every row count
                m.forward = lambda x, m=m: m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                                                        + m.variance_epsilon))
        slow = plain.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(fast, slow)


@needs_avx2
@pytest.mark.parametrize("n", [5632, 1536, 13, 7, 1])
def test_c_act_mul_matches_float64(n):
    g = torch.Generator().manual_seed(n)
    x, u = torch.randn(n, generator=g) * 6, torch.randn(n, generator=g)
    y = cpu_avx2.act_mul(x, u)
    ref = F.silu(x.double()) * u.double()
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ((y.double() - ref).abs() <= 4e-7 * ref.abs() + 1e-30).all()
    y = cpu_avx2.act_mul(x, u, "gelu_tanh")  # Gemma's
    xd = x.double()  # 0.5 x (1 + tanh z) = x sigmoid(2 z): float64 without tanh's cancellation near -1
    ref = xd * torch.sigmoid(2 * 0.7978845608028654 * (xd + 0.044715 * xd**3)) * u.double()
    # for negative x the float32 rounding of z grows |2 z|-fold in exp(2 z): up to 1.4e-6 relative at x ~ -4.5
    # (torch's own float32 formula loses every digit there, 1 + tanh(z) cancelling)
    assert ((y.double() - ref).abs() <= 3e-6 * ref.abs() + 1e-12).all()


@needs_avx2
def test_c_act_mul_extremes():
    """Past the exp's range: large positive g gives g * u, large negative 0, NaN stays NaN; a strided view works."""
    x = torch.tensor([90.0, 1e30, -89.0, -1e30, 0.0, float("nan"), 30.0, -30.0, 3.0])
    u = torch.full_like(x, 2.0)
    y = cpu_avx2.act_mul(x, u)
    assert y[0] == 180.0 and y[1] == 2e30 and y[2] == 0 and y[3] == 0 and y[4] == 0 and y[5].isnan()
    assert torch.allclose(y[6:], F.silu(x[6:]) * 2, rtol=4e-7, atol=0)
    wide = torch.randn(4, 16)
    assert torch.equal(cpu_avx2.act_mul(wide[:, ::2], wide[:, 1::2]),
                       cpu_avx2.act_mul(wide[:, ::2].contiguous(), wide[:, 1::2].contiguous()))
    y = cpu_avx2.act_mul(x, u, "gelu_tanh")  # tanh saturates: g * u and 0 at the ends, NaN stays NaN
    assert y[0] == 180.0 and y[1] == 2e30 and y[2] == 0 and y[3] == 0 and y[4] == 0 and y[5].isnan()
    assert torch.allclose(y[6:], F.gelu(x[6:], approximate="tanh") * 2, rtol=1e-6, atol=0)


@needs_avx2
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma"])
def test_use_swaps_gated_mlps_and_keeps_outputs(arch):
    """Every SiLU- or tanh-GELU-gated MLP (Gemma's) is swapped; the state dict is the same tensors; prefill gives the
    same logits exactly (32 rows stay in torch) and decode rows agree to float32 rounding."""
    model = random_model(arch)
    before = model.state_dict()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = prefill_then_decode(model, ids)
    assert fused.use_mlps(model) == model.config.num_hidden_layers
    assert all(type(layer.mlp) is fused.GatedMLP for layer in model.model.layers)
    assert {layer.mlp.act for layer in model.model.layers} == {"gelu_tanh" if arch == "gemma" else "silu"}
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    fast = prefill_then_decode(model, ids)
    assert torch.equal(fast[0], ref[0])
    assert (fast[1] - ref[1]).abs().max() <= 1e-5 * ref[1].abs().max()
    assert fused.use_mlps(model) == 0  # already swapped


def test_gated_mlp_trains_and_prefill_frees_in_place():
    """With autograd, the swapped MLP gives the unswapped one's gradients (no in-place op on saved tensors); without
    it, prefill rows (computed in place) give the same output exactly."""
    model = random_model("llama")
    mlp = model.model.layers[0].mlp
    new = fused._mlp_for(mlp)
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(2))
    grads = []
    for m in (mlp, new):
        model.zero_grad()
        m(x).square().sum().backward()
        grads.append([p.grad.clone() for p in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(new(x), mlp(x))


@pytest.mark.parametrize("use,arch", [("use_mlps", "gemma-erf"), ("use_mlps", "gpt2"), ("use_mlps", "opt"),
                                      ("use_attention", "gpt2"), ("use_attention", "opt"),
                                      ("use_attention", "gpt_neox")])
def test_use_keeps_other_modules(use, arch):
    """MLPs: a gate activation act_mul does not compute (exact GELU, erf) fails the activation probe; GPT-2's and
    OPT's MLPs have no gate. Attention: GPT-2's fused c_attn, OPT's out_proj without rotary and GPT-NeoX's
    query_key_value keep their class."""
    model = random_model(arch.partition("-")[0])
    if arch == "gemma-erf":
        for layer in model.model.layers:
            layer.mlp.act_fn = nn.GELU()
    kinds = [type(m) for m in model.modules()]
    assert getattr(fused, use)(model) == 0
    assert [type(m) for m in model.modules()] == kinds


@needs_avx2
def test_load_swaps_the_mlps(tmp_path_factory):
    """load() with the avx2 kernels swaps the checkpoint model's MLPs; greedy generation matches the same model
    with every product computed in torch."""
    from gptqkit.checkpoint import load

    model = load(stories_checkpoint(tmp_path_factory), kernel="avx2")
    assert sum(isinstance(m, fused.GatedMLP) for m in model.modules()) == model.config.num_hidden_layers
    ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model.generate(ids, max_new_tokens=24, do_sample=False)
        for m in model.modules():
            if isinstance(m, fused.GatedMLP):
                m.forward = m.reference
        slow = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(fast, slow)


def rope_attention64(q, k, v, cos, sin, keys, values, scale, kv=torch.float32):
    """The oracle of one rotary decode step: q [H, D], k, v [Hkv, D], cos, sin [D], keys, values [Hkv, T, D]
    (the cache so far) -> ([H, D] output in float64, k rotated by transformers' own function in float32); the
    rotated k is stored in a `kv` cache (rounded) before it is attended to."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    qr, kr = apply_rotary_pos_emb(q[None, :, None], k[None, :, None], cos[None, None], sin[None, None])
    qr, kr = qr[0, :, 0], kr[0, :, 0]
    # [H, T+1, D]
    K = torch.cat([keys, kr.to(kv).float()[:, None]], 1).double().repeat_interleave(q.shape[0] // k.shape[0], 0)
    V = torch.cat([values, v[:, None]], 1).double().repeat_interleave(q.shape[0] // k.shape[0], 0)
    p = torch.softmax(torch.einsum("hd,htd->ht", qr.double(), K) * scale, -1)
    return torch.einsum("ht,htd->hd", p, V), kr


@needs_avx2
@pytest.mark.parametrize("H,Hkv,D,T,kv", [(32, 4, 64, 0, torch.float32), (32, 4, 64, 300, torch.float32),
                                          (9, 3, 96, 17, torch.float32), (4, 4, 16, 5, torch.float32),
                                          (8, 2, 128, 1, torch.float32), (5, 5, 8, 2, torch.float32),
                                          (32, 4, 64, 300, torch.bfloat16), (9, 3, 96, 17, torch.bfloat16),
                                          (5, 5, 8, 2, torch.bfloat16)])
def test_c_rope_decode_attention_matches_the_formula(H, Hkv, D, T, kv):
    """The cache gets exactly the key transformers' apply_rotary_pos_emb gives, the value as it is, and the output
    is float64 attention over the cache and the new position, within float32 rounding. A bf16 cache gets them
    rounded as torch's .to(torch.bfloat16) rounds (what a bf16 cache's copy_ stores)."""
    g = torch.Generator().manual_seed(H * D + T)
    q, k, v = torch.randn(1, 1, H * D, generator=g), torch.randn(1, 1, Hkv * D, generator=g), \
        torch.randn(1, 1, Hkv * D, generator=g)
    ang = torch.rand(D // 2, generator=g) * 6
    cos, sin = torch.cat([ang, ang]).cos(), torch.cat([ang, ang]).sin()
    cap = T + 7
    kbuf, vbuf = torch.randn(1, Hkv, cap, D, generator=g).to(kv), torch.randn(1, Hkv, cap, D, generator=g).to(kv)
    keys, values = kbuf[0, :, :T].clone(), vbuf[0, :, :T].clone()
    out = cpu_avx2.rope_decode_attention(q, k, v, cos, sin, kbuf, vbuf, T, D ** -0.5)
    ref, kr = rope_attention64(q.view(H, D), k.view(Hkv, D), v.view(Hkv, D).to(kv).float(), cos, sin, keys.float(),
                               values.float(), D ** -0.5, kv)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert torch.equal(kbuf[0, :, T], kr.to(kv)) and torch.equal(vbuf[0, :, T], v.view(Hkv, D).to(kv))
    assert torch.equal(kbuf[0, :, :T], keys)  # earlier positions untouched
    assert ((out.view(H, D).double() - ref).abs() <= 2e-6 * ref.abs().max() + 1e-7).all()


def count_rope_calls(monkeypatch) -> list:
    calls = []
    real = cpu_avx2.rope_decode_attention
    monkeypatch.setattr(cpu_avx2, "rope_decode_attention", lambda *a: calls.append(a[7]) or real(*a))
    return calls


@needs_avx2
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma"])
def test_use_attention_swaps_and_keeps_outputs(arch, monkeypatch):
    """Every rotary attention module becomes a Decode subclass of its own class with the same state dict; prefill
    logits are equal, and each decoded token runs the C step in every layer, with the logits of transformers' SDPA
    to float32 rounding."""
    from gptqkit.cache import GrowingCache

    model = random_model(arch)
    if arch == "qwen2":  # q/k/v biases that matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.data.normal_()
    before = model.state_dict()
    classes = [type(layer.self_attn) for layer in model.model.layers]
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = prefill_then_decode(model, ids, GrowingCache(model.config))
    assert fused.use_attention(model) == model.config.num_hidden_layers
    assert attention.use(model)  # the step runs in a model switched to gptqkit's attention, as load() does
    for layer, cls in zip(model.model.layers, classes):
        assert isinstance(layer.self_attn, fused.DecodeAttention) and isinstance(layer.self_attn, cls)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(after[k].data_ptr() == before[k].data_ptr() for k in before)
    calls = count_rope_calls(monkeypatch)
    fast = prefill_then_decode(model, ids, GrowingCache(model.config))
    assert calls == [T for T in range(32, 40) for _ in model.model.layers]
    assert torch.equal(fast[0], ref[0])
    assert (fast[1] - ref[1]).abs().max() <= 1e-5 * ref[1].abs().max()
    assert fused.use_attention(model) == 0  # already swapped
    model.set_attn_implementation("sdpa")  # undoes the step with the C decode attention
    calls.clear()
    assert torch.equal(prefill_then_decode(model, ids, GrowingCache(model.config))[1], ref[1]) and not calls


@needs_avx2
def test_probes_hold_six_positions(monkeypatch):
    """The probes prefill 5 positions and decode a sixth: their caches hold 6 positions, not 5 + HEADROOM (on
    SmolLM2-135M the stack probe's two caches of 261 positions left ~11 MiB of heap in a loaded model)."""
    from gptqkit.cache import GrowingCache

    made = []

    class Recorded(GrowingCache):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(fused, "GrowingCache", Recorded)
    model = random_model("llama")
    assert fused.use_attention(model) == 2 and len(made) == 4
    caps = {layer._kbuf.shape[-2] for c in made for layer in c.layers if layer._kbuf is not None}
    assert caps == {6}


def test_attention_probe_allows_rounding_of_a_large_output():
    """The attention probe compares SDPA with the C step, whose sums run in another order. SmolLM2-135M's block 23
    gives outputs up to 109 that differ by up to 1.9e-5: within rounding, though an elementwise rtol fails on its
    small elements; it must be swapped (else all 30 blocks lose the one-call stack). A real difference must not pass."""
    ref = torch.tensor([108.7, -3.2, 0.004, -0.0007])
    assert fused._agree_to_rounding(ref + torch.tensor([0.0, 1e-6, 1.9e-5, -1.9e-5]), ref)
    assert not torch.allclose(ref + torch.tensor([0.0, 1e-6, 1.9e-5, -1.9e-5]), ref, rtol=1e-4, atol=1e-5)
    assert not fused._agree_to_rounding(ref * 1.01, ref)
    assert not fused._agree_to_rounding(ref + torch.tensor([0.0, 0.0, 0.01, 0.0]), ref)
    small = torch.tensor([0.02, -0.001])  # outputs below 1: the tolerance is the elementwise one with atol 1e-5
    assert fused._agree_to_rounding(small + 5e-6, small) and not fused._agree_to_rounding(small + 3e-5, small)


@needs_avx2
def test_use_attention_keeps_modules_the_probe_rejects():
    """Partial rotary (half of each head rotated, as Phi and GPT-NeoX do) computes something else: the probe's
    random cos and sin catch it and the module keeps its class."""
    from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

    class HalfRotary(LlamaAttention):
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kw):
            cos, sin = position_embeddings
            h = self.head_dim // 2
            half = (cos[..., :h // 2].repeat(1, 1, 2), sin[..., :h // 2].repeat(1, 1, 2))
            ones, zeros = torch.ones_like(cos[..., h:]), torch.zeros_like(sin[..., h:])
            full = (torch.cat([half[0], ones], -1), torch.cat([half[1], zeros], -1))
            return super().forward(hidden_states, full, attention_mask, past_key_values, **kw)

    model = random_model("llama")
    model.model.layers[0].self_attn = HalfRotary(model.config, 0)
    assert fused.use_attention(model) == 1
    assert type(model.model.layers[0].self_attn) is HalfRotary


@needs_avx2
def test_attention_step_stops_at_a_sliding_window(monkeypatch):
    """Past a sliding window the class's own forward (masked SDPA) runs; outputs stay those of the unswapped
    model."""
    from gptqkit.cache import GrowingCache

    model = random_model("mistral")
    model.config.sliding_window = 8
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    ref = prefill_then_decode(model, ids, GrowingCache(), prompt=4)  # no config: full-length GrowingLayers
    assert fused.use_attention(model) == 2 and attention.use(model)
    calls = count_rope_calls(monkeypatch)
    fast = prefill_then_decode(model, ids, GrowingCache(), prompt=4)
    assert 4 in calls and max(calls) < 8  # (the mask builder may already mask the last step inside the window)
    assert (fast[1] - ref[1]).abs().max() <= 1e-5 * ref[1].abs().max()


@needs_avx2
def test_swapped_attention_pickles():
    """The Decode classes are made at run time; a pickled model comes back with them and decodes the same."""
    import pickle

    from gptqkit.cache import GrowingCache

    model = random_model("llama")
    assert fused.use_attention(model) and attention.use(model)
    ids = torch.randint(0, 256, (1, 36), generator=torch.Generator().manual_seed(3))
    ref = prefill_then_decode(model, ids, GrowingCache(model.config))
    back = pickle.loads(pickle.dumps(model))
    assert all(type(a.self_attn) is type(b.self_attn) for a, b in zip(model.model.layers, back.model.layers))
    got = prefill_then_decode(back, ids, GrowingCache(back.config))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@needs_avx2
def test_attention_step_leaves_training_to_torch():
    """A one-token forward whose q/k/v need gradients runs the torch ops, so trainable adapters get theirs (here
    only q_proj trains: the layer's input needs no gradient, its output does)."""
    from gptqkit.cache import GrowingCache

    model = random_model("llama")
    assert fused.use_attention(model) and attention.use(model)
    model.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    cache = GrowingCache(model.config)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), **{cache_kwarg(model): cache}, use_cache=True)
    out = model(torch.tensor([[4]]), **{cache_kwarg(model): cache}, use_cache=True)
    out.logits.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@needs_avx2
def test_load_swaps_the_attention(tmp_path_factory, monkeypatch):
    """load() with the avx2 kernels swaps the checkpoint model's attention; greedy generation into a GrowingCache
    (what gptqkit's generate and bench pass) matches the same model with transformers' attention forward."""
    from gptqkit.cache import GrowingCache
    from gptqkit.checkpoint import load

    model = load(stories_checkpoint(tmp_path_factory), kernel="avx2")
    swapped = [m for m in model.modules() if isinstance(m, fused.DecodeAttention)]
    assert len(swapped) == model.config.num_hidden_layers
    ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    calls = count_rope_calls(monkeypatch)
    with torch.no_grad():
        fast = model.generate(ids, max_new_tokens=24, do_sample=False,
                               **{cache_kwarg(model): GrowingCache(model.config)})
        assert len(calls) == 23 * model.config.num_hidden_layers  # every token after the first, every layer
        for m in swapped:
            m.decode_step = lambda *a: None
        slow = model.generate(ids, max_new_tokens=24, do_sample=False,
                               **{cache_kwarg(model): GrowingCache(model.config)})
    assert torch.equal(fast, slow)


def _plain(model) -> None:
    """Put the DecodeStack and every DecodeLayer of model back to their own classes (what the C calls are compared
    with)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, fused.DecodeStack):
            cls, state = m.__reduce_ex__(2)[1]
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, fused._plain_copy(cls, state))
    for blocks in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
        for i, b in enumerate(blocks):
            if isinstance(b, fused.DecodeLayer):
                cls, state = b.__reduce_ex__(2)[1]
                blocks[i] = fused._plain_copy(cls, state)


def count_c_calls(monkeypatch) -> dict:
    """{"layer": [...], "stack": [...]}: one entry per cpu_avx2.decode_layer / decode_stack call from here on."""
    calls = {"layer": [], "stack": []}
    for kind in calls:
        real = getattr(cpu_avx2, f"decode_{kind}")
        monkeypatch.setattr(cpu_avx2, f"decode_{kind}", lambda *a, real=real, kind=kind: calls[kind].append(1)
                            or real(*a))
    return calls


@needs_avx2
@pytest.mark.parametrize("arch,whole", [("llama", True), ("mistral", True), ("qwen2", True), ("gemma", True)])
def test_load_runs_whole_blocks_in_one_c_call(tmp_path, monkeypatch, arch, whole):
    """Llama's, Mistral's, Qwen2's and Gemma's stacks run a decoded token in one C call (every block, then the norm;
    Qwen2's q/k/v biases added in C, Gemma's 1 + w norms and tanh-GELU gate) and give the per-module path's logits
    bit for bit."""
    from gptqkit.cache import GrowingCache
    from gptqkit.checkpoint import load

    ckpt = rtn_checkpoint(tmp_path, arch)
    calls = count_c_calls(monkeypatch)
    for kernel in ("avx2", "avx2-q8"):
        model = load(ckpt, kernel=kernel)
        blocks = [b for b in model.model.layers if isinstance(b, fused.DecodeLayer)]
        assert len(blocks) == (model.config.num_hidden_layers if whole else 0)
        assert all(isinstance(b, type(model.model.layers[0]).__bases__[1]) for b in blocks)
        assert isinstance(model.model, fused.DecodeStack) == whole
        assert isinstance(model.model, type(model.model).__bases__[-1])  # still the model's own stack class
        calls["layer"].clear(), calls["stack"].clear()
        ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(4))
        fast = prefill_then_decode(model, ids, GrowingCache(model.config))
        assert (len(calls["stack"]), len(calls["layer"])) == ((8, 0) if whole else (0, 0))
        _plain(model)
        assert not any(isinstance(m, (fused.DecodeStack, fused.DecodeLayer)) for m in model.modules())
        slow = prefill_then_decode(model, ids, GrowingCache(model.config))
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


@needs_avx2
def test_the_one_call_step_computes_rotary_on_one_torch_thread(tmp_path, two_threads):
    """The stack's step runs the rotary module with torch on one thread (its cos of a 128-wide row would open a
    parallel region whose OpenMP worker spins on the core the C call's worker needs) and restores the count."""
    from gptqkit.cache import GrowingCache
    from gptqkit.checkpoint import load

    model = load(rtn_checkpoint(tmp_path, "gemma"))
    assert isinstance(model.model, fused.DecodeStack)
    seen = []
    rotary = model.model.rotary_emb
    forward = rotary.forward
    rotary.forward = lambda *a, **k: seen.append(torch.get_num_threads()) or forward(*a, **k)
    ids = torch.randint(0, 256, (1, 34), generator=torch.Generator().manual_seed(6))
    prefill_then_decode(model, ids, GrowingCache(model.config))
    assert seen == [2, 1, 1] and torch.get_num_threads() == 2  # the prefill's own forward, then two one-call steps


@needs_avx2
def test_one_call_reads_biases_in_place_and_steps_aside_for_a_new_one(tmp_path, monkeypatch):
    """Qwen2's q/k/v biases are read where they are: an in-place change shows in the next one-call step. A bias
    replaced by another tensor (here float32, then bfloat16, as third-party checkpoints store them) makes the stack
    step aside to the per-module path until fused.refresh builds it again over the new one; every step equals the
    per-module path's bit for bit."""
    from gptqkit.cache import GrowingCache
    from gptqkit.checkpoint import load

    model = load(rtn_checkpoint(tmp_path, "qwen2"))
    calls = count_c_calls(monkeypatch)
    ids = torch.randint(0, 256, (1, 36), generator=torch.Generator().manual_seed(5))
    q = model.model.layers[1].self_attn.q_proj

    def both() -> tuple[torch.Tensor, int]:
        """(decoded logits, one-call steps taken), checked against the per-module path's logits"""
        calls["stack"].clear()
        fast = prefill_then_decode(model, ids, GrowingCache(model.config))[1]
        taken = len(calls["stack"])
        with monkeypatch.context() as m:
            m.setattr(fused.DecodeStack, "decode_step", lambda self, kw: None)
            m.setattr(fused.DecodeLayer, "decode_step", lambda self, *a: None)
            assert torch.equal(prefill_then_decode(model, ids, GrowingCache(model.config))[1], fast)
        return fast, taken

    base, n = both()
    assert n == 4
    with torch.no_grad():
        q.bias.mul_(3)
    moved, n = both()
    assert n == 4 and not torch.equal(moved, base)
    for dtype in (torch.float32, torch.bfloat16):
        q._buffers["bias"] = q.bias.to(dtype)
        stepped, n = both()
        assert n == 0
        assert fused.refresh(model) == model.config.num_hidden_layers
        again, n = both()
        assert n == 4 and torch.equal(again, stepped)


@needs_avx2
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_bit_widths_decode_in_one_c_call(tmp_path, monkeypatch, bits):
    """A 2-, 3- or 8-bit Llama runs on avx2-q8 like a 4-bit one: its stack takes one C call per decoded token, with
    the per-module path's logits bit for bit, and the reference kernel's within the int8 rounding of activations."""
    from gptqkit.cache import GrowingCache
    from gptqkit.checkpoint import load

    ckpt = rtn_checkpoint(tmp_path, "llama", bits)
    model = load(ckpt)
    assert {m.kernel.name for m in model.modules() if isinstance(m, QuantLinear)} == {"avx2-q8"}
    assert isinstance(model.model, fused.DecodeStack)
    calls = count_c_calls(monkeypatch)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(bits))
    fast = prefill_then_decode(model, ids, GrowingCache(model.config))
    assert (len(calls["stack"]), len(calls["layer"])) == (8, 0)
    _plain(model)
    slow = prefill_then_decode(model, ids, GrowingCache(model.config))
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    ref = prefill_then_decode(load(ckpt, kernel="torch"), ids, GrowingCache(model.config))
    for a, b in zip(fast, ref):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


@needs_avx2
def test_stack_leaves_the_c_call_where_its_forward_would_differ(tmp_path, monkeypatch):
    """The one C call per token steps aside, and the stack's own forward runs (its blocks each in their C call),
    for what it does not stand for: hidden states asked for (recorded as the class's forward records them), a
    padded position, a hook on the final norm, fewer blocks in the config, a sliding window's last position;
    transformers' generate() with its attention mask of ones takes it."""
    from gptqkit.cache import GrowingCache
    from gptqkit.checkpoint import load

    ckpt = rtn_checkpoint(tmp_path, "llama")
    model, plain = load(ckpt, kernel="avx2-q8"), load(ckpt, kernel="avx2-q8")
    _plain(plain)
    assert isinstance(model.model, fused.DecodeStack) and type(plain.model).__name__ == "LlamaModel"
    calls = count_c_calls(monkeypatch)
    name = cache_kwarg(model)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(6))

    def step(m, **kw):
        cache = GrowingCache(m.config)
        with torch.no_grad():
            m(ids[:, :10], **{name: cache}, use_cache=True)
            return m(ids[:, 10:11], **{name: cache}, use_cache=True, **kw)

    calls["stack"].clear()
    step(model, attention_mask=torch.tensor([[0] + [1] * 10]))
    assert not calls["stack"]
    step(model, attention_mask=torch.ones(1, 11, dtype=torch.long))
    assert len(calls["stack"]) == 1

    seen = []
    handle = model.model.norm.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    calls["stack"].clear()
    hooked = step(model)
    assert not calls["stack"] and len(seen) == 2 and torch.equal(hooked.logits, step(plain).logits)
    handle.remove()

    cache = GrowingCache(model.config)
    with torch.no_grad():
        model(ids[:, :10], **{name: cache}, use_cache=True)
        model.config.num_hidden_layers = 1  # the stack's own forward now runs only its first block
        calls["stack"].clear(), calls["layer"].clear()
        model(ids[:, 10:11], **{name: cache}, use_cache=True)
    assert not calls["stack"] and len(calls["layer"]) == 1
    model.config.num_hidden_layers = 2

    model.model._window = 10  # as a sliding window of 10: position 10 is past it
    calls["stack"].clear(), calls["layer"].clear()
    step(model)
    assert not calls["stack"] and len(calls["layer"]) == 2
    model.model._window = None

    calls["stack"].clear()
    with torch.no_grad():
        out = model.generate(ids[:, :8], max_new_tokens=4, do_sample=False, **{name: GrowingCache(model.config)})
        ref_out = plain.generate(ids[:, :8], max_new_tokens=4, do_sample=False,
                                 **{name: GrowingCache(plain.config)})
    assert len(calls["stack"]) == 3 and torch.equal(out, ref_out)

    ref = step(plain, output_hidden_states=True)
    calls["layer"].clear(), calls["stack"].clear()
    got = step(model, output_hidden_states=True)  # last: the recording hooks stay on the blocks from now on
    assert (len(calls["stack"]), len(calls["layer"])) == (0, 0)
    assert len(got.hidden_states) == len(ref.hidden_states) == 3
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, ref.hidden_states))
    assert torch.equal(got.logits, ref.logits)


@needs_avx2
def test_stack_checks_each_cache_once_and_holds_none(tmp_path, monkeypatch):
    """The stack checks a cache's buffers on its first token and keeps only weak references to them: the next
    tokens reuse the checks, a new cache (another capacity) is checked again, a dropped cache is freed, and a cache
    whose buffers stop agreeing (one layer's of another capacity) leaves the one C call for the blocks' own, with
    the per-module path's logits throughout."""
    import gc
    import weakref

    from gptqkit.cache import GrowingCache
    from gptqkit.checkpoint import load

    ckpt = rtn_checkpoint(tmp_path, "llama")
    model, plain = load(ckpt, kernel="avx2-q8"), load(ckpt, kernel="avx2-q8")
    _plain(plain)
    stack = model.model._stack
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(8))
    calls = count_c_calls(monkeypatch)
    first = GrowingCache(model.config)
    fast = prefill_then_decode(model, ids, first)
    assert len(calls["stack"]) == 8 and torch.equal(fast[1], prefill_then_decode(plain, ids, GrowingCache(
        plain.config))[1])
    assert [r() for r in stack.checked[0]] == [layer._kbuf for layer in first.layers]
    dropped = weakref.ref(first.layers[0]._kbuf)
    second = GrowingCache(model.config, length=45)
    fast = prefill_then_decode(model, ids, second)
    assert torch.equal(fast[1], prefill_then_decode(plain, ids, GrowingCache(plain.config, length=45))[1])
    assert [r() for r in stack.checked[1]] == [layer._vbuf for layer in second.layers]
    del first
    gc.collect()
    assert dropped() is None

    third, ref = GrowingCache(model.config, length=45), GrowingCache(plain.config, length=45)
    with torch.no_grad():
        model(ids[:, :32], **{cache_kwarg(model): third}, use_cache=True)
        plain(ids[:, :32], **{cache_kwarg(plain): ref}, use_cache=True)
        for cache in (third, ref):  # layer 1 moves into a buffer of 8 more positions, its contents kept
            layer = cache.layers[1]
            k, v = layer.keys, layer.values
            layer._kbuf = torch.cat([layer._kbuf, layer._kbuf[:, :, :8]], 2)
            layer._vbuf = torch.cat([layer._vbuf, layer._vbuf[:, :, :8]], 2)
            layer._kview = layer._vview = None
            assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
        calls["stack"].clear(), calls["layer"].clear()
        got = model(ids[:, 32:33], **{cache_kwarg(model): third}, use_cache=True).logits
        want = plain(ids[:, 32:33], **{cache_kwarg(plain): ref}, use_cache=True).logits
    assert len(calls["stack"]) == 1 and len(calls["layer"]) == 2 and torch.equal(got, want)


@needs_avx2
def test_bf16_cache_decodes_like_the_float32_one(tmp_path):
    """A GrowingCache in bf16 under the float32 model: the block's one C call and the per-module path agree bit for
    bit (the same roundings into the cache), prefill and decode logits are the float32 cache's within bf16's rounding
    of keys and values, and the cache holds half the bytes. kv_dtype() picks bf16 only where gptqkit's attention
    runs."""
    from gptqkit.cache import GrowingCache, kv_dtype
    from gptqkit.checkpoint import load

    model = load(rtn_checkpoint(tmp_path, "llama"), kernel="avx2-q8")
    assert kv_dtype(model) == torch.bfloat16
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(4))
    half, full = GrowingCache(model.config, dtype=torch.bfloat16), GrowingCache(model.config)
    fast, ref = prefill_then_decode(model, ids, half), prefill_then_decode(model, ids, full)
    assert all(a._kbuf.dtype == a._vbuf.dtype == torch.bfloat16 for a in half.layers)
    assert all(2 * a._kbuf.nbytes == b._kbuf.nbytes for a, b in zip(half.layers, full.layers))
    _plain(model)
    slow = prefill_then_decode(model, ids, GrowingCache(model.config, dtype=torch.bfloat16))
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    for a, b in zip(fast, ref):  # prefill too attends to what the cache returns: bf16 keys and values
        err = (a - b).abs().max() / b.abs().max()
        assert 0 < err < 2e-2, err
    model.set_attn_implementation("sdpa")
    assert kv_dtype(model) is None  # transformers' SDPA takes one dtype: the model's own cache


@needs_avx2
def test_a_changed_block_leaves_the_c_call(tmp_path, monkeypatch):
    """A hook on a projection, a replaced projection or another kernel: the block runs its parts as they are now."""
    from gptqkit.cache import GrowingCache
    from gptqkit.checkpoint import load
    from gptqkit.kernels import reference

    model = load(rtn_checkpoint(tmp_path, "llama"), kernel="avx2")
    calls = count_c_calls(monkeypatch)
    ids = torch.randint(0, 256, (1, 34), generator=torch.Generator().manual_seed(5))
    ref = prefill_then_decode(model, ids, GrowingCache(model.config))
    assert (len(calls["stack"]), len(calls["layer"])) == (2, 0)  # two steps, the whole stack in one call each
    block = model.model.layers[1]
    seen = []
    handle = block.mlp.down_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    calls["stack"].clear()
    got = prefill_then_decode(model, ids, GrowingCache(model.config))
    assert not calls["stack"]
    assert len(calls["layer"]) == 2 and len(seen) == 3  # block 0 in C; block 1 runs its parts: prefill and two steps
    assert torch.equal(got[1], ref[1])
    handle.remove()
    block.mlp.down_proj.use_kernel(reference)  # another kernel: the C calls no longer stand for it
    calls["layer"].clear()
    got = prefill_then_decode(model, ids, GrowingCache(model.config))
    assert not calls["stack"] and len(calls["layer"]) == 2
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-4)
    block.mlp.down_proj = nn.Linear(128, 64)  # replaced outright
    calls["layer"].clear()
    prefill_then_decode(model, ids, GrowingCache(model.config))
    assert not calls["stack"] and len(calls["layer"]) == 2


@needs_avx2
def test_stack_intact_reads_each_projection_state(tmp_path):
    """The stack's check reads each projection's kernel, plan and shared call from its own __dict__: a changed or
    missing one makes it fall back (False, no exception); restored, the C call stands again."""
    from gptqkit.checkpoint import load

    model = load(rtn_checkpoint(tmp_path, "llama"), kernel="avx2-q8")
    stack, proj = model.model, model.model.layers[1].self_attn.v_proj
    assert isinstance(stack, fused.DecodeStack) and stack.intact()
    for key in ("kernel", "_avx2_plan", "_avx2_shared"):
        value = proj.__dict__.pop(key)
        assert not stack.intact()
        proj.__dict__[key] = object()
        assert not stack.intact()
        proj.__dict__[key] = value
        assert stack.intact()
