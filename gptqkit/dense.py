"""The large unquantized matrices (token embeddings, lm_head) stored in a 16-bit dtype while the model computes in
another.

A 4-bit model's biggest dense tensors are its embedding and lm_head ([vocab, hidden] each, 131 MB apiece in bf16
for a 1.1B Llama). On a CPU without native bf16 (AVX2 only: bf16 arithmetic is emulated), computing in fp32 is
faster (attention, norms and the quantized kernels' inputs need no casts), but fp32 storage of these two matrices
would double their memory and the lm_head's bytes read per token. So they keep a 16-bit storage dtype and cast at
their boundary: the embedding looks rows up in storage and returns them in the compute dtype; lm_head runs its
GEMV in the storage dtype (bandwidth-bound: 2 bytes per weight) and returns the compute dtype.

Only plain nn.Embedding / nn.Linear are swapped, and an embedding subclass that only multiplies its rows by an
`embed_scale` (Gemma's, sqrt(hidden)): its StoredEmbedding multiplies by the same scale. Any other subclass keeps
its own forward and its dtype; a tied lm_head shares the embedding's stored Parameter. An untied embedding that is
already 16-bit (most GPTQ checkpoints store it in fp16) keeps its own tensor: a lookup reads only the rows of its
tokens, so the checkpoint's memory-mapped tensor costs the pages those rows touch, where a cast copy would be
resident whole (131 MB for a 1.1B Llama, 262 MB for a 7B one).

Such an embedding, read from a safetensors file, looks its rows up in the file itself (StoredEmbedding.read_rows_from,
set by checkpoint.load): a lookup in the mapped tensor maps not only the rows' pages but Linux's fault-around window
of 64 KiB around each (madvise(MADV_RANDOM) does not change that), so a 512-token prompt of random tokens made
30 MiB of a 1.1B Llama's embedding resident and 26 MiB of SmolLM2's (half its embedding, a fifth of its 4-bit
model's peak), where its rows are 1 MiB and 0.6 MiB. pread copies just the rows; the file's pages stay in the page
cache, which the kernel can drop, instead of in the process.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import memory
from .kernels import cpu_avx2

log = logging.getLogger(__name__)

GEMV_ROWS = 32  # rows from which a bf16 GEMM (prefill) is left to torch


class FileRows:
    """Rows of a [V, D] tensor read with pread from the file that holds it at byte `offset` (row-major,
    little-endian, as safetensors stores it), for as long as `weight` is that tensor unchanged: the same memory and
    no in-place write since (its version counter). The file stays open from here on, so a checkpoint rewritten in
    place (gptqkit writes by rename) does not change what is read."""

    def __init__(self, path: str | os.PathLike, offset: int, weight: torch.Tensor):
        self.fd = os.open(Path(path), os.O_RDONLY)
        self._close = weakref.finalize(self, os.close, self.fd)
        self.offset, self.row_bytes = offset, weight.shape[1] * weight.element_size()
        self.shape, self.dtype = tuple(weight.shape), weight.dtype
        self._of = (weight.data_ptr(), weight._version)

    def serves(self, weight: torch.Tensor) -> bool:
        return (weight.data_ptr(), weight._version) == self._of and tuple(weight.shape) == self.shape

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """weight[ids]; an id outside [0, V) raises IndexError, as F.embedding does."""
        if ids.numel() == 1:  # a decoded token: the fewest torch calls (each costs microseconds cold, between matmuls)
            i, rb = int(ids), self.row_bytes
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"index out of range in self: ids must lie in [0, {self.shape[0]})")
            row = bytearray(rb)
            if os.preadv(self.fd, [row], self.offset + i * rb) != rb:
                raise OSError(f"the embedding's file ends before row {i}: it was truncated after loading")
            return torch.frombuffer(row, dtype=self.dtype).view(*ids.shape, self.shape[1])
        flat = ids.reshape(-1)
        uniq, inv = torch.unique(flat, return_inverse=True)  # sorted
        if uniq.numel() and (uniq.min() < 0 or uniq.max() >= self.shape[0]):
            raise IndexError(f"index out of range in self: ids must lie in [0, {self.shape[0]})")
        out = torch.empty(uniq.numel(), self.shape[1], dtype=self.dtype)
        buf = memoryview(out.view(torch.uint8).numpy()).cast("B")
        rows, rb = uniq.tolist(), self.row_bytes
        i = 0
        while i < len(rows):  # consecutive ids are one read
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            want = (j - i) * rb
            if os.preadv(self.fd, [buf[i * rb: j * rb]], self.offset + rows[i] * rb) != want:
                raise OSError(f"the embedding's file ends before row {rows[j - 1]}: it was truncated after loading")
            i = j
        return out[inv].view(*ids.shape, self.shape[1])


class StoredEmbedding(nn.Embedding):
    """nn.Embedding whose weight is held in a storage dtype; outputs are cast to `compute_dtype` (and multiplied by
    a non-persistent 0-d `embed_scale` buffer where store_dense gives it one). With
    read_rows_from(), rows are read from the weight's file instead of its mapping (see the module docstring) where
    only the output matters: CPU ids, no max_norm (which renormalises the weight in place), no gradient."""

    compute_dtype: torch.dtype
    rows: FileRows | None = None

    def read_rows_from(self, path: str | os.PathLike, offset: int) -> None:
        """Look rows up in file `path`, which holds this weight's bytes at `offset`, while the weight is unchanged."""
        if sys.byteorder != "little":
            raise ValueError("safetensors files are little-endian; this machine is not")
        self.rows = FileRows(path, offset, self.weight)

    def __getstate__(self):  # a copy or pickle holds its own weight: it looks rows up there, with no file descriptor
        return {k: v for k, v in self.__dict__.items() if k != "rows"}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if (rows is not None and self.max_norm is None and ids.device.type == "cpu" and rows.serves(self.weight)
                and not (torch.is_grad_enabled() and self.weight.requires_grad)):
            out = rows.lookup(ids).to(self.compute_dtype)
        else:
            out = F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                              self.scale_grad_by_freq, self.sparse).to(self.compute_dtype)
        scale = self._buffers.get("embed_scale")  # set by store_dense for Gemma's scaled embedding
        return out if scale is None else out * scale


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


def _embedding_scale(emb: nn.Module) -> torch.Tensor | None | bool:
    """None for a plain nn.Embedding; the scale of an nn.Embedding subclass whose forward is the plain lookup times
    its 0-d `embed_scale` (Gemma's, checked on its first rows); False for anything else."""
    if type(emb) is nn.Embedding:
        return None
    scale = getattr(emb, "embed_scale", None)
    if not (isinstance(emb, nn.Embedding) and isinstance(scale, torch.Tensor) and scale.dim() == 0
            and not emb.weight.is_meta):
        return False
    ids = torch.arange(min(3, emb.num_embeddings), device=emb.weight.device)
    with torch.no_grad():
        plain = F.embedding(ids, emb.weight, emb.padding_idx) * scale.to(emb.weight.dtype)
        return scale.detach().clone() if torch.equal(emb(ids), plain) else False


def dense_names(model: nn.Module) -> set[str]:
    """Parameter names of the input embedding and lm_head weights that store_dense would keep in storage."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    wanted = {id(m) for m in (emb, head) if type(m) is nn.Linear or _embedding_scale(m) is not False}
    return {f"{n}.weight" for n, m in model.named_modules() if id(m) in wanted}


def _keeps(emb: nn.Module, head: nn.Module | None, dtype: torch.dtype) -> bool:
    """An input embedding `emb` whose weight is (or will be) of `dtype` stays as it is: a storable embedding
    (_embedding_scale) that no lm_head shares (a quantized head has no weight), already in a 16-bit float dtype (see
    the module docstring)."""
    return dtype in HALF and getattr(head, "weight", None) is not emb.weight


CAST_BYTES = 4 << 20  # of the source cast at a time where its file pages are given back after each piece


def _streamed(w: torch.Tensor, dtype: torch.dtype, from_file: bool = False) -> torch.Tensor:
    """w cast to `dtype`, on CPU into memory of its own on huge pages (gptqkit.memory), since an lm_head's GEMV reads
    all of it every token; w itself when it has that dtype (load() reads an untied head into such memory).
    from_file: w may view a checkpoint's file mapping (load()), whose pages are given back as each piece is cast
    (memory.drop_file_pages), so the source and the copy are not both resident: a tied fp16 embedding cast to bf16
    peaked 54 MiB higher on SmolLM2 (49152 x 576) without this."""
    if w.dtype == dtype or w.device.type != "cpu":
        return w.to(dtype)
    out = memory.empty(list(w.shape), dtype)
    if not (from_file and w.dim() == 2 and w.is_contiguous() and memory.clean_file_view(w)):
        out.copy_(w)
        return out
    rows = max(1, CAST_BYTES // max(1, w.shape[1] * w.element_size()))
    for r in range(0, w.shape[0], rows):
        out[r:r + rows].copy_(w[r:r + rows])
        memory.drop_file_pages(w[r:r + rows])
    return out


def store_dense(model: nn.Module, storage: torch.dtype, compute: torch.dtype | None = None,
                from_file: bool = False) -> int:
    """Keep the input embedding and lm_head of a transformers model in `storage`, computing in `compute` (default:
    the embedding's current dtype); an untied embedding already 16-bit keeps its own tensor. Returns the bytes
    saved. from_file: their weights are views of checkpoint files that nothing else reads (load()), whose pages are
    given back as they are cast (see _streamed)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    saved = 0
    new_weight = None
    scale = _embedding_scale(emb)
    if scale is not False:
        tied = getattr(head, "weight", None) is emb.weight  # a quantized head has none
        own = emb.weight.dtype if _keeps(emb, head, emb.weight.dtype) else storage
        saved += emb.weight.numel() * (emb.weight.element_size() - torch.finfo(own).bits // 8)
        new_weight = nn.Parameter(_streamed(emb.weight.detach(), own, from_file) if tied
                                  else emb.weight.detach().to(own),
                                  requires_grad=False)
        new = StoredEmbedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, emb.max_norm, emb.norm_type,
                              emb.scale_grad_by_freq, emb.sparse, _weight=new_weight)
        new.weight = new_weight  # _weight is wrapped in a fresh Parameter; a tied head must share this one
        new.compute_dtype = compute or emb.weight.dtype
        if scale is not None:  # 0-d, in the compute dtype: rows * scale as the subclass computes them
            new.register_buffer("embed_scale", scale.to(new.compute_dtype), persistent=False)
        model.set_input_embeddings(new)
    else:
        tied = False
        log.info("input embedding %s keeps its own dtype (not a plain or scaled nn.Embedding)", type(emb).__name__)
    if type(head) is nn.Linear:
        if not tied:
            saved += head.weight.numel() * (head.weight.element_size() - torch.finfo(storage).bits // 8)
        lin = StoredLinear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        lin.weight = new_weight if tied else nn.Parameter(_streamed(head.weight.detach(), storage, from_file),
                                                          requires_grad=False)
        if head.bias is not None:
            lin.bias = nn.Parameter(head.bias.detach(), requires_grad=False)
        model.set_output_embeddings(lin)
    return saved
