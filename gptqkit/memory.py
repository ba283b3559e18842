"""Memory for the weights that decode streams: big tensors in their own anonymous mappings, on 2 MiB pages.

Batch-1 decode reads every weight once per token, so the pages the weights sit on matter:
- a tensor that views a memory-mapped safetensors file (what safetensors.torch.load_file returns) sits on file pages;
- anonymous memory on 4 KiB pages walks the page tables every 4 KiB of each stream, and hardware prefetchers stop
  at every 4 KiB edge; in a virtual machine each walk is a nested one;
- transparent huge pages (THP) give 2 MiB pages where the kernel allows them for a mapping (`enabled` = madvise, the
  default of many distributions, needs MADV_HUGEPAGE).
On a 2-core Zen 5 EPYC VM (THP madvise), two loads of a 1.1B-shaped 4-bit model in one process, decoding in turns
(10 rounds): its tensors copied into anonymous 4 KiB pages decoded 5% faster than as file views, on huge pages 8.6%;
with the loader's placement (checkpoint.read_safetensors) 8.8% at 82-87 GB/s and 8.5% at 53 GB/s.

Tensors that live and die together (a checkpoint's quantized layers) share one private anonymous mapping, each
start 64-byte aligned; a big tensor alone gets one of its own, released with it. A mapping starts on a 2 MiB
boundary and only its whole 2 MiB pages are advised huge: the last partial page stays on 4 KiB pages (advised
NOHUGEPAGE, for systems where THP is `always`), so nothing takes more resident memory than its bytes rounded up to
4 KiB. Smaller tensors, and systems without madvise, get torch.empty."""

from __future__ import annotations

import math
import mmap

import torch

HUGE = 2 << 20  # bytes: the x86-64 and arm64 (4 KiB granule) PMD page
ALIGN = 64  # a cache line, and more than any dtype needs


def empty_many(specs: list[tuple[list[int], torch.dtype]]) -> list[torch.Tensor]:
    """Uninitialised CPU tensors of these (shape, dtype), in one mapping when they hold at least HUGE bytes together:
    the mapping stays while any of them does, so give it tensors that are kept or dropped together."""
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
    total = sum(-(-n // ALIGN) * ALIGN for n in sizes)
    if total < HUGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return [torch.empty(shape, dtype=dtype) for shape, dtype in specs]
    m = mmap.mmap(-1, total + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # torch.frombuffer holds the mapping through the buffer protocol: it is unmapped when the last view goes.
    off = -torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr() % HUGE
    whole = total // HUGE * HUGE
    try:  # advice only: a kernel built without THP refuses it (EINVAL), and the memory is good as it is
        m.madvise(mmap.MADV_HUGEPAGE, off, whole)
        m.madvise(mmap.MADV_NOHUGEPAGE, off + whole, len(m) - off - whole)  # total + HUGE - off - whole > 0
    except OSError:
        pass
    out = []
    for (shape, dtype), n in zip(specs, sizes):
        out.append(torch.frombuffer(m, dtype=dtype, count=math.prod(shape), offset=off).view(shape) if n
                   else torch.empty(shape, dtype=dtype))
        off += -(-n // ALIGN) * ALIGN
    return out


def empty(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; on a mapping of its own when it holds at least HUGE bytes (see above)."""
    return empty_many([(shape, dtype)])[0]


def available() -> int | None:
    """Bytes the kernel could give without swapping (Linux's MemAvailable, page cache included), or None where
    /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
