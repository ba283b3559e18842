"""Load a GPTQ checkpoint with a peer library on CPU; write logits, perplexity and dequantized weights.

Run with the matching venv's python:
    python peer_eval.py gptqmodel CKPT JOB.pt OUT.pt [DEQUANT.safetensors]
    python peer_eval.py autogptq  CKPT JOB.pt OUT.pt [DEQUANT.safetensors]
    python peer_eval.py transformers CKPT JOB.pt OUT.pt [DEQUANT.safetensors]   (with the gptqmodel venv)
    python peer_eval.py transformers-fp32 ...   (the same, asking for GPTQModel's torch layer: float32 arithmetic)

JOB.pt (torch.save of a dict):
    probe_ids   LongTensor [B, T]   inputs whose logits are compared
    ppl_tokens  LongTensor [1, N]   evaluation stream; windows i*seqlen ... (i+1)*seqlen, as gptqkit.evaluate does
    ppl_seqlen, ppl_windows  int
    dtype       "float32" | "float16"
OUT.pt: {"logits" [B, T, V] float32, "ppl", "window_losses", "kernel", "versions", "load_s", "ppl_s"}.
DEQUANT.safetensors: for each quantized Linear, "<name>" = the peer's own dequantized weight, [K, N] float32, and
"<name>.fp16_same" = 1 if the peer's dequantization in fp16 equals the float32 one rounded to fp16.

How each peer's own dequantization is reached:
  GPTQModel  TorchLinear.dequantize_weight() (BACKEND.GPTQ_TORCH), the function its torch forward multiplies by.
  AutoGPTQ   its QuantLinear has no dequantize function: the unpack-and-scale code sits inside forward(), so the
             weight is read as forward(I_K) with the bias removed (exact in float32: each output is one product).
GPTQModel's TorchLinear lists only fp16/bf16 as supported, but its arithmetic is dtype-generic; float32 is added to
that list here so that both sides can be compared in float32 (CPU fp16 matmuls are also ~20x slower).
"""

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # TorchLinear torch.compile()s its dequant: ~30 s on 2 cores

import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def load_gptqmodel(ckpt: str, dtype: torch.dtype):
    import gptqmodel
    import transformers
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    if dtype not in TorchLinear.SUPPORTS_DTYPES:
        TorchLinear.SUPPORTS_DTYPES = [*TorchLinear.SUPPORTS_DTYPES, dtype]
    model = GPTQModel.load(ckpt, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=dtype)
    versions = {"gptqmodel": str(gptqmodel.__version__), "transformers": str(transformers.__version__)}
    return model.model, versions


def load_transformers(ckpt: str, dtype: torch.dtype, backend: str | None = None):
    """transformers' own GPTQ integration (AutoModelForCausalLM.from_pretrained reads quantization_config; it needs
    optimum and runs GPTQModel's layers underneath). Run with the gptqmodel venv, which has optimum for this.
    backend: GPTQModel's layer to ask for through GPTQConfig (a loading attribute: transformers merges it into the
    checkpoint's own config and ignores the other fields); None lets it choose (on CPU, torch's int4 op in bf16)."""
    from importlib.metadata import version

    import transformers
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from transformers import AutoModelForCausalLM, GPTQConfig

    if dtype not in TorchLinear.SUPPORTS_DTYPES:
        TorchLinear.SUPPORTS_DTYPES = [*TorchLinear.SUPPORTS_DTYPES, dtype]
    kw = {"quantization_config": GPTQConfig(bits=4, backend=backend)} if backend else {}
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map="cpu", **kw)
    versions = {"transformers": str(transformers.__version__), "optimum": version("optimum")}
    return model, versions


def load_transformers_fp32(ckpt: str, dtype: torch.dtype):
    """transformers' from_pretrained with GPTQModel's float32-capable torch layer (backend "gptq_torch") instead of
    the int4 op in bf16. Measured: it is still not float32-exact under from_pretrained (each Linear ~2e-4 relative
    from GPTQModel.load's identical layer on the same input, the size of fp16 rounding), but its logits are 6-21x
    closer than the default's on SmolLM2 and about 12x on the tiny model."""
    return load_transformers(ckpt, dtype, backend="gptq_torch")


def load_autogptq(ckpt: str, dtype: torch.dtype):
    import auto_gptq
    import transformers
    from auto_gptq import AutoGPTQForCausalLM

    model = AutoGPTQForCausalLM.from_quantized(ckpt, device="cpu", use_triton=False, disable_exllama=True,
                                               disable_exllamav2=True, torch_dtype=dtype, use_safetensors=True)
    versions = {"auto_gptq": str(auto_gptq.__version__), "transformers": str(transformers.__version__)}
    return model.model, versions


@torch.no_grad()
def peer_dequantize(peer: str, m: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """[K, N] weight as the peer's own code computes it, with scales in `dtype`."""
    scales = m.scales
    m.scales = scales.to(dtype)
    try:
        if peer.startswith(("gptqmodel", "transformers")):  # transformers runs GPTQModel's layers
            if hasattr(m, "clear_weight_cache"):
                m.clear_weight_cache()
            if hasattr(m, "_stream_reset_cache"):
                m._stream_reset_cache()
            W = m.dequantize_weight()
            if hasattr(m, "clear_weight_cache"):
                m.clear_weight_cache()
            return W.to(dtype)
        bias, m.bias = m.bias, None
        try:
            K = m.infeatures
            return m(torch.eye(K, dtype=dtype))
        finally:
            m.bias = bias
    finally:
        m.scales = scales


@torch.no_grad()
def main() -> None:
    peer, ckpt, job_path, out_path = sys.argv[1:5]
    dequant_path = sys.argv[5] if len(sys.argv) > 5 else None
    ckpt, job_path, out_path = (os.path.abspath(p) for p in (ckpt, job_path, out_path))
    dequant_path = os.path.abspath(dequant_path) if dequant_path else None
    os.chdir(tempfile.mkdtemp(prefix=f"{peer}-cwd-"))  # peers may write ./logs into the working directory
    job = torch.load(job_path, weights_only=True)
    dtype = getattr(torch, job["dtype"])

    t0 = time.perf_counter()
    loader = {"gptqmodel": load_gptqmodel, "transformers": load_transformers,
              "transformers-fp32": load_transformers_fp32, "autogptq": load_autogptq}[peer]
    model, versions = loader(ckpt, dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    versions["torch"] = str(torch.__version__)
    qlayers = {n: m for n, m in model.named_modules() if hasattr(m, "qweight")}
    kernel = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in qlayers.values()})

    logits = model(input_ids=job["probe_ids"], use_cache=False).logits.float()
    t1 = time.perf_counter()
    seqlen, tokens, losses = job["ppl_seqlen"], job["ppl_tokens"], []
    for i in range(job["ppl_windows"]):
        window = tokens[:, i * seqlen:(i + 1) * seqlen]
        out = model(input_ids=window, use_cache=False).logits
        losses.append(F.cross_entropy(out[0, :-1].float(), window[0, 1:]).item())
    ppl = math.exp(sum(losses) / len(losses)) if losses else float("nan")
    ppl_s = time.perf_counter() - t1

    if dequant_path:
        from safetensors.torch import save_file

        deq = {}
        for n, m in qlayers.items():
            W = peer_dequantize(peer, m, torch.float32)
            deq[n] = W.contiguous()
            # The fp16 path: one rounding of the exact product, so it must equal the float32 result rounded.
            same = torch.equal(peer_dequantize(peer, m, torch.float16).half(), W.half()) if peer != "autogptq" \
                else True  # AutoGPTQ's fp16 route is forward(I) in fp16: too slow on CPU matmuls, not checked
            deq[f"{n}.fp16_same"] = torch.tensor([int(same)], dtype=torch.int32)
        save_file(deq, dequant_path)
    torch.save({"logits": logits, "ppl": ppl, "window_losses": losses, "kernel": kernel, "versions": versions,
                "load_s": load_s, "ppl_s": ppl_s, "n_quantized": len(qlayers)}, out_path)
    print(f"peer={peer} kernel={kernel} dtype={dtype} quantized={len(qlayers)} ppl={ppl:.4f} load_s={load_s:.1f} "
          f"ppl_s={ppl_s:.1f}")


if __name__ == "__main__":
    main()
