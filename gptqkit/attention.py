"""Attention of one new token on CPU, plugged into transformers through its documented extension point.

Decoding a 4-bit model on CPU spends most of a token in the quantized matmuls, and the next largest share was
torch's SDPA: 100-160 us per layer for one query against a few hundred cached positions on 2 cores (its flash kernel
is built for blocks of queries), ~3.4 ms of a 32 ms token on a 22-layer 1.1B Llama. cpu_avx2.decode_attention does
the same product in tens of microseconds.

transformers resolves each attention layer's function by name through `AttentionInterface` (and the mask builder
through `AttentionMaskInterface`); `use(model)` registers NAME there and switches a model that runs SDPA to it. The
function takes exactly one case, one new token of batch 1 in float32 with no mask (what transformers passes for
unpadded decoding; the cache in float32 or bfloat16), and hands every other call to transformers' own
`sdpa_attention_forward` unchanged, with the SDPA mask builder: prefill, batches, padding, sliding windows past
their width, softcapping and autograd run SDPA as before (a bfloat16 cache widened to the query's dtype first).

Rotary attention modules that gptqkit.fused swaps (Llama, Mistral, Qwen2, Gemma with the avx2 kernels) do their
one-token step in one C call of their own before they get here, while the model runs NAME; this function then
serves the rest: other kernels, other attention classes, a DynamicCache.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .kernels import cpu_avx2

log = logging.getLogger(__name__)

NAME = "gptqkit_cpu_decode"


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, T, D], key/value [B, Hkv, L, D] -> ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (attention_mask is None and dropout == 0.0 and query.shape[2] == 1 and not kwargs.get("softcap")
            and kwargs.get("s_aux") is None and kwargs.get("position_bias") is None
            and not (torch.is_grad_enabled() and query.requires_grad)):
        out = cpu_avx2.decode_attention(query, key, value,
                                        scaling if scaling is not None else query.shape[-1] ** -0.5)
        if out is not None:
            return out, None
    if key.dtype != query.dtype:  # a bf16 GrowingCache under a float32 model: SDPA takes one dtype
        key, value = key.to(query.dtype), value.to(query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def use(model: nn.Module) -> bool:
    """Switch a CPU model that runs SDPA to NAME (registering it with transformers once); True if switched. Models
    on another implementation (eager, flash, ...) or with no C library keep theirs."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    lib = cpu_avx2.fast_library()  # the build decode_attention runs
    if isinstance(lib, str):
        log.info("attention: SDPA (the C decode attention is not available: %s)", lib)
        return False
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(NAME, attention_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    log.info("attention: %s (one-token decode in C, everything else SDPA)", NAME)
    return True
