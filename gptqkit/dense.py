"""The large unquantized matrices (token embeddings, lm_head) stored in a 16-bit dtype while the model computes in
another.

A 4-bit model's biggest dense tensors are its embedding and lm_head ([vocab, hidden] each, 131 MB apiece in bf16
for a 1.1B Llama). On a CPU without native bf16 (AVX2 only: bf16 arithmetic is emulated), computing in fp32 is
faster (attention, norms and the quantized kernels' inputs need no casts), but fp32 storage of these two matrices
would double their memory and the lm_head's bytes read per token. So they keep a 16-bit storage dtype and cast at
their boundary: the embedding looks rows up in storage and returns them in the compute dtype; lm_head runs its
GEMV in the storage dtype (bandwidth-bound: 2 bytes per weight) and returns the compute dtype.

Only plain nn.Embedding / nn.Linear are swapped (a subclass such as Gemma's scaled embedding keeps its own forward
and its dtype); a tied lm_head shares the embedding's stored Parameter. An untied embedding that is already 16-bit
(most GPTQ checkpoints store it in fp16) keeps its own tensor: a lookup reads only the rows of its tokens, so the
checkpoint's memory-mapped tensor costs the pages those rows touch, where a cast copy would be resident whole
(131 MB for a 1.1B Llama, 262 MB for a 7B one; a 512-token prompt of random tokens touched 30 MB).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

from . import memory
from .kernels import cpu_avx2

log = logging.getLogger(__name__)

GEMV_ROWS = 32  # rows from which a bf16 GEMM (prefill) is left to torch


class StoredEmbedding(nn.Embedding):
    """nn.Embedding whose weight is held in a storage dtype; outputs are cast to `compute_dtype`."""

    compute_dtype: torch.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                          self.sparse)
        return out.to(self.compute_dtype)


class StoredLinear(nn.Linear):
    """nn.Linear whose weight is held in a storage dtype: x is cast to it, the result back to x's dtype.

    Decode rows (fewer than GEMV_ROWS) of fp32 x against a bf16 weight on CPU go through the avx2 C GEMV, which
    widens bf16 in registers and runs at DRAM speed where torch's emulated bf16 GEMV does not (no bf16 instructions on
    AVX2); its sums are fp32, so it is at least as accurate as the bf16 GEMV it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (w.dtype == torch.bfloat16 and x.dtype == torch.float32 and w.device.type == "cpu"
                and x.numel() < GEMV_ROWS * x.shape[-1] and not (torch.is_grad_enabled() and x.requires_grad)):
            y = cpu_avx2.bf16_matmul(x.reshape(-1, x.shape[-1]), w)
            if y is not None:
                y = y.view(*x.shape[:-1], -1)
                return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x.to(w.dtype), w, None if self.bias is None else self.bias.to(w.dtype)).to(x.dtype)


HALF = (torch.float16, torch.bfloat16)


def dense_names(model: nn.Module) -> set[str]:
    """Parameter names of the input embedding and lm_head weights that store_dense would keep in storage."""
    wanted = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings())
              if type(m) in (nn.Embedding, nn.Linear)}
    return {f"{n}.weight" for n, m in model.named_modules() if id(m) in wanted}


def _keeps(emb: nn.Module, head: nn.Module | None, dtype: torch.dtype) -> bool:
    """An input embedding `emb` whose weight is (or will be) of `dtype` stays as it is: a plain nn.Embedding that no
    lm_head shares (a quantized head has no weight), already in a 16-bit float dtype (see the module docstring)."""
    return type(emb) is nn.Embedding and dtype in HALF and getattr(head, "weight", None) is not emb.weight


def _streamed(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w cast to `dtype`, on CPU into memory of its own on huge pages (gptqkit.memory), since an lm_head's GEMV reads
    all of it every token; w itself when it has that dtype (load() reads an untied head into such memory)."""
    if w.dtype == dtype or w.device.type != "cpu":
        return w.to(dtype)
    out = memory.empty(list(w.shape), dtype)
    out.copy_(w)
    return out


def store_dense(model: nn.Module, storage: torch.dtype, compute: torch.dtype | None = None) -> int:
    """Keep the input embedding and lm_head of a transformers model in `storage`, computing in `compute` (default:
    the embedding's current dtype); an untied embedding already 16-bit keeps its own tensor. Returns the bytes
    saved."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    saved = 0
    new_weight = None
    if type(emb) is nn.Embedding:
        tied = getattr(head, "weight", None) is emb.weight  # a quantized head has none
        own = emb.weight.dtype if _keeps(emb, head, emb.weight.dtype) else storage
        saved += emb.weight.numel() * (emb.weight.element_size() - torch.finfo(own).bits // 8)
        new_weight = nn.Parameter(_streamed(emb.weight.detach(), own) if tied else emb.weight.detach().to(own),
                                  requires_grad=False)
        new = StoredEmbedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, emb.max_norm, emb.norm_type,
                              emb.scale_grad_by_freq, emb.sparse, _weight=new_weight)
        new.weight = new_weight  # _weight is wrapped in a fresh Parameter; a tied head must share this one
        new.compute_dtype = compute or emb.weight.dtype
        model.set_input_embeddings(new)
    else:
        tied = False
        log.info("input embedding %s keeps its own dtype (not a plain nn.Embedding)", type(emb).__name__)
    if type(head) is nn.Linear:
        if not tied:
            saved += head.weight.numel() * (head.weight.element_size() - torch.finfo(storage).bits // 8)
        lin = StoredLinear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        lin.weight = new_weight if tied else nn.Parameter(_streamed(head.weight.detach(), storage), requires_grad=False)
        if head.bias is not None:
            lin.bias = nn.Parameter(head.bias.detach(), requires_grad=False)
        model.set_output_embeddings(lin)
    return saved
