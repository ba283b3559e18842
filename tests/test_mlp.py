"""gptqkit.mlp: the C silu(g) * u against float64, and which modules use() swaps."""

import pytest
import torch
import torch.nn.functional as F

from gptqkit import mlp
from gptqkit.kernels import cpu_avx2
from conftest import random_model, stories_checkpoint

needs_avx2 = pytest.mark.skipif(isinstance(cpu_avx2.library(), str),
                                reason=f"avx2 kernel unavailable: {cpu_avx2.library()}")


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
    from transformers.cache_utils import DynamicCache

    model = random_model(arch)
    before = model.state_dict()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))

    def run():
        with torch.no_grad():
            out = model(ids[:, :32], past_key_values=DynamicCache(config=model.config), use_cache=True)
            steps = [model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True).logits[0, -1]
                     for t in range(32, 40)]
        return out.logits, torch.stack(steps)

    ref = run()
    assert mlp.use(model) == model.config.num_hidden_layers
    assert all(type(layer.mlp) is mlp.GatedMLP for layer in model.model.layers)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    fast = run()
    assert torch.equal(fast[0], ref[0])
    assert (fast[1] - ref[1]).abs().max() <= 1e-5 * ref[1].abs().max()
    assert mlp.use(model) == 0  # already swapped


@pytest.mark.parametrize("arch", ["gemma", "gpt2", "opt"])
def test_use_keeps_other_mlps(arch):
    """Gemma's GELU-gated MLP fails the activation probe; GPT-2's and OPT's MLPs have no gate."""
    model = random_model(arch)
    kinds = [type(m) for m in model.modules()]
    assert mlp.use(model) == 0
    assert [type(m) for m in model.modules()] == kinds


@needs_avx2
def test_load_swaps_the_mlps(tmp_path_factory):
    """load() with the avx2 kernels swaps the checkpoint model's MLPs; greedy generation matches the same model
    with every product computed in torch."""
    from gptqkit.checkpoint import load

    model = load(stories_checkpoint(tmp_path_factory), kernel="avx2")
    assert sum(isinstance(m, mlp.GatedMLP) for m in model.modules()) == model.config.num_hidden_layers
    ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model.generate(ids, max_new_tokens=24, do_sample=False)
        for m in model.modules():
            if isinstance(m, mlp.GatedMLP):
                m.forward = m.reference
        slow = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(fast, slow)
