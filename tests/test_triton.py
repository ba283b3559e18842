"""The Triton kernel against an oracle: W = scales[g_idx] * (codes - zeros[g_idx]), written out here from the
random codes, zeros and scales each layer is built from (independent of the unpacking code under test).

Interpreter tier: TRITON_INTERPRET=1 runs the kernels on CPU tensors. Triton decides whether a kernel is
interpreted when the kernel is decorated, so these checks run in one child process that sets the variable before
anything imports Triton (robust under pytest's single process); each case is reported as its own test.
CUDA tier: the same cases plus Llama-sized layers, the prefill path and a small model, when a GPU is present.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptqkit.packing import pack_qweight, pack_qzeros
from gptqkit.qlinear import QuantLinear

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install gptqkit[triton])")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

K_ODD, N_ODD = 336, 80  # K: a partial last group for g = 32 and 128, N: a partial column tile


def _cases() -> list[dict]:
    """bits x group x act-order (act-order with one group is no act-order); the other settings rotate so that
    every bit width meets M = 1, 5, 16, fp16 and bf16, v1 and v2, bias and none."""
    out = []
    for bits in (2, 4, 8):
        layouts = [(g, act) for g in (32, 128, -1) for act in (False, True) if not (g == -1 and act)]
        for i, (g, act) in enumerate(layouts):
            out.append(dict(bits=bits, group=g, act=act, fmt=("gptq", "gptq_v2")[(i // 2 + bits // 2) % 2],
                            bias=(i + bits // 4) % 2 == 0, M=(1, 5, 16)[i % 3],
                            dtype=("float16", "bfloat16")[(i + bits // 2) % 2]))
    return out


CASES = _cases()


def case_id(c: dict) -> str:
    return (f"{c['bits']}bit-g{c['group']}{'-act' if c['act'] else ''}-{c['fmt']}{'-bias' if c['bias'] else ''}"
            f"-M{c['M']}-{c['dtype']}")


def make_layer(K: int, N: int, bits: int, group: int, act: bool, fmt: str, bias: bool, device="cpu", seed=0):
    """(QuantLinear with random codes, the oracle weight [K, N] float64)."""
    gen = torch.Generator().manual_seed(seed)
    g = K if group == -1 else group
    G = -(-K // g)
    codes = torch.randint(0, 2**bits, (N, K), generator=gen)
    lo = 1 if fmt == "gptq" else 0  # v1 cannot store a zero point of 0
    zeros = torch.randint(lo, 2**bits + lo, (G, N), generator=gen)
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.001).half()
    g_idx = (torch.randperm(K, generator=gen) // g if act else torch.arange(K) // g).int()
    layer = QuantLinear(K, N, bits, group, bias, fmt)
    layer.qweight.copy_(pack_qweight(codes, bits))
    layer.qzeros.copy_(pack_qzeros(zeros, bits, fmt))
    layer.scales.copy_(scales)
    layer.g_idx.copy_(g_idx)
    if bias:
        layer.bias.copy_(torch.randn(N, generator=gen).half())
    gi = g_idx.long()
    W = scales.double()[gi] * (codes.T.double() - zeros.double()[gi])
    return layer.to(device), W.to(device)


def rel_err(y: torch.Tensor, x: torch.Tensor, W: torch.Tensor, bias) -> float:
    """max |y - x @ W - bias| / max |x @ W + bias|, the truth in float64."""
    t = x.double() @ W + (bias.double() if bias is not None else 0)
    return ((y.double() - t).abs().max() / t.abs().max()).item()


TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def run_case(c: dict, device: str = "cpu") -> dict:
    """Errors of every path the kernel has for this case: forward (its own plan), the other fused variant,
    split-K 1 vs > 1, and the dequantize kernel (must equal the oracle exactly)."""
    from gptqkit.kernels import triton_gptq as tg

    layer, W = make_layer(K_ODD, N_ODD, c["bits"], c["group"], c["act"], c["fmt"], c["bias"], device)
    tg.prepare(layer)
    dtype = getattr(torch, c["dtype"])
    x = torch.randn(c["M"], K_ODD, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    res = {"act_order_seen": layer.triton_act_order}
    y = tg.forward(layer, x.view(1, c["M"], K_ODD))
    res["forward"] = rel_err(y.view(c["M"], -1), x, W, layer.bias)
    res["dtype_ok"] = y.dtype == dtype and tuple(y.shape) == (1, c["M"], N_ODD)
    # forward ran the interpreter's plan (split-K 2, ROWS 16: the one-row kernel at M = 1, else tensor cores).
    # At M = 1 another tiling: K tiles of 32 inputs (inside every group) and 5 splits of whole tiles, so the last
    # split has tiles past K, called twice (the workspace must be left zero); else another tile height moves K tiles
    # across group boundaries, and split-K 1 stores without atomics.
    if c["M"] == 1:
        other = tg.Config(64, c["bits"], 5, dot=False)
        first = tg.gemv(layer, x, other)
        second = tg.gemv(layer, x, other)
        res["fused"] = max(rel_err(first, x, W, layer.bias), rel_err(second, x, W, layer.bias))
        res["workspace_zero"] = not layer.triton_ws.any().item() and not layer.triton_cnt.any().item()
    else:
        res["fused"] = rel_err(tg.fused_matmul(layer, x, tg.Config(32, 32, 1)), x, W, layer.bias)
        res["workspace_zero"] = True
    res["dequant_exact"] = torch.equal(tg.dequantize(layer, torch.float32), W.float())
    return res


def run_interpreter_cases() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    out = {case_id(c): run_case(c) for c in CASES}
    # prefill path: dequantize + matmul above FUSED_MAX_M rows
    from gptqkit.kernels import triton_gptq as tg

    layer, W = make_layer(K_ODD, N_ODD, 4, 128, True, "gptq", True)
    tg.prepare(layer)
    x = torch.randn(tg.FUSED_MAX_M + 3, K_ODD).half()
    out["prefill"] = {"forward": rel_err(tg.forward(layer, x), x, W, layer.bias)}
    # groups of 20 inputs split 4-bit words (8 codes each): the one-row kernel reads each code's group from g_idx
    layer, W = make_layer(K_ODD, N_ODD, 4, 20, False, "gptq", False)
    tg.prepare(layer)
    x = torch.randn(1, K_ODD).half()
    out["group20"] = {"gemv": rel_err(tg.gemv(layer, x, tg.Config(64, 4, 3, dot=False)), x, W, None)}
    return out


def _interpreter_broken() -> str | None:
    """Triton's interpreter before 3.7 turns a run-time loop bound into an index with int() of a 1-element array,
    which numpy 2.4 refuses (triton-lang/triton#9171): every kernel with a K loop fails there, not ours alone."""
    from importlib.metadata import version

    def major_minor(v: str) -> tuple[int, int]:
        return tuple(int(p) for p in v.split(".")[:2])

    if major_minor(version("triton")) < (3, 7) and major_minor(version("numpy")) >= (2, 4):
        return (f"Triton {version('triton')}'s interpreter cannot run loops with numpy {version('numpy')} "
                "(triton-lang/triton#9171); use Triton >= 3.7 or numpy < 2.4")
    return None


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    why = _interpreter_broken()
    if why:
        pytest.skip(why)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, __file__], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        pytest.fail(f"interpreter run failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_interpreter_matches_oracle(interpreter_results, case):
    r = interpreter_results[case_id(case)]
    tol = TOL[getattr(torch, case["dtype"])]
    assert r["dequant_exact"], "the dequantize kernel differs from scales[g_idx] * (codes - zeros[g_idx])"
    assert r["dtype_ok"] and r["workspace_zero"]
    assert r["act_order_seen"] == case["act"]
    assert r["forward"] < tol, f"forward: relative error {r['forward']:.2e}"
    assert r["fused"] < tol, f"fused variants: relative error {r['fused']:.2e}"


def test_interpreter_prefill_path(interpreter_results):
    assert interpreter_results["prefill"]["forward"] < TOL[torch.float16]


def test_interpreter_groups_that_split_words(interpreter_results):
    assert interpreter_results["group20"]["gemv"] < TOL[torch.float16]


@pytest.mark.parametrize("bits,group,act,fmt", [(2, 32, True, "gptq"), (4, 128, False, "gptq_v2"),
                                                 (8, 128, True, "gptq")])
def test_oracle_is_the_reference_kernel(bits, group, act, fmt):
    from gptqkit.kernels import reference

    layer, W = make_layer(K_ODD, N_ODD, bits, group, act, fmt, False)
    assert torch.equal(reference.dequantize(layer), W.float())


def test_supports_says_why():
    from gptqkit.kernels import triton_gptq as tg

    layer, _ = make_layer(64, 64, 4, 32, False, "gptq", False)
    assert tg.supports(layer, "cpu") == "Triton kernel needs a CUDA device"
    three = QuantLinear(64, 64, 3, 32, False)
    assert "3-bit" in tg.supports(three, torch.device("cuda"))  # decided before any CUDA call


def test_imports_and_declines_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\nfrom gptqkit.kernels import triton_gptq as tg\nfrom gptqkit.qlinear import QuantLinear\n"
            "print(tg.supports(QuantLinear(64, 64, 4, 32, False), torch.device('cuda')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "pip install gptqkit[triton]" in p.stdout


def test_candidates_fill_the_gpu():
    from gptqkit.kernels.triton_gptq import candidates

    for M, K, N in ((1, 4096, 4096), (1, 11008, 4096), (1, 576, 1536), (16, 4096, 11008), (64, 4096, 4096)):
        cands = candidates(M, K, N, 4, 128, sms=132)
        assert cands and all(c.dot == (M > 1) for c in cands)
        for c in cands:
            assert 128 % (c.rows * 8) == 0, "K tiles must fit in a group of 128"
            assert c.split_k <= -(-K // (c.rows * 8)), "a split without a K tile"
        progs = [-(-N // c.block_n) * c.split_k for c in cands]
        assert max(progs) >= 66, "every tiling leaves most SMs idle"
        assert K * N < 4096 * 4096 or progs[0] >= 132, "the default leaves SMs idle on a Llama-7B layer"


# ------------------------------------------------------------------------------------------------------ CUDA


@pytest.fixture
def untuned(monkeypatch):
    """The first candidate tiling instead of timing them all: one compile per variant keeps the tests short."""
    from gptqkit.kernels import triton_gptq as tg

    monkeypatch.setattr(tg, "TUNE", False)


@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_matches_oracle(untuned, case):
    r = run_case(case, "cuda")
    tol = TOL[getattr(torch, case["dtype"])]
    assert r["dequant_exact"] and r["dtype_ok"] and r["workspace_zero"]
    assert r["forward"] < tol and r["fused"] < tol, r


@needs_cuda
@pytest.mark.parametrize("bits,group,act,dtype", [(4, 128, False, "float16"), (4, 128, True, "bfloat16"),
                                                  (4, -1, False, "bfloat16"), (2, 64, False, "float16"),
                                                  (8, 128, False, "float16")])
def test_cuda_llama_shapes(untuned, bits, group, act, dtype):
    from gptqkit.kernels import triton_gptq as tg

    dtype = getattr(torch, dtype)
    for K, N in ((4096, 1024), (1024, 4096)):
        layer, W = make_layer(K, N, bits, group, act, "gptq", False, "cuda")
        tg.prepare(layer)
        for M in (1, 4, 16, 33, 200):
            x = torch.randn(M, K, device="cuda").to(dtype)
            assert rel_err(tg.forward(layer, x), x, W, None) < TOL[dtype], M


@needs_cuda
def test_cuda_tuned_plan():
    from gptqkit.kernels import triton_gptq as tg

    layer, W = make_layer(4096, 4096, 4, 128, False, "gptq", True, "cuda")
    tg.prepare(layer)
    for M in (1, 40):
        x = torch.randn(M, 4096, device="cuda").half()
        assert rel_err(tg.forward(layer, x), x, W, layer.bias) < TOL[torch.float16]
        cfg = tg.plan(layer, M, torch.float16)
        assert cfg is None or cfg in tg.candidates(M, 4096, 4096, 4, 128, torch.cuda.get_device_properties(
            0).multi_processor_count)


@needs_cuda
def test_cuda_model_selects_triton_and_matches_torch_kernel(untuned):
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptqkit.checkpoint import use_kernels
    from gptqkit.config import QuantConfig
    from gptqkit.sequential import quantize_model

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    samples = [{"input_ids": torch.randint(0, 512, (1, 64)), "attention_mask": torch.ones(1, 64, dtype=torch.long)}
               for _ in range(4)]
    quantize_model(model, samples, QuantConfig(bits=4, group_size=64, quant_method="rtn"), progress=False)
    model.half().cuda()
    ids = torch.randint(0, 512, (2, 24), device="cuda")
    assert use_kernels(model, "cuda") == {"triton": 14}
    with torch.no_grad():
        fast = model(ids).logits.float()
        use_kernels(model, "cuda", "torch")
        slow = model(ids).logits.float()
        use_kernels(model, "cuda", "triton")
        step = model(ids[:, :1]).logits.float()  # M = 2 rows: the decode path
    assert ((fast - slow).norm() / slow.norm()).item() < 1e-2
    assert ((step[:, 0] - slow[:, 0]).norm() / slow[:, 0].norm()).item() < 1e-2


@needs_cuda
def test_cuda_quantization_of_a_real_model(stories_dir, tiny_texts, tmp_path):
    """--device cuda (one block on the GPU, bf16 calibration forwards, fp32 Hessians and solver) against the CPU
    run on stories260K: both checkpoints have near-equal perplexity on held-out stories, and the quantized model
    loaded on the GPU (Triton kernel, fp16) scores what the reference kernel scores on the same checkpoint."""
    from gptqkit.checkpoint import load, use_kernels
    from gptqkit.config import QuantConfig
    from gptqkit.evaluate import perplexity
    from gptqkit.pipeline import quantize
    from transformers import AutoTokenizer

    cfg = QuantConfig(bits=4, group_size=32)
    calib, held = tiny_texts[:32], tiny_texts[32:]
    rep = quantize(stories_dir, tmp_path / "gpu", cfg, dataset=calib, nsamples=32, seqlen=128, device="cuda",
                   progress=False)
    assert rep.peak_memory_kind == "GPU" and 0 < rep.peak_memory_bytes < 256 << 20  # a 1 MB model, one block on it
    quantize(stories_dir, tmp_path / "cpu", cfg, dataset=calib, nsamples=32, seqlen=128, device="cpu",
             progress=False)
    tok = AutoTokenizer.from_pretrained(stories_dir)
    ids = torch.tensor([sum((tok(t)["input_ids"] for t in held), [])[:8 * 256]])
    ppl = {}
    for name in ("gpu", "cpu"):
        model = load(tmp_path / name, device="cuda")
        assert {m.kernel.name for m in model.modules() if hasattr(m, "kernel")} == {"triton"}
        ppl[name] = perplexity(model, ids, seqlen=256, progress=False)
        use_kernels(model, "cuda", "torch")
        ppl[name + "-torch"] = perplexity(model, ids, seqlen=256, progress=False)
    ppl["cpu-fp32"] = perplexity(load(tmp_path / "cpu", device="cpu"), ids, seqlen=256, progress=False)
    assert abs(ppl["gpu"] / ppl["cpu"] - 1) < 0.03, ppl
    for name in ("gpu", "cpu"):
        assert abs(ppl[name] / ppl[name + "-torch"] - 1) < 2e-3, ppl
    assert abs(ppl["cpu"] / ppl["cpu-fp32"] - 1) < 5e-3, ppl  # fp16 on the GPU vs fp32 on the CPU


if __name__ == "__main__":  # the interpreter child process (see interpreter_results)
    print(json.dumps(run_interpreter_cases()))
