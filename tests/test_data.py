"""gptqkit.data against the real corpora in ../shared/assets and the stories260K tokenizer.

The oracle for token streams is an independent call to the tokenizer on text rebuilt here from the files, and for
window positions the GPTQ repo's own draw (random.seed(seed); random.randint(0, N - seqlen - 1)).
"""

import json
import random
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from gptqkit import data
from gptqkit.data import DataError, calibration_samples, eval_tokens, resolve_data_dir

ASSETS = Path(__file__).resolve().parents[2] / "shared/assets"
CORPORA = ASSETS / "corpora"
MODEL = ASSETS / "models/stories260K"

pytestmark = pytest.mark.skipif(
    not (CORPORA / "wikitext2/wiki.test.raw").is_file() or not (MODEL / "tokenizer.json").is_file(),
    reason=f"shared assets not found under {ASSETS} (corpora and models/stories260K are needed)",
)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture
def no_data_env(monkeypatch):
    for key in ("GPTQKIT_DATA", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)


def ids_of(tok, text):
    """The reference encoding: the tokenizer's default call (adds the Llama BOS, no EOS)."""
    return tok(text, verbose=False)["input_ids"]


def is_slice(window, ids):
    """Whether the 1-D tensor window occurs contiguously in the 1-D tensor ids."""
    n = len(window)
    starts = (ids[: len(ids) - n + 1] == window[0]).nonzero().flatten().tolist()
    return any(torch.equal(ids[j : j + n], window) for j in starts)


def ptb_lines(name):
    return [line.strip() for line in (CORPORA / "ptb" / name).read_text(encoding="utf-8").split("\n")[:-1]]


def fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


# ---- named sets ----------------------------------------------------------------------------------------------------


def test_named_windows_shape_count_and_mask(tok):
    samples = calibration_samples(tok, "ptb", nsamples=8, seqlen=128, data_dir=CORPORA)
    assert len(samples) == 8
    for s in samples:
        assert set(s) == {"input_ids", "attention_mask"}
        assert s["input_ids"].shape == (1, 128) and s["input_ids"].dtype == torch.long
        assert s["attention_mask"].dtype == torch.long and bool((s["attention_mask"] == 1).all())


def test_named_windows_are_the_gptq_draws_from_the_joined_stream(tok, caplog):
    # No ptb train split is stored: the validation file stands in, and that is logged.
    with caplog.at_level("WARNING", logger="gptqkit.data"):
        samples = calibration_samples(tok, "ptb", nsamples=6, seqlen=100, seed=3, data_dir=CORPORA)
    assert "ptb.valid.txt" in caplog.text
    stream = torch.tensor(ids_of(tok, "\n\n".join(ptb_lines("ptb.valid.txt"))))
    random.seed(3)
    for s in samples:
        i = random.randint(0, len(stream) - 100 - 1)
        assert torch.equal(s["input_ids"][0], stream[i : i + 100])


def test_seed_determinism(tok):
    a = calibration_samples(tok, "ptb-new", nsamples=4, seqlen=64, seed=1, data_dir=CORPORA)
    b = calibration_samples(tok, "ptb-new", nsamples=4, seqlen=64, seed=1, data_dir=CORPORA)
    c = calibration_samples(tok, "ptb-new", nsamples=4, seqlen=64, seed=2, data_dir=CORPORA)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_c4_windows_are_slices_of_single_long_documents(tok):
    seqlen = 256
    samples = calibration_samples(tok, "c4", nsamples=5, seqlen=seqlen, seed=0, data_dir=CORPORA)
    docs = [d for d in (CORPORA / "c4/c4_sample.txt").read_text(encoding="utf-8").split("\n") if d.strip()]
    doc_ids = [torch.tensor(ids) for ids in tok(docs, verbose=False)["input_ids"]]
    for s in samples:
        w = s["input_ids"][0]
        assert w.shape == (seqlen,)
        assert any(is_slice(w, d) for d in doc_ids if len(d) > seqlen)


def test_more_window_tokens_than_the_corpus_offers_is_warned(tok, tmp_path, caplog):
    """Windows that cannot all be distinct text (nsamples * seqlen above the tokens of the documents drawn from, or
    of the whole stream) are allowed, as GPTQ's sampler allows them, but said; enough text draws no warning."""
    (tmp_path / "c4").mkdir()
    long_doc = " ".join(f"word{k}" for k in range(400))  # one document of some hundreds of tokens
    (tmp_path / "c4/c4_sample.txt").write_text(long_doc + "\nshort one\n", encoding="utf-8")
    n_tokens = len(ids_of(tok, long_doc))
    with caplog.at_level("WARNING", logger="gptqkit.data"):
        calibration_samples(tok, "c4", nsamples=n_tokens // 64 + 1, seqlen=64, data_dir=tmp_path)
    assert f"offers only {n_tokens} to draw them from, so they overlap" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gptqkit.data"):
        calibration_samples(tok, "c4", nsamples=n_tokens // 64 - 1, seqlen=64, data_dir=tmp_path)
        calibration_samples(tok, "wikitext2", nsamples=4, seqlen=64, data_dir=CORPORA)
    assert "offers only" not in caplog.text
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb/ptb.train.txt").write_text(long_doc + "\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="gptqkit.data"):
        calibration_samples(tok, "ptb", nsamples=n_tokens // 64 + 2, seqlen=64, data_dir=tmp_path)
    assert "ptb offers only" in caplog.text


def test_c4_falls_back_to_joined_documents_when_none_is_long_enough(tok, tmp_path, caplog):
    (tmp_path / "c4").mkdir()
    docs = [f"Document {k} says that the cat sat on the mat number {k}." for k in range(60)]
    (tmp_path / "c4/c4_sample.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="gptqkit.data"):
        samples = calibration_samples(tok, "c4", nsamples=3, seqlen=200, data_dir=tmp_path)
    assert "no document is longer than seqlen=200" in caplog.text
    stream = torch.tensor(ids_of(tok, "\n\n".join(docs)))
    for s in samples:
        assert s["input_ids"].shape == (1, 200) and is_slice(s["input_ids"][0], stream)


def test_corpus_shorter_than_seqlen_is_an_error(tok, tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb/ptb.train.txt").write_text(" a short corpus \n", encoding="utf-8")
    with pytest.raises(DataError, match="lower seqlen"):
        calibration_samples(tok, "ptb", nsamples=2, seqlen=64, data_dir=tmp_path)


def test_wikitext_rows_match_the_hf_dataset():
    # HF's wikitext builder yields every line of wiki.test.raw: with its "\n", or "" when blank. 4358 test rows.
    rows = data._rows("wikitext2", "test", CORPORA)
    assert len(rows) == 4358
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    assert all(r == "" or (r.endswith("\n") and r.strip()) for r in rows)


def test_wikitext_eval_stream_and_max_chars(tok):
    full = eval_tokens(tok, "wikitext2", data_dir=CORPORA)
    rows = data._rows("wikitext2", "test", CORPORA)
    text = "\n\n".join(rows)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert full.dtype == torch.long and full.shape[0] == 1
    assert full[0].tolist() == ids_of(tok, text)
    assert int((full == tok.bos_token_id).sum()) == 1 and full[0, 0] == tok.bos_token_id  # BOS once, at the start
    part = eval_tokens(tok, "wikitext2", data_dir=CORPORA, max_chars=2000)
    assert part[0].tolist() == ids_of(tok, text[:2000])
    assert part.shape[1] < full.shape[1] // 100


def test_ptb_eval_streams_follow_gptq(tok):
    # 'ptb' is the validation split joined with "\n\n", 'ptb-new' the test split joined with " ".
    ptb = eval_tokens(tok, "ptb", data_dir=CORPORA, max_chars=3000)
    assert ptb[0].tolist() == ids_of(tok, "\n\n".join(ptb_lines("ptb.valid.txt"))[:3000])
    new = eval_tokens(tok, "ptb-new", data_dir=CORPORA, max_chars=3000)
    assert new[0].tolist() == ids_of(tok, " ".join(ptb_lines("ptb.test.txt"))[:3000])


def test_c4_eval_streams(tok):
    c4 = eval_tokens(tok, "c4", data_dir=CORPORA, seqlen=128)
    assert c4.shape == (1, 256 * 128)
    again = eval_tokens(tok, "c4", data_dir=CORPORA, seqlen=128)
    assert torch.equal(c4, again)  # seeded with 0 whatever the caller does
    new = eval_tokens(tok, "c4-new", data_dir=CORPORA, seqlen=128)
    docs = [d for d in (CORPORA / "c4/c4_sample.txt").read_text(encoding="utf-8").split("\n") if d.strip()]
    assert new[0].tolist() == ids_of(tok, " ".join(docs[:1100]))[: 256 * 128]


# ---- files, lists, datasets ----------------------------------------------------------------------------------------


def test_jsonl_file_one_sample_per_text(tok, tmp_path):
    texts = [f"Story {k}: once upon a time a little dog named Max found a red ball in the park." for k in range(10)]
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": k}) for k, t in enumerate(texts)) + "\n", encoding="utf-8")
    samples = calibration_samples(tok, path, nsamples=4, seqlen=12, seed=0)
    assert len(samples) == 4
    expected = [ids_of(tok, t)[:12] for t in texts]
    for s in samples:
        assert s["input_ids"].shape == (1, 12) and s["input_ids"][0].tolist() in expected
    assert len({tuple(s["input_ids"][0].tolist()) for s in samples}) == 4  # four different texts
    tokens = eval_tokens(tok, str(path))
    assert tokens[0].tolist() == ids_of(tok, "\n\n".join(texts))


def test_jsonl_without_text_field_names_the_file(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine text here for sure"}\n{"content": "no text field"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 has no 'text'"):
        calibration_samples(tok, str(path), nsamples=2)


def test_txt_file_documents(tok, tmp_path):
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("The first document has\ntwo lines of text.\n\nThe second document is here.\n")
    got = [s["input_ids"][0].tolist() for s in calibration_samples(tok, paragraphs, nsamples=10, seqlen=512)]
    assert sorted(got) == sorted([ids_of(tok, "The first document has\ntwo lines of text."),
                                  ids_of(tok, "The second document is here.")])
    lines = tmp_path / "lines.txt"
    lines.write_text("The first line is one document.\nThe second line is another.\nA third one too.\n")
    assert len(calibration_samples(tok, lines, nsamples=10, seqlen=512)) == 3
    assert eval_tokens(tok, lines, max_chars=20)[0].tolist() == ids_of(tok, lines.read_text()[:20])


def test_list_of_strings_drops_short_texts_and_shuffles_with_seed(tok):
    texts = ["hi", "ok", "a much longer text about a cat and a dog", "another long text about the sea and a boat",
             "a third long text about a girl who likes to sing"]
    samples = calibration_samples(tok, texts, nsamples=10, seqlen=2048)
    got = sorted(s["input_ids"][0].tolist() for s in samples)
    assert got == sorted(ids_of(tok, t) for t in texts[2:])  # the two short ones are dropped, none is joined
    first = [calibration_samples(tok, texts, nsamples=1, seed=s)[0]["input_ids"][0].tolist() for s in range(8)]
    assert len({tuple(f) for f in first}) > 1  # the seed picks which texts come first


def test_all_short_texts_is_an_empty_set_error(tok):
    with pytest.raises(DataError, match="calibration set is empty: all 3 texts are shorter than 4 tokens"):
        calibration_samples(tok, ["a", "b", "c"], nsamples=2)


def test_hf_dataset_object_is_read_by_its_text_column(tok):
    class Dataset:  # looks like datasets.Dataset to the duck check, without needing the package
        def __init__(self, columns):
            self.columns = columns
            self.column_names = list(columns)

        def __getitem__(self, key):
            return self.columns[key]

    Dataset.__module__ = "datasets.arrow_dataset"
    texts = ["a first text that is long enough to keep", "a second text that is long enough to keep"]
    samples = calibration_samples(tok, Dataset({"text": texts}), nsamples=2)
    assert sorted(s["input_ids"][0].tolist() for s in samples) == sorted(ids_of(tok, t) for t in texts)
    with pytest.raises(DataError, match="no 'text' column .*content"):
        calibration_samples(tok, Dataset({"content": texts}), nsamples=2)


# ---- errors --------------------------------------------------------------------------------------------------------


def test_unknown_name_lists_named_sets(tok):
    with pytest.raises(DataError) as err:
        calibration_samples(tok, "wikitext103", data_dir=CORPORA)
    message = str(err.value)
    assert all(name in message for name in data.NAMED)
    assert "path" in message and "list of strings" in message and "\n" not in message


def test_missing_file_and_bad_arguments(tok, tmp_path):
    with pytest.raises(DataError, match="not found"):
        calibration_samples(tok, str(tmp_path / "nothing.txt"))
    with pytest.raises(DataError, match="nsamples"):
        calibration_samples(tok, "ptb", nsamples=0, data_dir=CORPORA)
    with pytest.raises(DataError, match="seqlen"):
        calibration_samples(tok, "ptb", seqlen=0, data_dir=CORPORA)
    with pytest.raises(DataError, match="max_chars"):
        eval_tokens(tok, "ptb", data_dir=CORPORA, max_chars=0)


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("GPTQKIT_DATA", raising=False)
    assert resolve_data_dir(None) is None
    monkeypatch.setenv("GPTQKIT_DATA", str(CORPORA))
    assert resolve_data_dir(None) == CORPORA
    assert resolve_data_dir(tmp_path) == tmp_path  # the argument wins
    with pytest.raises(DataError, match="is not a folder"):
        resolve_data_dir(tmp_path / "missing")


def test_env_data_dir_is_used(tok, monkeypatch):
    monkeypatch.setenv("GPTQKIT_DATA", str(CORPORA))
    expected = ids_of(tok, "\n\n".join(ptb_lines("ptb.valid.txt"))[:500])
    assert eval_tokens(tok, "ptb", max_chars=500)[0].tolist() == expected


# ---- the hub path: must fail fast and clearly ------------------------------------------------------------------------


def test_hub_without_datasets_package(tok, monkeypatch, tmp_path, no_data_env):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        eval_tokens(tok, "wikitext2", data_dir=tmp_path)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "pip install gptqkit[datasets]" in message and "\n" not in message
    assert str(tmp_path / "wikitext2/wiki.test.raw") in message  # says where it looked
    assert "GPTQKIT_DATA" in message


def test_hub_offline_fails_fast(tok, monkeypatch, no_data_env):
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline mode)")

    fake_datasets(monkeypatch, load_dataset)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(data, "_hub_unreachable", lambda: pytest.fail("no network probe in offline mode"))
    start = time.perf_counter()
    with pytest.raises(DataError, match="HF_DATASETS_OFFLINE is set") as err:
        calibration_samples(tok, "wikitext2", nsamples=2, seqlen=16)
    assert time.perf_counter() - start < 5
    assert "no data dir given" in str(err.value) and "\n" not in str(err.value)
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "train"})]


def test_hub_network_failure_is_a_data_error(tok, monkeypatch, no_data_env):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Max retries exceeded with url: https://huggingface.co/...")

    fake_datasets(monkeypatch, load_dataset)
    start = time.perf_counter()
    with pytest.raises(DataError, match="cannot be reached"):  # by the probe, or by the fake if the probe succeeds
        eval_tokens(tok, "c4")
    assert time.perf_counter() - start < 10
    monkeypatch.setattr(data, "_hub_unreachable", lambda: None)
    with pytest.raises(DataError, match=r"hub cannot be reached \(ConnectionError: Max retries"):
        eval_tokens(tok, "c4")


def test_hub_rows_are_used_as_the_gptq_repo_loads_them(tok, monkeypatch, no_data_env):
    calls = []
    rows = [f"row {k} of a small corpus with some words in it" for k in range(200)]

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": rows, "sentence": rows}

    fake_datasets(monkeypatch, load_dataset)
    monkeypatch.setattr(data, "_hub_unreachable", lambda: None)
    samples = calibration_samples(tok, "c4", nsamples=2, seqlen=32)
    assert len(samples) == 2
    assert calls[-1] == (("allenai/c4",), {"split": "train",
                                           "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}})
    assert eval_tokens(tok, "ptb")[0].tolist() == ids_of(tok, "\n\n".join(rows))
    assert calls[-1] == (("ptb_text_only", "penn_treebank"), {"split": "validation"})
