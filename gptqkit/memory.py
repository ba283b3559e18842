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


def clean_file_view(t: torch.Tensor) -> bool:
    """t is a CPU tensor inside one private mapping of a file that holds no pages of its own (smaps' Anonymous: 0 kB:
    nothing was ever written through it), as safetensors gives a checkpoint's tensors: dropping its resident pages
    then loses nothing. False where /proc/self/smaps cannot be read (not Linux)."""
    a0 = t.data_ptr()
    a1 = a0 + t.numel() * t.element_size()
    if t.device.type != "cpu" or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(None, 6)
                if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                    lo, hi = (int(v, 16) for v in head[0].split("-"))
                    inside = lo <= a0 and a1 <= hi
                    if inside and not (len(head) >= 6 and head[5].startswith("/") and head[1].endswith("p")):
                        return False
                elif inside and head[0] == "Anonymous:":
                    return head[1] == "0"
    except (OSError, ValueError):
        pass
    return False


def drop_file_pages(t: torch.Tensor) -> None:
    """Give back the resident pages of `t`, a clean file view (clean_file_view): they stay in the page cache, and a
    later read of t faults the same bytes in from the file again, but the process no longer holds them. Whole pages
    inside t only."""
    import ctypes

    a0 = t.data_ptr()
    a1 = a0 + t.numel() * t.element_size()
    p0, p1 = -(-a0 // mmap.PAGESIZE) * mmap.PAGESIZE, a1 // mmap.PAGESIZE * mmap.PAGESIZE
    if p1 > p0:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(p0), ctypes.c_size_t(p1 - p0), mmap.MADV_DONTNEED)


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
