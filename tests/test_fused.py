"""gptqkit.fused: the C RMSNorm and silu(g) * u against float64 and transformers' own modules, and which modules
use_norms() / use_mlps() swap."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptqkit import fused
from gptqkit.kernels import cpu_avx2
from conftest import random_model, stories_checkpoint

needs_avx2 = pytest.mark.skipif(isinstance(cpu_avx2.library(), str),
                                reason=f"avx2 kernel unavailable: {cpu_avx2.library()}")


def prefill_then_decode(model, ids):
    """(logits of a 32-token prefill, last logits of each of the next 8 tokens decoded one at a time)."""
    from transformers.cache_utils import DynamicCache

    with torch.no_grad():
        out = model(ids[:, :32], past_key_values=DynamicCache(config=model.config), use_cache=True)
        steps = [model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True).logits[0, -1]
                 for t in range(32, 40)]
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
    # a non-contiguous view normalises the same rows
    xt = torch.randn(K, rows, generator=g).T
    assert torch.equal(cpu_avx2.rms_norm(xt, w, 1e-5), cpu_avx2.rms_norm(xt.contiguous(), w, 1e-5))


@needs_avx2
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_use_swaps_rms_norms_and_keeps_outputs(arch):
    """Every RMSNorm of a Llama/Mistral/Qwen2 model is swapped; the state dict is the same tensors; prefill gives
    the same logits exactly (many rows stay in torch) and decode rows agree to float32 rounding."""
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
    after = model.state_dict()
    assert after.keys() == before.keys() and all(after[k] is before[k] or torch.equal(after[k], before[k])
                                                 for k in before)
    fast = prefill_then_decode(model, ids)
    assert torch.equal(fast[0], ref[0])
    assert (fast[1] - ref[1]).abs().max() <= 1e-5 * ref[1].abs().max()
    assert fused.use_norms(model) == 0  # already swapped


def test_use_keeps_norms_that_compute_something_else():
    """Gemma's norm (x * (1 + w)) and LayerNorm fail the probe and keep their class; so does a module that merely
    looks like a norm."""
    model = random_model("gemma")
    kinds = {type(m) for m in model.modules() if "RMSNorm" in type(m).__name__}
    assert kinds and fused.use_norms(model) == 0
    assert {type(m) for m in model.modules() if "RMSNorm" in type(m).__name__} == kinds

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
    """Shapes the C functions would read past get None (the callers then run torch, which raises or broadcasts)."""
    assert cpu_avx2.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6) is None
    assert cpu_avx2.silu_mul(torch.randn(2, 8), torch.randn(1, 8)) is None


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
def test_c_silu_mul_matches_float64(n):
    g = torch.Generator().manual_seed(n)
    x, u = torch.randn(n, generator=g) * 6, torch.randn(n, generator=g)
    y = cpu_avx2.silu_mul(x, u)
    ref = F.silu(x.double()) * u.double()
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ((y.double() - ref).abs() <= 4e-7 * ref.abs() + 1e-30).all()


@needs_avx2
def test_c_silu_mul_extremes():
    """Past the exp's range: large positive g gives g * u, large negative 0, NaN stays NaN; a strided view works."""
    x = torch.tensor([90.0, 1e30, -89.0, -1e30, 0.0, float("nan"), 30.0, -30.0, 3.0])
    u = torch.full_like(x, 2.0)
    y = cpu_avx2.silu_mul(x, u)
    assert y[0] == 180.0 and y[1] == 2e30 and y[2] == 0 and y[3] == 0 and y[4] == 0 and y[5].isnan()
    assert torch.allclose(y[6:], F.silu(x[6:]) * 2, rtol=4e-7, atol=0)
    wide = torch.randn(4, 16)
    assert torch.equal(cpu_avx2.silu_mul(wide[:, ::2], wide[:, 1::2]),
                       cpu_avx2.silu_mul(wide[:, ::2].contiguous(), wide[:, 1::2].contiguous()))


@needs_avx2
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_use_swaps_gated_mlps_and_keeps_outputs(arch):
    """Every SiLU-gated MLP is swapped; the state dict is the same tensors; prefill gives the same logits exactly
    (32 rows stay in torch) and decode rows agree to float32 rounding."""
    model = random_model(arch)
    before = model.state_dict()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = prefill_then_decode(model, ids)
    assert fused.use_mlps(model) == model.config.num_hidden_layers
    assert all(type(layer.mlp) is fused.GatedMLP for layer in model.model.layers)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    fast = prefill_then_decode(model, ids)
    assert torch.equal(fast[0], ref[0])
    assert (fast[1] - ref[1]).abs().max() <= 1e-5 * ref[1].abs().max()
    assert fused.use_mlps(model) == 0  # already swapped


@pytest.mark.parametrize("arch", ["gemma", "gpt2", "opt"])
def test_use_keeps_other_mlps(arch):
    """Gemma's GELU-gated MLP fails the activation probe; GPT-2's and OPT's MLPs have no gate."""
    model = random_model(arch)
    kinds = [type(m) for m in model.modules()]
    assert fused.use_mlps(model) == 0
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
