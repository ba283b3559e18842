"""Embedding and lm_head kept in a 16-bit storage dtype while the model computes in fp32 (gptqkit.dense)."""

import torch

from conftest import random_model, stories_checkpoint
from gptqkit.checkpoint import load
from gptqkit.dense import StoredEmbedding, StoredLinear, store_dense


def test_stories_checkpoint_in_fp32_with_bf16_embedding_and_head(tmp_path_factory):
    ckpt = stories_checkpoint(tmp_path_factory)
    ref = load(ckpt, dtype=torch.float32, kernel="torch")
    m = load(ckpt, dtype=torch.float32, kernel="torch", dense_dtype="bfloat16")
    emb, head = m.get_input_embeddings(), m.get_output_embeddings()
    assert isinstance(emb, StoredEmbedding) and isinstance(head, StoredLinear)
    assert emb.weight.dtype == torch.bfloat16 and head.weight is emb.weight  # stories260K ties them: one copy
    assert m.model.norm.weight.dtype == torch.float32
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, m(ids).logits
    assert b.dtype == torch.float32
    # the only difference is bf16 rounding of the two matrices (and of lm_head's input)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def test_untied_head_gets_its_own_copy_and_subclasses_are_left_alone():
    model = random_model("llama")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    w_emb, w_head = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    saved = store_dense(model, torch.bfloat16)
    assert saved == (w_emb.numel() + w_head.numel()) * 2
    assert torch.equal(model.model.embed_tokens.weight, w_emb.bfloat16())
    assert torch.equal(model.lm_head.weight, w_head.bfloat16())
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        out = model(ids).logits
    assert out.dtype == torch.float32 and torch.isfinite(out).all()

    class Shifted(torch.nn.Embedding):  # a subclass that computes something else keeps its class and dtype
        def forward(self, ids):
            return super().forward(ids) + 1

    other = random_model("llama")
    other.model.embed_tokens = Shifted(256, 64)
    store_dense(other, torch.bfloat16)
    assert type(other.get_input_embeddings()) is Shifted
    assert other.get_input_embeddings().weight.dtype == torch.float32


def test_gemmas_scaled_embedding_is_stored_with_its_scale():
    """Gemma's embedding multiplies its rows by sqrt(hidden): it is stored in bf16 like a plain one, shared with the
    tied head, and multiplies by the same scale; the logits are the fp32 model's to bf16 rounding."""
    model = random_model("gemma")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        rows = model.get_input_embeddings()(ids)
    store_dense(model, torch.bfloat16, compute=torch.float32)
    emb = model.get_input_embeddings()
    assert isinstance(emb, StoredEmbedding) and emb.weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight is emb.weight
    assert float(emb.embed_scale) == model.config.hidden_size ** 0.5
    assert "model.embed_tokens.embed_scale" not in model.state_dict()
    with torch.no_grad():
        got = emb(ids)
        assert (got - rows).abs().max() <= 2**-8 * rows.abs().max()  # the scale applied: bf16 rows times it
        out = model(ids).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_an_untied_half_embedding_keeps_its_own_tensor(tmp_path):
    """An untied embedding already in fp16 (what most GPTQ checkpoints hold) is kept as it is, no copy, so a loaded
    checkpoint looks rows up in its memory-mapped tensor; its rows reach the model exactly; the head is still cast to
    bf16 for the GEMV. A tied one is cast with its head."""
    model = random_model("llama")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.model.embed_tokens.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().half())
    emb = model.model.embed_tokens.weight
    saved = store_dense(model, torch.bfloat16, compute=torch.float32)
    kept = model.get_input_embeddings()
    assert kept.weight.dtype == torch.float16 and kept.weight.data_ptr() == emb.data_ptr()
    assert model.lm_head.weight.dtype == torch.bfloat16 and saved == model.lm_head.weight.numel() * 2
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        assert torch.equal(kept(ids), emb[ids].float())
    tied = random_model("llama")
    tied.model.embed_tokens.weight = torch.nn.Parameter(tied.model.embed_tokens.weight.detach().half())
    tied.lm_head.weight = tied.model.embed_tokens.weight
    store_dense(tied, torch.bfloat16)
    assert tied.get_input_embeddings().weight.dtype == torch.bfloat16


def test_decode_rows_of_a_bf16_head_use_the_fp32_gemv():
    """Fewer than GEMV_ROWS fp32 rows against a bf16 head: the avx2 C GEMV (where it builds) sums in fp32, so it
    matches float64 on the bf16 weights to fp32 rounding, for any K (2001: a 16-wide tail), with and without bias;
    prefill rows and autograd take torch's bf16 path."""
    import pytest

    from gptqkit.dense import GEMV_ROWS
    from gptqkit.kernels import cpu_avx2

    if isinstance(cpu_avx2.library(), str):
        pytest.skip(f"avx2 C library unavailable: {cpu_avx2.library()}")
    gen = torch.Generator().manual_seed(0)
    for K, N, bias in ((2048, 300, False), (2001, 77, True)):
        lin = StoredLinear(K, N, bias=bias)
        lin.weight = torch.nn.Parameter(torch.randn(N, K, generator=gen).bfloat16(), requires_grad=False)
        if bias:
            lin.bias = torch.nn.Parameter(torch.randn(N, generator=gen), requires_grad=False)
        b = lin.bias.double() if bias else 0
        for shape in ((1, 1, K), (3, K), (1, GEMV_ROWS - 1, K)):
            x = torch.randn(*shape, generator=gen)
            with torch.no_grad():
                y = lin(x)
            ref = x.double() @ lin.weight.double().T + b
            assert y.dtype == torch.float32 and y.shape == ref.shape
            assert ((y - ref).norm() / ref.norm()) < 1e-6, shape  # bf16 x and output would give ~2e-3
        x = torch.randn(GEMV_ROWS, K, generator=gen)
        with torch.no_grad():
            y = lin(x)
        ref = x.double() @ lin.weight.double().T + b
        assert 1e-4 < ((y - ref).norm() / ref.norm()) < 1e-2  # torch's bf16 GEMM: x rounded to bf16
    x = torch.randn(1, 2001, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_bf16_gemv_builds_agree():
    """The AVX2 and the AVX-512 (VNNI build) bf16 GEMVs both match float64 to fp32 rounding; only their summation
    order differs."""
    import pytest

    from gptqkit.kernels import cpu_avx2

    if not cpu_avx2.has_vnni() or isinstance(cpu_avx2.library(vnni=True), str):
        pytest.skip("this CPU has no AVX512-VNNI build")
    gen = torch.Generator().manual_seed(1)
    for K, N, M in ((2048, 257, 1), (2001, 64, 3), (40, 9, 2)):  # 2001, 40: 512-bit body, 256-bit and scalar tails
        w, x = torch.randn(N, K, generator=gen).bfloat16(), torch.randn(M, K, generator=gen)
        ref = x.double() @ w.double().T
        for lib in (cpu_avx2.library(), cpu_avx2.library(vnni=True)):
            y = cpu_avx2.bf16_matmul(x, w, lib)
            assert ((y - ref).norm() / ref.norm()) < 1e-6, (K, lib)


def _file_rss(path) -> int:
    """Resident bytes of this process's mappings of file `path` (/proc/self/smaps)."""
    total, cur = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            cur = head[-1] == str(path)
        elif cur and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def test_an_embedding_reads_its_rows_from_the_file_not_its_mapping(tmp_path):
    """read_rows_from: the rows looked up equal the mapped tensor's (repeats, runs of consecutive ids, any shape),
    and the file's mapping gains no resident pages, where a lookup in the mapping itself maps MiBs (each row's page,
    and Linux's fault-around window about it). Ids out of range raise as F.embedding does; a weight written in place,
    or one that needs gradients, is looked up in the tensor."""
    import copy
    import os

    import pytest
    from safetensors.torch import load_file, save_file

    from gptqkit.checkpoint import safetensors_offset

    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("needs Linux's /proc/self/smaps")
    gen = torch.Generator().manual_seed(0)
    f = tmp_path / "model.safetensors"
    save_file({"a.bias": torch.randn(3), "model.embed_tokens.weight": torch.randn(8192, 256, generator=gen).bfloat16()},
              str(f))
    assert f.read_bytes()  # in the page cache, as after load() read the checkpoint
    w = load_file(str(f))["model.embed_tokens.weight"]  # a view of the file's mapping, as load() keeps it
    emb = StoredEmbedding(8192, 256, _weight=torch.nn.Parameter(w, requires_grad=False))
    emb.compute_dtype = torch.float32
    where = safetensors_offset([f], "model.embed_tokens.weight")
    assert where[0] == f and safetensors_offset([f], "nothing") is None
    emb.read_rows_from(*where)
    ids = torch.randint(0, 8192, (2, 300), generator=gen)
    ids[0, :40] = torch.arange(1000, 1040)  # a run of consecutive rows: one read
    ids[1, :5] = 7  # repeats
    before = _file_rss(f)
    with torch.no_grad():
        got = emb(ids)
        one = emb(torch.tensor([[8191]]))
    assert _file_rss(f) - before < 64 << 10
    want = w[ids].float()
    assert _file_rss(f) - before > 1 << 20  # the measure sees a lookup in the mapping
    assert got.dtype == torch.float32 and torch.equal(got, want) and torch.equal(one, w[8191].float().view(1, 1, -1))
    for bad in (torch.tensor([8192]), torch.tensor([[3, -1]])):
        with pytest.raises(IndexError, match="out of range"):
            emb(bad)
    with torch.no_grad():
        emb.weight[7] += 1  # copy-on-write: the file keeps the old row, the tensor has the new one
        assert torch.equal(emb(torch.tensor([7])), w[7:8].float()) and not torch.equal(w[7], load_file(str(f))[
            "model.embed_tokens.weight"][7])
    emb.read_rows_from(*where)
    twin = copy.deepcopy(emb)  # a copy reads its own weight: no file descriptor is copied
    assert twin.rows is None and torch.equal(twin(ids), emb.weight[ids].float())
    emb.weight.requires_grad_(True)
    assert emb(torch.tensor([1, 2])).grad_fn is not None
