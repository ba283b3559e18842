"""gptqkit.finetune on the real stories260K model: LoRA on its GPTQ checkpoint (trains, keeps the codes, matches the
formula and the reference kernel's gradients, round-trips, and is used by the fused decode path), the adapter
merge into the floating-point model (against W + scaling * B @ A computed here, and its error cases), and partial
quantization (against the full run's codes) with the float tail fine-tuned on the quantized front."""

import hashlib
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gptqkit import finetune, fused
from gptqkit.cache import cache_for, cache_kwarg
from gptqkit.checkpoint import load, read_quant_config, save
from gptqkit.cli import main as cli
from gptqkit.config import QuantConfig
from gptqkit.data import calibration_samples
from gptqkit.inspect import inspect_checkpoint
from gptqkit.kernels import cpu_avx2
from gptqkit.pipeline import quantize
from gptqkit.qlinear import QuantLinear
from conftest import CORPORA, STORIES, random_model, rtn_checkpoint, stories_checkpoint

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, stories_dir):
    return stories_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def batch(ckpt, tiny_texts) -> torch.Tensor:
    """[8, 64] token ids: the first 64 tokens of eight real stories."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = [tok(t).input_ids[:64] for t in tiny_texts[:8]]
    assert all(len(i) == 64 for i in ids)
    return torch.tensor(ids)


def set_lora_b(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Random, non-zero lora_B weights (peft starts them at zero, where an adapter changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def quant_buffers(model: nn.Module) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    """(QuantLinear, copies of all its buffers: the checkpoint's and the kernel's derived ones) for each layer."""
    return [(m, {n: b.clone() for n, b in m.named_buffers()}) for m in model.modules() if isinstance(m, QuantLinear)]


def test_lora_trains_adapters_only_and_keeps_the_codes(ckpt, batch, one_thread_module):
    """Adapters on every QuantLinear (the default targets), only lora_ weights train, 25 AdamW steps on real stories
    take the loss below half its start, and every QuantLinear buffer is byte for byte what it was."""
    model = load(ckpt)
    assert finetune.quantized_names(model) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    before = quant_buffers(model)
    assert len(before) == 20  # 5 blocks x q/k/v/o (the 172-wide MLP stays dense)
    torch.manual_seed(0)
    pm = finetune.add_lora(model, r=8, alpha=16)

    wrapped = [m for m in pm.modules() if isinstance(m, finetune.QuantLoraLinear)]
    assert sorted(id(m.base_layer) for m in wrapped) == sorted(id(q) for q, _ in before)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(before) and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    pm.train()
    losses = []
    for _ in range(25):
        loss = pm(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # measured 1.19 -> 0.20 (an adapter that did not train, or a base output without its gradient, stays near 1.2)
    assert losses[-1] < 0.5 * losses[0], losses

    for q, bufs in before:
        now = dict(q.named_buffers())
        assert now.keys() == bufs.keys()
        assert all(now[n].dtype == b.dtype and torch.equal(now[n], b) for n, b in bufs.items())


def test_lora_gradients_match_the_reference_kernel(ckpt, batch, one_thread_module):
    """With inputs that need a gradient every QuantLinear takes its kernel's autograd path: the LoRA weights' and
    the input embeddings' gradients with the kernel load() picks equal those with the reference kernel."""
    grads, kernels_used = {}, {}
    for kernel in ("auto", "torch"):
        model = load(ckpt, kernel=kernel)
        kernels_used[kernel] = {m.kernel.name for m in model.modules() if isinstance(m, QuantLinear)}
        torch.manual_seed(0)
        pm = finetune.add_lora(model)
        set_lora_b(pm)
        emb = model.get_input_embeddings()(batch[:4]).detach().requires_grad_(True)
        pm(inputs_embeds=emb, labels=batch[:4]).loss.backward()
        grads[kernel] = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad} | {"embeddings": emb.grad}
    assert kernels_used["torch"] == {"torch"} and "torch" not in kernels_used["auto"]
    for n, ref in grads["torch"].items():
        assert ref.abs().max() > 0, n
        assert (grads["auto"][n] - ref).norm() <= 1e-5 * ref.norm(), n


def test_lora_layer_matches_the_formula(ckpt):
    """base(x) + scaling * x @ A^T @ B^T, the low-rank term in float64 here, on each path: decode rows (the C term),
    prefill rows (one addmm), and with a gradient (the torch formula); returned in x's dtype (bf16 too); with the
    adapter disabled exactly base(x)."""
    torch.manual_seed(0)
    pm = finetune.add_lora(load(ckpt), r=4, alpha=12)
    set_lora_b(pm, std=0.5)
    layer = pm.base_model.model.model.layers[1].self_attn.v_proj
    assert isinstance(layer, finetune.QuantLoraLinear) and layer.scaling["default"] == 3.0
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()  # [4, 64], [32, 4]
    for shape, grad in (((3, 20, 64), False), ((2, 5, 64), True), ((2, 5, 64), False)):  # x last: used below
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        with torch.set_grad_enabled(grad):
            base = layer.base_layer(x)
            y = layer(x)
        expected = base.double() + 3.0 * (x.double() @ A.T @ B.T)
        assert y.dtype == torch.float32 and y.shape == (*shape[:2], 32) and y.requires_grad == grad
        assert (y.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
        assert (y - base).abs().max() > 0.1 * base.abs().max()  # the adapter's term is not negligible here
    with torch.no_grad():

        xb = x.bfloat16()
        yb = layer(xb)
        expected_b = layer.base_layer(xb).double() + 3.0 * (xb.double() @ A.T @ B.T)
        assert yb.dtype == torch.bfloat16
        assert (yb.double() - expected_b).abs().max() <= 1e-2 * expected_b.abs().max()

        with pm.disable_adapter():
            assert torch.equal(layer(x), base)


def test_targets_and_refusals(ckpt, stories_dir):
    """Named nn.Linear targets get peft's own LoRA layer next to ours; a model without QuantLinear layers needs
    target_modules; DoRA on a QuantLinear is refused by name."""
    from transformers import AutoModelForCausalLM

    pm = finetune.add_lora(load(ckpt), target_modules=["q_proj", "gate_proj"])
    block = pm.base_model.model.model.layers[0]
    assert isinstance(block.self_attn.q_proj, finetune.QuantLoraLinear)
    assert isinstance(block.mlp.gate_proj, peft.tuners.lora.Linear)
    assert isinstance(block.self_attn.k_proj, QuantLinear)  # not targeted: left as it was
    dense = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    with pytest.raises(finetune.AdapterError, match="no QuantLinear layers"):
        finetune.add_lora(dense)
    dora = finetune._lora_config(peft, r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(finetune.AdapterError, match="plain LoRA only"):
        peft.get_peft_model(load(ckpt), dora)


def test_merge_into_codes_refuses_and_names_the_fix(ckpt):
    torch.manual_seed(0)
    pm = finetune.add_lora(load(ckpt))
    with pytest.raises(finetune.AdapterError, match="merge_adapter.*then quantize"):
        pm.merge_and_unload()
    with pytest.raises(finetune.AdapterError, match="floating-point base model"):
        pm.base_model.model.model.layers[0].self_attn.q_proj.merge()


def test_adapter_round_trip(ckpt, batch, tmp_path, one_thread_module):
    """A trained adapter saved with save_pretrained and loaded onto a freshly loaded checkpoint gives the trained
    PeftModel's logits exactly; it loads frozen unless asked to be trainable."""
    torch.manual_seed(0)
    pm = finetune.add_lora(load(ckpt))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = pm(input_ids=batch[:4], labels=batch[:4]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        ref = pm(input_ids=batch).logits
        loaded = finetune.load_lora(load(ckpt), tmp_path / "adapter")
        assert sum(isinstance(m, finetune.QuantLoraLinear) for m in loaded.modules()) == 20
        assert not any(p.requires_grad for p in loaded.parameters())
        got = loaded(input_ids=batch).logits
        with loaded.disable_adapter():
            plain = loaded(input_ids=batch).logits
    assert torch.equal(got, ref)
    assert (got - plain).abs().max() > 1e-2  # the adapter trained away from zero: the comparison means something
    trainable = finetune.load_lora(load(ckpt), tmp_path / "adapter", is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("which", ["stories", "all-quantized"])
def test_fused_decode_uses_the_adapter(which, ckpt, tmp_path, monkeypatch, one_thread_module):
    """With a non-zero adapter, a one-token step into gptqkit's KV cache gives the full-sequence forward's logits
    at that position (both with the adapter), and both differ clearly from the model's without it. On stories260K
    the step runs the fused C attention step (DecodeAttention) through the LoRA-wrapped q/k/v/o; on a model whose
    blocks and stack run in one C call, add_lora builds that call again with the adapter's terms in it, and the
    per-module path (the wrappers' own C term) gives the same bits. After peft's unload() the blocks run their own
    forward until fused.refresh builds the plain call again."""
    path = ckpt if which == "stories" else rtn_checkpoint(tmp_path, "llama")
    calls = {"decode_layer": 0, "decode_stack": 0, "rope_decode_attention": 0}
    for fn in calls:
        real = getattr(cpu_avx2, fn)
        monkeypatch.setattr(cpu_avx2, fn, lambda *a, real=real, fn=fn: calls.__setitem__(fn, calls[fn] + 1)
                            or real(*a))
    model = load(path)
    avx2 = not isinstance(cpu_avx2.library(), str)
    blocks = model.model.layers
    if avx2:
        assert all(isinstance(b.self_attn, fused.DecodeAttention) for b in blocks)
        assert isinstance(model.model, fused.DecodeStack) == (which == "all-quantized")
    name = cache_kwarg(model)
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))

    def full_and_step(m) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(last logits of a 9-token forward, of the 9th token decoded after an 8-token prefill, C calls in that
        step)"""
        with torch.no_grad():
            full = m(input_ids=ids).logits[0, -1]
            cache = cache_for(model, "auto", ids.shape[1])
            m(input_ids=ids[:, :8], **{name: cache}, use_cache=True)
            seen = dict(calls)
            step = m(input_ids=ids[:, 8:], **{name: cache}, use_cache=True).logits[0, -1]
        return full, step, {k: calls[k] - seen[k] for k in calls}

    full0, step0, calls0 = full_and_step(model)
    torch.manual_seed(0)
    pm = finetune.add_lora(model)
    set_lora_b(pm)
    full1, step1, calls1 = full_and_step(pm)
    scale = full1.abs().max()
    # bf16 KV cache and int8 decode activations: measured within 0.3-0.7% of the largest logit
    assert (step0 - full0).abs().max() <= 2e-2 * full0.abs().max()
    assert (step1 - full1).abs().max() <= 2e-2 * scale
    # the adapter moves the logits by 27% (stories) / 150% (random Llama) of the largest
    assert (full1 - full0).abs().max() > 0.1 * scale and (step1 - step0).abs().max() > 0.1 * scale
    if avx2:
        n = len(blocks)
        if which == "stories":  # MLPs dense: no whole-block call; the attention step runs in C either way
            assert calls0 == calls1 == {"decode_layer": 0, "decode_stack": 0, "rope_decode_attention": n}
        else:  # one call for the stack, without the adapter and with it
            assert calls0 == calls1 == {"decode_layer": 0, "decode_stack": 1, "rope_decode_attention": 0}
            stack, layer = fused.DecodeStack.decode_step, fused.DecodeLayer.decode_step
            monkeypatch.setattr(fused.DecodeStack, "decode_step", lambda self, kw: None)
            monkeypatch.setattr(fused.DecodeLayer, "decode_step", lambda self, *a: None)
            _, per_module, calls = full_and_step(pm)  # each wrapper's own C term (cpu_avx2.lora_add)
            assert torch.equal(per_module, step1) and calls["rope_decode_attention"] == n
            monkeypatch.setattr(fused.DecodeStack, "decode_step", stack)
            monkeypatch.setattr(fused.DecodeLayer, "decode_step", layer)
    # unload() puts the QuantLinears back where they were: the same outputs as before the adapter
    model = pm.unload()
    full2, step2, calls2 = full_and_step(model)
    assert torch.equal(full2, full0) and torch.equal(step2, step0)
    if avx2 and which == "all-quantized":  # the call built over the wrappers steps aside; refresh builds it again
        assert calls2 == {"decode_layer": 0, "decode_stack": 0, "rope_decode_attention": len(blocks)}
        assert fused.refresh(model) == len(blocks)
        full2, step2, calls2 = full_and_step(model)
        assert torch.equal(step2, step0)
    assert calls2 == calls0


@pytest.mark.skipif(isinstance(cpu_avx2.library(), str), reason="the one-call decode path needs the avx2 build")
def test_fused_adapter_call_follows_the_adapter(tmp_path, monkeypatch, one_thread_module):
    """The one C call built over LoRA wrappers reads A and B in place (an in-place update counts) and steps aside
    whenever its terms are no longer the wrappers' own: adapters disabled, a scaling changed, a dropout training, a
    gradient wanted. Each step it takes equals the per-module path's, and each step it leaves does too."""
    model = load(rtn_checkpoint(tmp_path, "llama"))
    calls = {"decode_stack": 0}
    real = cpu_avx2.decode_stack
    monkeypatch.setattr(cpu_avx2, "decode_stack", lambda *a: calls.__setitem__("decode_stack", calls["decode_stack"]
                                                                                + 1) or real(*a))
    name = cache_kwarg(model)
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    pm = finetune.add_lora(model, dropout=0.1)
    set_lora_b(pm)
    pm.eval()

    def step(grad: bool = False) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(the 9th token's logits after an 8-token prefill, stack calls in that step, the same step with the
        one-call blocks and stack stepping aside)"""
        out = []
        for fused_on in (True, False):
            if not fused_on:
                monkeypatch.setattr(fused.DecodeStack, "decode_step", lambda self, kw: None)
                monkeypatch.setattr(fused.DecodeLayer, "decode_step", lambda self, *a: None)
            with torch.set_grad_enabled(grad):
                cache = cache_for(model, "auto", 9)
                model(input_ids=ids[:, :8], **{name: cache}, use_cache=True)
                before = calls["decode_stack"]
                out += [model(input_ids=ids[:, 8:], **{name: cache}, use_cache=True).logits[0, -1].detach(),
                        calls["decode_stack"] - before]
        monkeypatch.undo()
        monkeypatch.setattr(cpu_avx2, "decode_stack", lambda *a: calls.__setitem__(
            "decode_stack", calls["decode_stack"] + 1) or real(*a))
        assert torch.equal(out[0], out[2])
        return out[0], out[1], out[2]

    base, n, _ = step()
    assert n == 1
    wrappers = [m for m in model.modules() if hasattr(m, "decode_guard")]
    with torch.no_grad():
        wrappers[3].lora_B["default"].weight.mul_(3)  # in place: the same call, the new values
    moved, n, _ = step()
    assert n == 1 and not torch.equal(moved, base)
    with pm.disable_adapter():
        off, n, _ = step()
    assert n == 0
    assert step()[1] == 1  # on again
    wrappers[5].scaling["default"] *= 2
    scaled, n, _ = step()
    assert n == 0 and not torch.equal(scaled, moved)
    wrappers[5].scaling["default"] /= 2
    assert torch.equal(step()[0], moved)  # the same scale again: the call runs and gives the same bits
    # adapters that train (their weights need a gradient): the torch formula over the layers' autograd path (W
    # dequantized, activations not rounded to int8), within the int8 rounding's 2% of the one-call step
    trained, n, _ = step(grad=True)
    assert n == 0 and (trained - moved).abs().max() <= 2e-2 * moved.abs().max()
    pm.train()  # dropout 0.1 on: the wrappers' own forward, dropout and all
    with torch.no_grad():
        cache = cache_for(model, "auto", 9)
        model(input_ids=ids[:, :8], **{name: cache}, use_cache=True)
        before = calls["decode_stack"]
        model(input_ids=ids[:, 8:], **{name: cache}, use_cache=True)
    assert calls["decode_stack"] == before
    pm.eval()
    assert step()[1] == 1


@pytest.mark.skipif(isinstance(cpu_avx2.library(), str), reason="the one-call decode path needs the avx2 build")
@pytest.mark.parametrize("arch", ["qwen2", "gemma"])
def test_adapter_terms_follow_biases_and_gemma_parts_in_the_one_call(arch, tmp_path, monkeypatch):
    """With Qwen2's q/k/v biases (the term comes after the bias, as in the wrapper: base(x) + term) and Gemma's own
    norms and gate, the stack built over LoRA wrappers decodes in one call per token, the per-module path's bits."""
    from gptqkit.cache import GrowingCache

    model = load(rtn_checkpoint(tmp_path, arch))
    torch.manual_seed(0)
    pm = finetune.add_lora(model)
    set_lora_b(pm)
    calls = []
    real = cpu_avx2.decode_stack
    monkeypatch.setattr(cpu_avx2, "decode_stack", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    name = cache_kwarg(model)

    def steps() -> torch.Tensor:
        with torch.no_grad():
            cache = GrowingCache(model.config)
            model(input_ids=ids[:, :8], **{name: cache}, use_cache=True)
            return torch.stack([model(input_ids=ids[:, t:t + 1], **{name: cache}, use_cache=True).logits[0, -1]
                                for t in range(8, 12)])

    fast = steps()
    assert len(calls) == 4
    monkeypatch.setattr(fused.DecodeStack, "decode_step", lambda self, kw: None)
    monkeypatch.setattr(fused.DecodeLayer, "decode_step", lambda self, *a: None)
    assert torch.equal(steps(), fast) and len(calls) == 4


# ------------------------------------------------------------------------------------------------ merge


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def test_merge_adapter_into_the_dense_model(stories_dir, tmp_path, one_thread_module):
    """Each targeted Linear becomes W + scaling * B @ A (from the saved adapter's own tensors), the others keep
    their weights, no peft module remains, the logits are the unmerged PeftModel's, and the source folder's files
    are unchanged."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hashes = file_hashes(stories_dir)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)  # A and B both random: a non-zero update
    pm = peft.get_peft_model(base, config)
    pm.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits

    fresh = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    merged = finetune.merge_adapter(fresh, tmp_path / "adapter")

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    scaling = saved["lora_alpha"] / saved["r"]
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    targets = sorted(k[len("base_model.model."):-len(".lora_A.weight")] for k in tensors if ".lora_A." in k)
    assert len(targets) == 15  # 5 blocks x q_proj, v_proj, down_proj
    after = dict(merged.named_parameters())
    for t in targets:
        A, B = tensors[f"base_model.model.{t}.lora_A.weight"], tensors[f"base_model.model.{t}.lora_B.weight"]
        W = before[f"{t}.weight"].double()
        expected = W + scaling * (B.double() @ A.double())  # [N, K] = [N, r] @ [r, K]
        assert (expected - W).abs().max() > 1e-3  # the update is not negligible
        torch.testing.assert_close(after[f"{t}.weight"].double(), expected, rtol=1e-6, atol=1e-6)
    untouched = [n for n in before if n.removesuffix(".weight") not in targets]
    assert len(untouched) == len(before) - 15 and all(torch.equal(after[n], before[n]) for n in untouched)

    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert file_hashes(stories_dir) == hashes


def test_merge_adapter_errors(stories_dir, ckpt, tmp_path, monkeypatch):
    """A missing folder, a folder without adapter_config.json or without weights, a quantized model, an adapter for
    modules the model does not have, and no peft: each a clear error that names the fix."""
    from transformers import AutoModelForCausalLM

    def dense():
        return AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)

    with pytest.raises(FileNotFoundError, match="does not exist.*save_pretrained"):
        finetune.merge_adapter(dense(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(finetune.AdapterError, match="no adapter_config.json.*save_pretrained"):
        finetune.merge_adapter(dense(), tmp_path / "empty")

    torch.manual_seed(0)
    good = tmp_path / "good"
    peft.get_peft_model(dense(), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(good)
    with pytest.raises(finetune.AdapterError, match="floating-point base model.*then quantize"):
        finetune.merge_adapter(load(ckpt), good)

    gpt2 = tmp_path / "gpt2"
    config = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)  # GPT-2's Conv1D holds [K, N]
    peft.get_peft_model(random_model("gpt2"), config).save_pretrained(gpt2)
    with pytest.raises(finetune.AdapterError, match="targets modules this model does not have"):
        finetune.merge_adapter(dense(), gpt2)

    (good / "adapter_model.safetensors").unlink()
    with pytest.raises(finetune.AdapterError, match="no adapter weights"):
        finetune.merge_adapter(dense(), good)

    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed: `import peft` fails
    with pytest.raises(ImportError, match=r"pip install 'gptqkit\[peft\]'"):
        finetune.merge_adapter(dense(), gpt2)


# ------------------------------------------------------------------ partial quantization and tail fine-tuning


def calibration_lines() -> list[str]:
    """stories_checkpoint's calibration texts."""
    return [t for t in (CORPORA / "calibration" / "tiny.txt").read_text().split("\n") if t.strip()][:64]


def quantize_first(k: int, out: Path, bits: int = 4) -> Path:
    """stories260K with only its first k blocks quantized (g32), calibrated as stories_checkpoint."""
    return quantize(STORIES, out, QuantConfig(bits=bits, group_size=32), dataset=calibration_lines(), nsamples=16,
                    seqlen=128, progress=False, first_blocks=k).out


def stories(tok, first: int, last: int) -> list[dict]:
    paragraphs = (CORPORA / "calibration" / "tiny.txt").read_text().split("\n\n")
    texts = [s.strip() for s in paragraphs if len(s.strip()) > 200]
    return calibration_samples(tok, texts[first:last], nsamples=last - first, seqlen=256)


def test_first_blocks_are_the_full_runs_first_blocks(tmp_path_factory, tmp_path, caplog):
    """quantize(first_blocks=3) gives blocks 0-2 the codes of a run over all 5 (a block's solve sees only the blocks
    before it), keeps blocks 3-4 as the source's weights, says so in one dynamic rule that load() and inspect read,
    and never runs blocks 3-4."""
    from safetensors.torch import load_file

    with caplog.at_level(logging.INFO, logger="gptqkit.sequential"):
        part = quantize_first(3, tmp_path / "part")
    assert any("blocks 3-4 have nothing to quantize" in r.getMessage() for r in caplog.records)
    full = load_file(str(stories_checkpoint(tmp_path_factory) / "model.safetensors"))
    got, src = load_file(str(part / "model.safetensors")), load_file(str(STORIES / "model.safetensors"))
    for i in range(5):
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
            key = f"model.layers.{i}.{n}"
            if i < 3:
                for b in ("qweight", "qzeros", "scales", "g_idx"):
                    assert torch.equal(got[f"{key}.{b}"], full[f"{key}.{b}"]), f"{key}.{b}"
                assert f"{key}.weight" not in got
            else:
                w = got[f"{key}.weight"]
                assert f"{key}.qweight" not in got and torch.equal(w, src[f"{key}.weight"].to(w.dtype)), key
    cfg, _ = read_quant_config(part)
    unpackable = {f"-:^model\\.layers\\.{i}\\.mlp\\.{n}_proj$": {} for i in range(3) for n in ("gate", "up", "down")}
    assert cfg.dynamic == {r"-:^model\.layers\.(3|4)\.": {}, **unpackable}
    assert len(inspect_checkpoint(part)["dynamic_skipped"][r"-:^model\.layers\.(3|4)\."]) == 14  # 7 Linears x 2
    model = load(part, kernel="torch")
    assert isinstance(model.model.layers[2].self_attn.q_proj, QuantLinear)
    assert type(model.model.layers[3].self_attn.q_proj) is nn.Linear


def test_first_blocks_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="first_blocks=0 is invalid"):
        quantize(STORIES, tmp_path / "a", dataset=["a b c d e f"], first_blocks=0)
    with pytest.raises(ValueError, match="the model has 5 decoder blocks; give 1 to 5"):
        quantize(STORIES, tmp_path / "b", dataset=["a b c d e f"], first_blocks=6)
    assert not list(tmp_path.iterdir())


def test_tail_fine_tuning_recovers_held_out_loss(tmp_path, one_thread_module):
    """First three blocks at 2 bits, then 40 AdamW steps on the float tail (blocks 3-4, the final norm and the tied
    lm_head): the held-out loss on real stories drops, the quantized blocks do not change, and the tuned model saves
    as a GPTQ checkpoint that loads back to the same logits."""
    from transformers import AutoTokenizer

    part = quantize_first(3, tmp_path / "part", bits=2)
    tok = AutoTokenizer.from_pretrained(part)
    model = load(part, dense_dtype=torch.float32)
    front = {k: v.clone() for k, v in model.state_dict().items() if any(f".layers.{i}." in k for i in range(3))}
    params = finetune.tail_parameters(model)
    names = [n for n, _ in params]
    assert {n.split(".")[2] for n in names if ".layers." in n} == {"3", "4"}
    assert "model.norm.weight" in names and "model.embed_tokens.weight" in names  # the lm_head is tied to it
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in names)
    assert all(p.dtype == torch.float32 and p.requires_grad for _, p in params)
    held = stories(tok, 48, 64)

    def held_out_loss() -> float:
        with torch.no_grad():
            return sum(model(input_ids=s["input_ids"], labels=s["input_ids"]).loss.item() for s in held) / len(held)

    before = held_out_loss()
    losses = finetune.train(model, stories(tok, 0, 48), [p for _, p in params], steps=40, lr=3e-4, progress=False)
    after = held_out_loss()
    assert len(losses) == 40 and after < before - 0.03, (before, after)  # measured 1.935 -> 1.848
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in front.items())

    out = save(model, tmp_path / "tuned", read_quant_config(part)[0], tok, dtype=torch.float32, source=part)
    again = load(out, dense_dtype=torch.float32)
    ids = held[0]["input_ids"]
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)


def test_tail_parameters_of_a_fully_quantized_model(ckpt, stories_dir):
    """Every block quantized: only the final norm (and the tied lm_head when asked) follows them."""
    from transformers import AutoModelForCausalLM

    assert [n for n, _ in finetune.tail_parameters(load(ckpt), head=False)] == ["model.norm.weight"]
    with pytest.raises(ValueError, match="no quantized block"):
        finetune.tail_parameters(AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32))


def test_finetune_command(tmp_path, capsys):
    """`gptqkit finetune` on a file of texts: the tail variant writes a checkpoint with the same quantized tensors,
    the --lora variant an adapter that load_lora() puts back; an existing non-empty OUT is refused."""
    from safetensors.torch import load_file

    part = quantize_first(4, tmp_path / "part")
    texts = tmp_path / "texts.txt"
    texts.write_text((CORPORA / "calibration" / "tiny.txt").read_text()[:20000])
    args = ["-q", "finetune", str(part), "--dataset", str(texts), "--nsamples", "8", "--seqlen", "64", "--steps",
            "4", "--lr", "1e-3"]
    assert cli([*args[:2], *args[2:3], str(tmp_path / "tuned"), *args[3:]]) == 0
    assert "training loss" in capsys.readouterr().out
    a, b = load_file(str(part / "model.safetensors")), load_file(str(tmp_path / "tuned" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if k.rpartition(".")[2] in ("qweight", "qzeros", "scales"))
    assert not torch.equal(a["model.layers.4.mlp.down_proj.weight"], b["model.layers.4.mlp.down_proj.weight"])
    assert cli([*args[:2], *args[2:3], str(tmp_path / "adapter"), *args[3:], "--lora", "4"]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert finetune.load_lora(load(part), tmp_path / "adapter") is not None
    assert cli([*args[:2], *args[2:3], str(tmp_path / "tuned"), *args[3:]]) == 2  # not empty, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli([*args[:2], *args[2:3], str(tmp_path / "adapter"), *args[3:], "--lora", "4", "--overwrite"]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "part", "texts.txt", "tuned"]  # no leftovers


def test_quantize_merges_an_adapter_first(stories_dir, tmp_path):
    """quantize(adapter=...) quantizes the merged model: its codes are those of quantizing a model merged by hand,
    and differ from the plain model's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    merged = finetune.merge_adapter(AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32),
                                    tmp_path / "adapter")
    merged.save_pretrained(tmp_path / "merged")
    for f in stories_dir.glob("tokenizer*"):
        (tmp_path / "merged" / f.name).write_bytes(f.read_bytes())
    kw = dict(cfg=QuantConfig(bits=4, group_size=32), dataset=calibration_lines(), nsamples=4, seqlen=64,
              progress=False, first_blocks=2)
    via = quantize(stories_dir, tmp_path / "via", adapter=tmp_path / "adapter", **kw).out
    by_hand = quantize(tmp_path / "merged", tmp_path / "by_hand", **kw).out
    plain = quantize(stories_dir, tmp_path / "plain", **kw).out
    a, b, c = (load_file(str(d / "model.safetensors")) for d in (via, by_hand, plain))
    key = "model.layers.1.self_attn.q_proj.qweight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    assert torch.equal(a["model.layers.3.self_attn.o_proj.weight"], b["model.layers.3.self_attn.o_proj.weight"])
    with pytest.raises(FileNotFoundError, match="adapter folder"):
        quantize(stories_dir, tmp_path / "none", adapter=tmp_path / "missing", **kw)
    assert not (tmp_path / "none").exists()


def test_eval_generate_and_bench_with_an_adapter(ckpt, stories_dir, tmp_path, capsys, one_thread_module):
    """`eval`, `generate` and `bench` --adapter run a saved LoRA adapter: on the checkpoint beside its quantized
    layers, on the floating-point model merged into it. Each gives what the Python route gives (load_lora /
    merge_adapter by hand) and differs from the run without the adapter; a missing adapter is a one-line error."""
    from gptqkit.bench import bench, size_on_disk
    from gptqkit.data import eval_tokens
    from gptqkit.evaluate import perplexity
    from gptqkit.generate import load_for_inference, run_generation
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    pm = finetune.add_lora(load(ckpt), r=4)
    set_lora_b(pm)
    pm.save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    tiny = str(CORPORA / "calibration" / "tiny.txt")
    tokens = eval_tokens(AutoTokenizer.from_pretrained(ckpt), tiny)

    def cli_ppl(model: Path, *extra: str) -> float:
        assert cli(["-q", "eval", str(model), "--dataset", tiny, "--seqlen", "128", "--max-windows", "3",
                    *extra]) == 0
        return float(capsys.readouterr().out.split("perplexity")[1].split()[0])

    with torch.no_grad():
        by_hand = perplexity(finetune.load_lora(load(ckpt), adapter), tokens, seqlen=128, max_windows=3,
                             progress=False)
        merged = finetune.merge_adapter(AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32),
                                        adapter)
        dense_by_hand = perplexity(merged, tokens, seqlen=128, max_windows=3, progress=False)
    got, plain = cli_ppl(ckpt, "--adapter", adapter), cli_ppl(ckpt)
    assert got == pytest.approx(by_hand, rel=1e-4) and abs(got - plain) > 0.05 * plain
    dense, dense_plain = cli_ppl(stories_dir, "--adapter", adapter), cli_ppl(stories_dir)
    assert dense == pytest.approx(dense_by_hand, rel=1e-4) and abs(dense - dense_plain) > 0.05 * dense_plain

    prompt = "Once upon a time"
    model, tok = load_for_inference(ckpt, adapter=adapter)
    assert sum(isinstance(m, finetune.QuantLoraLinear) for m in model.modules()) == 20
    expected = run_generation(finetune.load_lora(load(ckpt), adapter).base_model.model, tok, prompt,
                              max_new_tokens=12).text
    assert run_generation(model, tok, prompt, max_new_tokens=12).text == expected
    assert run_generation(load(ckpt), tok, prompt, max_new_tokens=12).text != expected
    assert cli(["-q", "generate", str(ckpt), "--prompt", prompt, "--max-new-tokens", "12", "--adapter", adapter,
                "--no-stream"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()

    r = bench(ckpt, prompt_len=16, new_tokens=4, runs=1, warmup=0, threads=1, adapter=adapter)
    assert r["settings"]["adapter"] == adapter
    assert r["quantized"]["size_bytes"] == size_on_disk(ckpt) + size_on_disk(adapter) > size_on_disk(ckpt)
    assert r["quantized"]["decode_tokens_per_s"] > 0

    for cmd in (["eval", str(ckpt)], ["generate", str(ckpt), "--prompt", prompt], ["bench", str(ckpt)]):
        assert cli(["-q", *cmd, "--adapter", str(tmp_path / "nothing")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "adapter folder" in err[0] and "does not exist" in err[0]
