"""gptqkit.memory (big tensors in mappings of their own, on huge pages) and reading a checkpoint's quantized layers
into one such mapping."""

import gc
import mmap
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptqkit import memory
from gptqkit.checkpoint import read_safetensors

pytestmark = pytest.mark.skipif(not (os.path.exists("/proc/self/smaps") and hasattr(mmap, "MADV_HUGEPAGE")),
                                reason="needs Linux's /proc/self/smaps and madvise")


def mappings(lo: int, hi: int) -> list[tuple[str, dict[str, int]]]:
    """The /proc/self/smaps entries overlapping [lo, hi): each first line, and fields in bytes. (madvise over part of
    a mapping splits it into entries.)"""
    out, cur = [], None
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            a, b = (int(x, 16) for x in head[0].split("-"))
            cur = (line.strip(), {}) if a < hi and lo < b else None
            if cur:
                out.append(cur)
        elif cur and len(head) == 3 and head[2] == "kB":
            cur[1][head[0].rstrip(":")] = int(head[1]) * 1024
    return out


def anonymous(head: str) -> bool:
    return head.split()[3:5] == ["00:00", "0"] and len(head.split()) == 5


def test_empty_many_packs_aligned_tensors_resident_no_more_than_their_bytes():
    specs = [([5 << 18], torch.int32), ([3, 7], torch.float16), ([1 << 20], torch.bfloat16), ([0], torch.float32)]
    ts = memory.empty_many(specs)
    assert [(list(t.shape), t.dtype) for t in ts] == specs
    assert ts[0].data_ptr() % memory.HUGE == 0
    assert all(t.data_ptr() % memory.ALIGN == 0 for t in ts[:3])
    ends = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in ts[:3]]
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))  # in order, disjoint
    for i, t in enumerate(ts):
        t.fill_(i + 1)
    assert [t.unique().tolist() for t in ts[:3]] == [[1], [2], [3]]  # no tensor wrote over another
    total = ends[-1][1] - ends[0][0]  # 7 MiB and 128 bytes
    entries = mappings(ends[0][0], ends[-1][1])
    assert all(anonymous(h) for h, _ in entries)
    rss, huge = (sum(f[k] for _, f in entries) for k in ("Rss", "AnonHugePages"))
    assert rss <= -(-total // 4096) * 4096  # the slack before the aligned start and the tail page untouched
    assert huge <= total // memory.HUGE * memory.HUGE  # the partial last page is never a huge one
    addr = ts[0].data_ptr()
    del ts, t
    gc.collect()
    assert mappings(addr, addr + total) == []  # unmapped with the last tensor


def test_read_safetensors_reads_quantized_layers_into_one_mapping_and_a_streamed_tensor_into_its_own(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "layer.qweight": torch.randint(-2**31, 2**31 - 1, (64, 1 << 14), dtype=torch.int32, generator=g),  # 4 MiB
        "layer.qzeros": torch.randint(0, 2**31 - 1, (4, 1 << 11), dtype=torch.int32, generator=g),
        "layer.scales": torch.rand(4, 1 << 14, generator=g).half(),
        "layer.g_idx": torch.arange(512, dtype=torch.int32) // 128,
        "layer.bias": torch.rand(1 << 14, generator=g).half(),
        "embed.weight": torch.rand(1024, 1024, generator=g).bfloat16(),  # 2 MiB
        "head.weight": torch.rand(1024, 1024, generator=g).half(),
        "mask": torch.rand(7, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "nothing": torch.zeros(0),
    }
    f = tmp_path / "model.safetensors"
    save_file(tensors, str(f))
    got, want = read_safetensors(f, {"head.weight"}), load_file(str(f))
    assert got.keys() == want.keys() == tensors.keys()
    for k, t in want.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    layer = sorted(((got[k].data_ptr(), got[k].nbytes) for k in tensors if k.startswith("layer.")))
    assert all(a + n <= b < a + n + memory.ALIGN for (a, n), (b, _) in zip(layer, layer[1:]))  # packed in one range
    assert all(anonymous(h) for h, _ in mappings(layer[0][0], layer[-1][0] + layer[-1][1]))
    h = got["head.weight"]
    assert h.data_ptr() % memory.HUGE == 0 and all(anonymous(x) for x, _ in mappings(h.data_ptr(), h.data_ptr() + 1))
    e = got["embed.weight"].data_ptr()
    assert [str(f) in h for h, _ in mappings(e, e + 1)] == [True]  # the rest stay views of the file, as load_file's


def test_load_reads_an_untied_head_and_quantized_layers_and_maps_the_embedding(tmp_path, monkeypatch, caplog):
    from conftest import random_model, random_samples
    from gptqkit.checkpoint import load, save
    from gptqkit.config import QuantConfig
    from gptqkit.sequential import quantize_model

    model = random_model("llama")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    cfg = QuantConfig(bits=4, group_size=32)
    quantize_model(model, random_samples(4, 32), cfg, progress=False)
    out = save(model, tmp_path / "ckpt", cfg, dtype="bfloat16")
    loaded = load(out, kernel="torch", dense_dtype=torch.bfloat16)
    f = str(out / "model.safetensors")
    assert load_file(f)["lm_head.weight"].dtype == torch.bfloat16  # stored as it is kept: no cast copy at load

    def in_file(t):
        return [f in h for h, _ in mappings(t.data_ptr(), t.data_ptr() + 1)] == [True]

    assert in_file(loaded.model.embed_tokens.weight)  # looked up by rows: a view of the file
    assert loaded.lm_head.weight.dtype == torch.bfloat16 and not in_file(loaded.lm_head.weight)
    assert not any(in_file(b) for n, b in loaded.named_buffers() if n.endswith(("qweight", "scales")))
    # weights that would not fit in the available memory stay views of the file, whose pages the kernel can drop
    monkeypatch.setattr(memory, "available", lambda: 0)
    with caplog.at_level("INFO", logger="gptqkit.checkpoint"):
        mapped = load(out, kernel="torch", dense_dtype=torch.bfloat16)
    assert all(in_file(b) for n, b in mapped.named_buffers() if n.endswith(("qweight", "scales")))
    assert in_file(mapped.lm_head.weight)
    assert any("the weights stay views of the memory-mapped files" in r.getMessage() for r in caplog.records)


def test_a_kernel_that_refuses_the_advice_still_gets_its_tensors(monkeypatch):
    """Kernels built without transparent huge pages answer MADV_HUGEPAGE with EINVAL."""
    class NoAdvice(mmap.mmap):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr(memory.mmap, "mmap", NoAdvice)
    t = memory.empty([3 << 20], torch.uint8)
    t.fill_(7)
    assert t.shape == (3 << 20,) and t.data_ptr() % memory.HUGE == 0 and int(t[-1]) == 7


def test_a_clean_file_view_gives_its_pages_back_and_reads_the_same_bytes(tmp_path):
    """A safetensors tensor (a view of the file's private mapping) is a clean file view; drop_file_pages takes its
    resident pages out of the process, and reading it again gives the same values. Anonymous memory, and a file view
    written through (a page of its own), are not clean: dropping their pages would lose data."""
    from gptqkit.dense import _streamed

    w = torch.randn(2048, 1024).half()
    save_file({"w": w}, str(tmp_path / "t.safetensors"))
    t = load_file(str(tmp_path / "t.safetensors"))["w"]
    lo, hi = t.data_ptr(), t.data_ptr() + t.nbytes

    def resident() -> int:
        return sum(f["Rss"] for _, f in mappings(lo, hi))

    assert memory.clean_file_view(t) and not memory.clean_file_view(w) and torch.equal(t, w)
    assert resident() >= 3 << 20  # the 4 MiB just read
    memory.drop_file_pages(t)
    assert resident() <= 2 * 4096  # at most the partial pages at its ends
    assert torch.equal(t, w)  # read from the file again
    # the cast load() does: piece by piece, each piece's pages given back once copied
    b = _streamed(t, torch.bfloat16, from_file=True)
    assert torch.equal(b, w.bfloat16()) and resident() <= 2 * 4096
    assert torch.equal(_streamed(t, torch.bfloat16), b) and resident() >= 3 << 20  # the plain cast keeps them
    t[0, 0] = 7  # a private page of its own now
    assert not memory.clean_file_view(t)
