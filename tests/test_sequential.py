"""The layer-by-layer driver on every supported architecture (tiny random models built here) and the real
tiny Llama in the shared assets."""

import logging

import pytest
import torch

from conftest import random_model, random_samples
from gptqkit.config import QuantConfig
from gptqkit.qlinear import QuantLinear
from gptqkit.sequential import (UnsupportedModel, find_blocks, is_linear, pad_batches, quantize_model,
                                sequential_groups, capture_inputs)

ARCHS = ["llama", "mistral", "qwen2", "gemma", "gpt_neox", "opt", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_quantizes_and_runs(arch):
    model = random_model(arch)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    n_linear = sum(1 for _, b in enumerate(find_blocks(model)[1]) for m in b.modules() if is_linear(m))
    logs = quantize_model(model, random_samples(4, 32), QuantConfig(bits=4, group_size=32), progress=False)
    assert len(logs) == n_linear > 0
    qlayers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qlayers) == n_linear
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    # 4-bit keeps the model close to the original: most next-token choices agree
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.6, agree


def test_true_sequential_groups_follow_shared_inputs():
    model = random_model("llama")
    _, blocks = find_blocks(model)
    batches = pad_batches(random_samples(1, 16), 1)
    (hidden, kwargs, _), = capture_inputs(model, blocks, batches, "cpu")
    names = [n for n, m in blocks[0].named_modules() if is_linear(m)]
    groups = sequential_groups(blocks[0], names, hidden, kwargs)
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_gpt2_conv1d_groups():
    model = random_model("gpt2")
    _, blocks = find_blocks(model)
    (hidden, kwargs, _), = capture_inputs(model, blocks, pad_batches(random_samples(1, 16), 1), "cpu")
    names = [n for n, m in blocks[0].named_modules() if is_linear(m)]
    assert sequential_groups(blocks[0], names, hidden, kwargs) == [["attn.c_attn"], ["attn.c_proj"],
                                                                     ["mlp.c_fc"], ["mlp.c_proj"]]


def test_padding_never_enters_the_hessian():
    """Right-padded batches give the same quantized weights as the same texts one at a time."""
    samples = random_samples(3, 20, seed=3)
    samples[1] = {k: v[:, :11] for k, v in samples[1].items()}  # a shorter text
    # Without the clipping search: its argmin over 80 candidate ranges turns last-bit differences of the batched
    # matmuls into different grids, which is rounding noise, not padding.
    # fp32 forwards: on a CPU with native bf16 the default is bf16, whose batched-vs-single rounding differs too.
    cfg = QuantConfig(bits=4, group_size=32, mse=False)
    m1, m2 = random_model("llama"), random_model("llama")
    quantize_model(m1, samples, cfg, batch_size=1, progress=False, compute_dtype=torch.float32)
    quantize_model(m2, samples, cfg, batch_size=3, pad_id=7, progress=False, compute_dtype=torch.float32)
    q1 = {n: m.dequantize() for n, m in m1.named_modules() if isinstance(m, QuantLinear)}
    q2 = {n: m.dequantize() for n, m in m2.named_modules() if isinstance(m, QuantLinear)}
    for n in q1:  # equal up to float rounding of the batched matmuls
        assert (q1[n] != q2[n]).float().mean() < 0.01, n


def test_quantized_output_feeds_next_block_and_beats_rtn():
    model, rtn_model, ref = random_model("llama"), random_model("llama"), random_model("llama")
    samples = random_samples(8, 64, seed=5)
    quantize_model(model, samples, QuantConfig(bits=3, group_size=32), progress=False)
    quantize_model(rtn_model, samples, QuantConfig(bits=3, group_size=32, quant_method="rtn"), progress=False)
    ids = torch.cat([s["input_ids"] for s in random_samples(4, 64, seed=9)])
    with torch.no_grad():
        r, g, n = ref(ids).logits, model(ids).logits, rtn_model(ids).logits
    assert ((g - r) ** 2).mean() < ((n - r) ** 2).mean()


def test_group_members_share_one_hessian():
    """q/k/v read one tensor: one H for the three, equal to sum x x^T over the real (unpadded) tokens."""
    from gptqkit.sequential import _hessians, capture_inputs

    model = random_model("llama")
    samples = random_samples(3, 24, seed=2)
    samples[2] = {k: v[:, :9] for k, v in samples[2].items()}
    _, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks, pad_batches(samples, 2), "cpu")
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    H = _hessians(blocks[0], names, inputs, "cpu")
    assert H[names[0]] is H[names[1]] is H[names[2]]
    xs = []
    h = blocks[0].self_attn.k_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0]))
    with torch.no_grad():
        for hidden, kwargs, mask in inputs:
            blocks[0](hidden, **kwargs)
    h.remove()
    X = torch.cat([x[m.bool()] for x, (_, _, m) in zip(xs, inputs)])
    assert X.shape[0] == 24 + 24 + 9
    torch.testing.assert_close(H[names[0]], X.T @ X, rtol=1e-5, atol=1e-4)
    # a group whose members read different tensors keeps one H each
    H2 = _hessians(blocks[0], ["self_attn.o_proj", "mlp.down_proj"], inputs, "cpu")
    assert H2["self_attn.o_proj"] is not H2["mlp.down_proj"]


def test_rtn_reads_weights_only():
    """--method rtn runs no calibration forward and gives quant.rtn of each weight exactly."""
    from gptqkit.quant import rtn

    model, ref = random_model("llama"), random_model("llama")
    cfg = QuantConfig(bits=4, group_size=32, quant_method="rtn")
    calls = []
    _, blocks = find_blocks(model)
    for b in blocks:
        b.register_forward_pre_hook(lambda *a: calls.append(1))
    quantize_model(model, random_samples(4, 32, seed=1), cfg, progress=False)
    assert calls == []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            expect = rtn(ref.get_submodule(name).weight.detach(), cfg).dequantize()
            assert torch.equal(m.dequantize(), expect.T), name


def test_stories260k_unpackable_layers_stay_float_with_a_warning(stories_dir, tiny_texts, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptqkit.data import calibration_samples

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(stories_dir)
    samples = calibration_samples(tok, tiny_texts, nsamples=8, seqlen=128)
    cfg = QuantConfig(bits=4, group_size=32)
    with caplog.at_level(logging.WARNING):
        logs = quantize_model(model, samples, cfg, progress=False)
    assert "not multiples of 8" in caplog.text and "mlp.down_proj" in caplog.text
    blk = model.model.layers[0]
    assert isinstance(blk.self_attn.q_proj, QuantLinear)
    assert isinstance(blk.mlp.down_proj, torch.nn.Linear)  # 172 inputs: not packable at 4 bits
    assert "-:^model\\.layers\\.0\\.mlp\\.down_proj$" in cfg.dynamic
    assert len(logs) == 5 * 4


def test_no_blocks_is_a_clear_error():
    with pytest.raises(UnsupportedModel, match="no decoder blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_replayed_passes_give_the_same_codes_with_less_compute(arch):
    """Recorded outputs of final submodules stand in for recomputation: identical codes, fewer Linear calls."""
    samples = random_samples(8, 24, seed=4)
    cfg = QuantConfig(bits=4, group_size=32)
    runs = {}
    for budget in (0, None):
        model = random_model(arch)
        calls = []
        for n, m in model.named_modules():
            if is_linear(m) and ".0." in n:
                m.register_forward_pre_hook(lambda mod, a, n=n: calls.append(n))
        quantize_model(model, samples, cfg, progress=False, replay_budget=budget)
        codes = {n: m.qweight.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        runs[budget] = codes, len(calls)
    (c0, n0), (c1, n1) = runs[0], runs[None]
    assert c0.keys() == c1.keys() and all(torch.equal(c0[k], c1[k]) for k in c0)
    assert n1 < 0.65 * n0, (n0, n1)  # llama: 27 Linear calls per input become 14


def test_replay_respects_its_budget():
    from gptqkit.sequential import Replay

    model = random_model("llama")
    _, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks, pad_batches(random_samples(2, 16), 1), "cpu")
    names = [n for n, m in blocks[0].named_modules() if is_linear(m)]
    r = Replay(blocks[0], names, inputs, budget=10**9)
    r.solved.update(names[:3])  # q, k, v
    assert r._final() == names[:3]
    r.solved.update(names)
    assert r._final() == ["self_attn", "mlp"]
    small = Replay(blocks[0], names, inputs, budget=r.bytes["self_attn.q_proj"])
    small.solved.update(names[:3])
    with torch.no_grad(), small.run():
        for hidden, kwargs, _ in inputs:
            blocks[0](hidden, **kwargs)
    assert list(small.recorded) == ["self_attn.q_proj"]  # k and v would exceed the budget
    assert len(small.recorded["self_attn.q_proj"]) == 2


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=64), QuantConfig(bits=3, desc_act=True),
                                 QuantConfig(bits=4, group_size=64, quant_method="rtn")])
def test_a_layer_solved_in_row_blocks_gives_the_same_result(cfg, monkeypatch):
    """GPTQ treats each output row on its own given H, so solving 1000 rows 300 at a time (what bounds the memory of
    a large lm_head) gives the same codes, scales and zeros."""
    from torch import nn

    from gptqkit import sequential

    torch.manual_seed(0)
    lin = nn.Linear(256, 1000, bias=False)
    X = torch.randn(4000, 256) * torch.linspace(0.1, 3, 256)
    H = X.T @ X
    whole = sequential._solve(lin, H, cfg, "cpu", "x", [])
    monkeypatch.setattr(sequential, "SOLVE_BYTES", 4 * 256 * 300)
    logs = []
    blocks = sequential._solve(lin, H, cfg, "cpu", "x", logs)
    assert torch.equal(whole.codes, blocks.codes) and torch.equal(whole.scales, blocks.scales)
    assert torch.equal(whole.zeros, blocks.zeros) and torch.equal(whole.g_idx, blocks.g_idx)
    assert blocks.loss == pytest.approx(whole.loss, rel=1e-6) and logs[0].shape == (1000, 256)
