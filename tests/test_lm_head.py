"""Quantizing the output layer (QuantConfig.lm_head, `gptqkit quantize --lm-head`): its Hessian is built from what
lm_head really reads, GPTQ beats round-to-nearest on it on real text, the checkpoint says so the way GPTQModel and
vLLM read it, a tied lm_head is untied, and an interrupted run resumes to the same bytes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import CORPORA, random_model
from gptqkit import sequential
from gptqkit.checkpoint import load
from gptqkit.cli import main
from gptqkit.config import QuantConfig
from gptqkit.kernels import cpu_avx2
from gptqkit.pipeline import load_source, quantize
from gptqkit.qlinear import QuantLinear
from gptqkit.quant import rtn
from gptqkit.sequential import UnsupportedModel, find_blocks, pad_batches, quantize_model

ARCHS = ["llama", "mistral", "qwen2", "gemma", "gpt_neox", "opt", "gpt2"]
TINY = CORPORA / "calibration" / "tiny.txt"


def _texts() -> list[str]:
    return [t for t in TINY.read_text().split("\n") if t.strip()]


def _head_inputs(model, batch: dict):
    """(last block's output, lm_head's input) of one full forward."""
    got = {}
    _, blocks = find_blocks(model)
    hooks = [blocks[-1].register_forward_hook(lambda m, a, out: got.__setitem__("block", out)),
             model.get_output_embeddings().register_forward_pre_hook(lambda m, a: got.__setitem__("head", a[0]))]
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return got["block"], got["head"]


@pytest.mark.parametrize("arch", ARCHS)
def test_head_hessian_is_built_from_what_lm_head_reads(arch):
    # Right-padded batches of unequal samples: padded positions must stay out, as in the blocks' Hessians.
    model = random_model(arch)
    g = torch.Generator().manual_seed(1)
    samples = [{"input_ids": torch.randint(0, 256, (1, T), generator=g), "attention_mask": torch.ones(1, T)}
               for T in (12, 7, 9, 4)]
    batches = pad_batches(samples, 2)
    prefix, blocks = find_blocks(model)
    outputs, ref = [], torch.zeros(64, 64)
    for b in batches:
        out, x = _head_inputs(model, b)
        as_tuple = isinstance(out, tuple)
        outputs.append((out[0] if as_tuple else out, None, b["attention_mask"]))
        x = x[b["attention_mask"].bool()]
        ref += x.T @ x
    head = model.get_output_embeddings()
    H = sequential._head_hessian(model, head, prefix, blocks, batches, outputs, "cpu", as_tuple)
    torch.testing.assert_close(H, ref, rtol=1e-5, atol=1e-4)
    assert model.get_submodule(prefix) is blocks  # the real blocks are back


def test_gptq_head_beats_rtn_on_held_out_text(stories_dir):
    model, tok = load_source(stories_dir)
    W = model.lm_head.weight.detach().clone()  # tied to the embedding in stories260K
    texts = _texts()
    samples = [dict(tok(t, return_tensors="pt")) for t in texts[:64]]
    cfg = QuantConfig(bits=4, group_size=32, lm_head=True)
    quantize_model(model, samples, cfg, progress=False)
    assert isinstance(model.lm_head, QuantLinear) and model.config.tie_word_embeddings is False
    torch.testing.assert_close(model.model.embed_tokens.weight, W, rtol=0, atol=0)  # the embedding stays dense
    # lm_head's inputs on held-out text, in windows of 256 tokens (the model's context is 512)
    ids = tok("\n".join(texts[300:400]), return_tensors="pt").input_ids
    X = torch.cat([_head_inputs(model, {"input_ids": ids[:, i:i + 256]})[1].reshape(-1, W.shape[1])
                   for i in range(0, ids.shape[1] - 256, 256)]).double()
    assert X.shape[0] > 5000
    err_gptq = (X @ (model.lm_head.dequantize().double() - W.T.double())).norm()
    err_rtn = (X @ (rtn(W, cfg).dequantize().T.double() - W.T.double())).norm()  # the same grid, MSE clipping
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)


def test_cli_writes_a_quantized_lm_head_that_loads(stories_dir, tmp_path, capsys):
    out = tmp_path / "q"
    args = ["--bits", "4", "--group-size", "32", "--dataset", str(TINY), "--nsamples", "8", "--seqlen", "128"]
    assert main(["-q", "quantize", str(stories_dir), str(out), *args, "--lm-head"]) == 0
    assert "quantized 21 layers" in capsys.readouterr().out  # 20 block Linears and lm_head
    conf = json.loads((out / "config.json").read_text())
    assert conf["quantization_config"]["lm_head"] is True and conf["tie_word_embeddings"] is False
    assert json.loads((out / "quantize_config.json").read_text())["lm_head"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"lm_head.qweight", "lm_head.qzeros", "lm_head.scales", "lm_head.g_idx"} <= keys
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lm_head_quantized"] is True

    ref = load(out, kernel="torch")
    assert isinstance(ref.lm_head, QuantLinear) and not hasattr(ref.lm_head, "weight")
    ids = torch.tensor([[1] + list(range(40, 80))])
    with torch.no_grad():
        want = ref(ids).logits
        if not isinstance(cpu_avx2.library(), str):  # the float32 C kernel: the decode path, lm_head included
            fast = load(out, kernel="avx2")
            assert fast.lm_head.kernel.name == "avx2"
            torch.testing.assert_close(fast(ids).logits, want, rtol=1e-4, atol=1e-4)  # prefill rows
            steps = [fast(ids[:, :k], logits_to_keep=1).logits for k in range(1, 4)]  # one-row lm_head calls
            torch.testing.assert_close(torch.cat(steps, 1), want[:, :3], rtol=1e-4, atol=1e-4)

    # What bench and generate load on CPU: the model computes in fp32, the untied embedding stays the checkpoint's
    # fp16 tensor (gptqkit.dense: rows are looked up in it where they lie), so its rows reach the model exactly.
    assert safe_open(str(out / "model.safetensors"), "pt").get_slice("model.embed_tokens.weight").get_dtype() == "F16"
    stored = load(out, kernel="torch", dense_dtype="bfloat16")
    assert stored.model.embed_tokens.weight.dtype == torch.float16 and isinstance(stored.lm_head, QuantLinear)
    assert stored.model.embed_tokens.rows is not None  # looked up in the file, not in its mapping
    with torch.no_grad():
        torch.testing.assert_close(stored(ids).logits, want, rtol=1e-4, atol=1e-4)

    # A tied config (another tool's) with a quantized lm_head: load must not tie a stray weight onto it.
    conf["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(conf))
    tied = load(out, kernel="torch")
    assert not hasattr(tied.lm_head, "weight") and "lm_head.weight" not in tied.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(tied(ids).logits, want, rtol=0, atol=0)


def test_interrupted_run_resumes_at_lm_head_to_the_same_bytes(stories_dir, tmp_path, monkeypatch):
    cfg = QuantConfig(bits=4, group_size=32, lm_head=True)
    kw = dict(dataset=_texts()[:16], nsamples=16, seqlen=64, progress=False)
    quantize(stories_dir, tmp_path / "ref", cfg, **kw)
    real = sequential._head_hessian

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sequential, "_head_hessian", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize(stories_dir, tmp_path / "out", cfg, **kw)
    work = tmp_path / "out.work"
    assert len(list(work.glob("block_*.json"))) == 5  # every block, not lm_head
    monkeypatch.setattr(sequential, "_head_hessian", real)
    quantize(stories_dir, tmp_path / "out", cfg, resume=True, **kw)
    assert not work.exists()
    for f in sorted((tmp_path / "ref").iterdir()):
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name


def test_an_output_layer_that_cannot_be_packed_is_refused_before_any_block():
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=250, hidden_size=64, intermediate_size=128,
                                                         num_hidden_layers=2, num_attention_heads=4))
    samples = [{"input_ids": torch.randint(0, 250, (1, 16)), "attention_mask": torch.ones(1, 16)}]
    with pytest.raises(UnsupportedModel, match=r"lm_head \(250x64\) cannot be packed at 4 bits.*without --lm-head"):
        quantize_model(model, samples, QuantConfig(lm_head=True, group_size=32), progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
