"""Calibration samples and evaluation token streams.

Named sets follow the GPTQ reference repo (IST-DASLab/gptq, datautils.py) so that numbers compare with the paper.
Calibration is nsamples random windows of exactly seqlen tokens, seeded; evaluation is one token stream:

    wikitext2  calibration: train rows joined with "\n\n"         eval: test rows joined with "\n\n"
    ptb        calibration: train sentences joined with "\n\n"    eval: validation sentences, "\n\n" (as GPTQ)
    ptb-new    calibration: train sentences joined with " "       eval: test sentences joined with " "
    c4         calibration: a window of a random train document longer than seqlen (GPTQ's sampler)
               eval: 256 such windows of validation documents, drawn with seed 0, concatenated
    c4-new     calibration: as c4
               eval: the first 1100 validation documents joined with " ", cut to 256 * seqlen tokens

Sources: a local folder (the `data_dir` argument, else env GPTQKIT_DATA) laid out like

    wikitext2/wiki.test.raw, wiki.train.raw (else wiki.valid.raw, else wiki.valid.tokens: logged)
    ptb/ptb.test.txt, ptb.valid.txt, ptb.train.txt (else ptb.valid.txt: logged)
    c4/c4-train.00000-of-01024.json(.gz), c4-validation.00000-of-00008.json(.gz) (else c4_sample.txt: logged)

and otherwise the hub through the optional `datasets` package, failing fast with a DataError when it cannot be used.

Token streams: one tokenizer call on the joined text (wikitext2 test, 1.3 MB, takes 1-2 s with a fast tokenizer, so it
is not chunked: chunking would change the tokens at the seams). Special tokens: only the BOS that the tokenizer adds by
default, once at the start, as `tokenizer(text)` does in the GPTQ repo; never EOS or separators inside the stream.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import socket
import time
import urllib.parse
from pathlib import Path
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)

NAMED = ("wikitext2", "c4", "c4-new", "ptb", "ptb-new")

MIN_TOKENS = 4  # texts shorter than this are dropped from a list-of-texts calibration set
C4_EVAL_WINDOWS = 256  # the GPTQ repo evaluates C4 on 256 windows (c4) or 256 * seqlen tokens (c4-new)
C4_NEW_EVAL_DOCS = 1100

# Local files per (set, split), relative to the data dir: the real split, then stand-ins used (and logged) when the
# split is absent (no train splits ship with ../shared/assets/corpora).
_LOCAL = {
    ("wikitext2", "test"): ("wikitext2/wiki.test.raw",),
    ("wikitext2", "train"): ("wikitext2/wiki.train.raw",),
    ("ptb", "test"): ("ptb/ptb.test.txt",),
    ("ptb", "validation"): ("ptb/ptb.valid.txt",),
    ("ptb", "train"): ("ptb/ptb.train.txt",),
    ("c4", "train"): ("c4/c4-train.00000-of-01024.json.gz", "c4/c4-train.00000-of-01024.json"),
    ("c4", "validation"): ("c4/c4-validation.00000-of-00008.json.gz", "c4/c4-validation.00000-of-00008.json"),
}
_STAND_INS = {
    ("wikitext2", "train"): ("wikitext2/wiki.valid.raw", "wikitext2/wiki.valid.tokens"),
    ("ptb", "train"): ("ptb/ptb.valid.txt",),
    ("c4", "train"): ("c4/c4_sample.txt",),  # one document per line
    ("c4", "validation"): ("c4/c4_sample.txt",),
}

# load_dataset arguments per set, as the GPTQ repo calls it, and the text column.
_HUB = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), "text"),
    "ptb": (("ptb_text_only", "penn_treebank"), "sentence"),
    "c4": (("allenai/c4",), "text"),
}
_C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}


class DataError(ValueError):
    """A data set cannot be read or used; the message names the problem and the fix."""


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The local corpora folder: `data_dir`, else env GPTQKIT_DATA, else None (use the hub)."""
    given = data_dir if data_dir is not None else os.environ.get("GPTQKIT_DATA") or None
    if given is None:
        return None
    path = Path(given).expanduser()
    if not path.is_dir():
        source = "data_dir" if data_dir is not None else "GPTQKIT_DATA"
        raise DataError(f"{source} {str(path)!r} is not a folder; point it at a folder laid out like "
                        "wikitext2/wiki.test.raw")
    return path


def calibration_samples(
    tokenizer: Any,
    dataset: Any,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Calibration inputs for GPTQ: `nsamples` dicts of input_ids / attention_mask, each [1, T], T <= seqlen.

    `dataset` is a name from NAMED (random windows of exactly seqlen tokens, as the paper does), a list of strings or a
    `datasets.Dataset` with a "text" column (each text one sample, truncated to seqlen), or a path: .jsonl/.json(.gz)
    with a "text" field per line, or a text file whose documents are separated by blank lines (one per line when the
    file has no blank line). Lists and files take the first nsamples texts of a seeded shuffle, dropping texts shorter
    than 4 tokens. The attention mask is all ones: batching and padding are the caller's job.

    >>> samples = calibration_samples(tok, "wikitext2", nsamples=128, seqlen=2048, data_dir="corpora")
    >>> samples[0]["input_ids"].shape
    torch.Size([1, 2048])
    """
    if not isinstance(nsamples, int) or nsamples < 1:
        raise DataError(f"nsamples must be an integer >= 1, got {nsamples!r}")
    if not isinstance(seqlen, int) or seqlen < 1:
        raise DataError(f"seqlen must be an integer >= 1, got {seqlen!r}")
    name = _named(dataset)
    if name is None:
        texts = _texts(dataset)
        return [_sample(ids) for ids in _text_samples(tokenizer, texts, nsamples, seqlen, seed)]

    rng = random.Random(seed)  # the same draws as random.seed(seed) + random.randint in the GPTQ repo
    folder = resolve_data_dir(data_dir)
    base = name.removesuffix("-new")
    docs = _rows(base, "train", folder)
    windows = None
    if base == "c4":
        drawn = _doc_windows(tokenizer, docs, nsamples, seqlen, rng)
        if drawn is None:
            logger.warning("c4: no document is longer than seqlen=%d tokens; drawing windows from the documents "
                           "joined with '\\n\\n' instead", seqlen)
        else:
            windows, source = drawn
    if windows is None:
        sep = " " if name == "ptb-new" else "\n\n"
        stream = _encode(tokenizer, sep.join(docs))
        windows, source = _stream_windows(stream, nsamples, seqlen, rng, name), len(stream)
    if nsamples * seqlen > source:
        # A small local corpus (the bundled C4 sample has 118 documents, 9 of them over 2048 SmolLM2 tokens) cannot
        # fill many long windows: they overlap and the Hessians see the same few texts many times over.
        logger.warning("calibration: %d windows of %d tokens need %d tokens but %s offers only %d to draw them from, "
                       "so they overlap (the same text counted many times); use fewer samples, a shorter seqlen or a "
                       "larger corpus", nsamples, seqlen, nsamples * seqlen, name, source)
    logger.info("calibration: %d windows of %d tokens from %s (seed %d)", len(windows), seqlen, name, seed)
    return [_sample(w) for w in windows]


def eval_tokens(
    tokenizer: Any,
    dataset: Any,
    data_dir: str | os.PathLike | None = None,
    max_chars: int | None = None,
    seqlen: int = 2048,
) -> torch.LongTensor:
    """The evaluation token stream [1, N] of a named set (paper protocol, see the module docstring), a local file (its
    whole text; .jsonl rows joined with "\\n\\n"), or a list of strings (joined with "\\n\\n").

    `max_chars` keeps only the first max_chars characters of the joined text (c4: of the documents) for quick slices.
    `seqlen` matters only for c4 and c4-new, whose GPTQ protocol is defined in windows of seqlen tokens.

    >>> tokens = eval_tokens(tok, "wikitext2", data_dir="corpora")   # [1, N]
    >>> perplexity(model, tokens, seqlen=2048)
    """
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise DataError(f"max_chars must be an integer >= 1 or None, got {max_chars!r}")
    if not isinstance(seqlen, int) or seqlen < 1:
        raise DataError(f"seqlen must be an integer >= 1, got {seqlen!r}")
    name = _named(dataset)
    if name is None:
        path = Path(dataset).expanduser() if isinstance(dataset, (str, os.PathLike)) else None
        if path is not None and path.is_file() and not _is_jsonl(path):
            text = path.read_text(encoding="utf-8")
        else:
            text = "\n\n".join(_texts(dataset))
        ids = _encode(tokenizer, text[:max_chars])
    else:
        folder = resolve_data_dir(data_dir)
        ids = _named_eval(tokenizer, name, folder, max_chars, seqlen)
    tokens = torch.tensor(ids, dtype=torch.long).unsqueeze(0)
    bos = "not added (the tokenizer adds none)" if _default_bos(tokenizer) is None else (
        "at the start of each document, inside the windows that start one" if name == "c4" else "once, at the start")
    logger.info("eval tokens: %d from %s; BOS %s", tokens.shape[1], name or "the given text", bos)
    return tokens


def _named_eval(tokenizer: Any, name: str, folder: Path | None, max_chars: int | None, seqlen: int) -> list[int]:
    if name == "wikitext2":
        return _encode(tokenizer, "\n\n".join(_rows("wikitext2", "test", folder))[:max_chars])
    if name == "ptb":
        return _encode(tokenizer, "\n\n".join(_rows("ptb", "validation", folder))[:max_chars])
    if name == "ptb-new":
        return _encode(tokenizer, " ".join(_rows("ptb", "test", folder))[:max_chars])
    docs = _rows("c4", "validation", folder)
    if name == "c4-new":
        return _encode(tokenizer, " ".join(docs[:C4_NEW_EVAL_DOCS])[:max_chars])[: C4_EVAL_WINDOWS * seqlen]
    docs = _clip_docs(docs, max_chars)
    rng = random.Random(0)  # the GPTQ repo reseeds with 0 for the C4 validation windows
    drawn = _doc_windows(tokenizer, docs, C4_EVAL_WINDOWS, seqlen, rng)
    windows = drawn[0] if drawn is not None else None
    if windows is None:
        logger.warning("c4: no validation document is longer than seqlen=%d tokens; drawing windows from the "
                       "documents joined with '\\n\\n' instead", seqlen)
        windows = _stream_windows(_encode(tokenizer, "\n\n".join(docs)), C4_EVAL_WINDOWS, seqlen, rng, name)
    return torch.cat(windows).tolist()


# ---- what the dataset argument is ----------------------------------------------------------------------------------


def _named(dataset: Any) -> str | None:
    """The NAMED entry `dataset` stands for, None for a path / texts / Dataset, DataError for an unknown name."""
    if not isinstance(dataset, str):
        return None
    if dataset.lower() in NAMED:
        return dataset.lower()
    path = Path(dataset).expanduser()
    if path.exists() or os.sep in dataset or "/" in dataset or path.suffix:
        return None  # a path; _texts / eval_tokens report a missing file
    raise DataError(f"unknown dataset {dataset!r}: use one of {', '.join(NAMED)}, a path to a .txt or .jsonl file, "
                    "or a list of strings")


def _texts(dataset: Any) -> list[str]:
    """The texts of a path, a list/tuple of strings or a `datasets.Dataset`."""
    if isinstance(dataset, (str, os.PathLike)):
        path = Path(dataset).expanduser()
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} not found; pass an existing .txt/.jsonl file or a dataset name "
                            f"({', '.join(NAMED)})")
        return _read_jsonl(path) if _is_jsonl(path) else _read_documents(path)
    if type(dataset).__module__.split(".")[0] == "datasets":  # duck-typed: no need to import `datasets` here
        columns = getattr(dataset, "column_names", None)
        if not isinstance(columns, list):
            raise DataError(f"{type(dataset).__name__} is not a single split; pass one, e.g. ds['train']")
        if "text" not in columns:
            raise DataError(f"the dataset has no 'text' column (columns: {', '.join(columns)}); rename the text "
                            "column to 'text', e.g. ds.rename_column('content', 'text')")
        dataset = list(dataset["text"])
    if isinstance(dataset, (list, tuple)):
        bad = next((i for i, t in enumerate(dataset) if not isinstance(t, str)), None)
        if bad is not None:
            raise DataError(f"text {bad} is a {type(dataset[bad]).__name__}, not a string; pass a list of strings")
        return list(dataset)
    raise DataError(f"cannot read calibration data from a {type(dataset).__name__}: use one of {', '.join(NAMED)}, "
                    "a path to a .txt or .jsonl file, a list of strings or a datasets.Dataset with a 'text' column")


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _read_jsonl(path: Path) -> list[str]:
    """The "text" field of each line (C4's .json.gz files are JSON lines too)."""
    texts = []
    with _open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not JSON ({e.msg}); write one JSON object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}: line {n} has no 'text' string field; write one object per line "
                                'like {"text": "..."}')
            texts.append(row["text"])
    return texts


def _read_documents(path: Path) -> list[str]:
    """Documents of a text file: blank-line separated paragraphs, or one per line when the file has no blank line."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if any(not line.strip() for line in lines[:-1]):
        docs, current = [], []
        for line in lines:
            if line.strip():
                current.append(line)
            elif current:
                docs.append("\n".join(current))
                current = []
        if current:
            docs.append("\n".join(current))
        return docs
    return [line for line in lines if line.strip()]


# ---- named sets: rows as the hub dataset gives them ----------------------------------------------------------------


def _rows(base: str, split: str, folder: Path | None) -> list[str]:
    """The rows of a named set's split: local files first, then the hub."""
    real, stand_ins = _LOCAL[(base, split)], _STAND_INS.get((base, split), ())
    looked = []
    if folder is not None:
        for rel in real + stand_ins:
            path = folder / rel
            looked.append(str(path))
            if path.is_file():
                if rel in stand_ins:
                    _log_stand_in(base, split, path)
                return _read_rows(base, path)
    return _hub_rows(base, split, real[0], looked)


def _log_stand_in(base: str, split: str, path: Path) -> None:
    if base == "c4":
        logger.warning("c4 %s split not found; using %s, the same documents serve calibration and evaluation, so "
                       "they overlap", split, path)
    elif base == "ptb":
        logger.warning("ptb %s split not found; using %s instead, which is also the 'ptb' evaluation split (GPTQ "
                       "evaluates 'ptb' on validation), so they overlap", split, path)
    else:
        logger.warning("%s %s split not found; using %s instead", base, split, path)


def _read_rows(base: str, path: Path) -> list[str]:
    if base == "c4":
        return _read_jsonl(path) if _is_jsonl(path) else [line.rstrip("\n") for line in _lines(path) if line.strip()]
    if base == "ptb":
        return [line.strip() for line in _lines(path)]  # ptb_text_only strips each line
    # The HF wikitext builder yields each line of the raw file with its "\n", and "" for a blank line.
    return [line if line.strip() else "" for line in _lines(path)]


def _lines(path: Path) -> list[str]:
    """Lines with their line ends, split exactly like iterating over open(path) (not str.splitlines)."""
    with _open(path) as f:
        return list(f)


def _hub_rows(base: str, split: str, rel: str, looked: list[str]) -> list[str]:
    """Load a named split from the hub the way the GPTQ repo does, or fail fast with a one-line DataError."""
    where = ", ".join(looked) if looked else "no data dir given"
    head = f"dataset {base!r} ({split} split) is not available locally (looked in: {where})"
    fix = f"Set GPTQKIT_DATA or --data-dir to a folder holding {rel}, or pass a local file"
    try:
        import datasets
    except ImportError:
        raise DataError(f"{head} and the `datasets` package is not installed (pip install gptqkit[datasets]). {fix}") \
            from None
    offline = [k for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(k, "").upper() in
               {"1", "ON", "YES", "TRUE"}]
    if not offline:
        reason = _hub_unreachable()
        if reason is not None:
            raise DataError(f"{head} and the hub cannot be reached ({reason}). {fix}")
    args, column = _HUB[base]
    kwargs = {"data_files": {split: _C4_FILES[split]}} if base == "c4" else {}
    try:
        # In offline mode this reads the local HF cache only, which is quick either way.
        ds = datasets.load_dataset(*args, split=split, **kwargs)
    except Exception as e:  # network, auth, missing cache: all become one line
        detail = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        why = (f"{'/'.join(offline)} is set and it is not in the HF cache ({detail})" if offline
               else f"the hub cannot be reached ({detail})")
        raise DataError(f"{head} and {why}. {fix}") from e
    return list(ds[column])


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached (a 3 s TCP probe), or None; a proxy is left for `datasets` to use."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        return f"{host}:{port}: {e}"
    return None


def _clip_docs(docs: list[str], max_chars: int | None) -> list[str]:
    """The documents inside the first max_chars characters of their "\\n\\n" join."""
    if max_chars is None:
        return docs
    kept, used = [], 0
    for doc in docs:
        if used >= max_chars:
            break
        kept.append(doc[: max_chars - used])
        used += len(doc) + 2
    return kept


# ---- tokens --------------------------------------------------------------------------------------------------------


def _default_bos(tokenizer: Any) -> int | None:
    """The BOS id when tokenizer(text) prepends one by default (Llama, OPT), else None (GPT-2, Qwen, SmolLM2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a", verbose=False)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
    return bos if with_special[:1] == [bos] and plain[:1] != [bos] else None


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with at most the default BOS, once at the start (no EOS, no separators)."""
    start = time.perf_counter()
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = _default_bos(tokenizer)
    if len(text) > 100_000:
        logger.info("tokenized %d characters into %d tokens in %.1f s", len(text), len(ids),
                    time.perf_counter() - start)
    return [bos, *ids] if bos is not None else list(ids)


def _stream_windows(stream: list[int], n: int, seqlen: int, rng: random.Random, name: str) -> list[torch.Tensor]:
    """n random windows [seqlen] of one token stream; start in [0, N - seqlen - 1] exactly as the GPTQ repo draws it."""
    if len(stream) <= seqlen:
        raise DataError(f"{name} has only {len(stream)} tokens, not more than seqlen={seqlen}; lower seqlen or use a "
                        "larger corpus")
    tokens = torch.tensor(stream, dtype=torch.long)
    windows = []
    for _ in range(n):
        i = rng.randint(0, len(stream) - seqlen - 1)
        windows.append(tokens[i : i + seqlen].clone())  # clone: do not keep the whole stream alive
    return windows


def _doc_windows(tokenizer: Any, docs: Sequence[str], n: int, seqlen: int,
                 rng: random.Random) -> tuple[list[torch.Tensor], int] | None:
    """GPTQ's C4 sampler: draw random documents until one has more than seqlen tokens, take a random window of it.

    Returns the windows and the number of tokens in the documents they were drawn from, or None when no document is
    long enough. A document of b UTF-8 bytes has at most b + 3 tokens (every token covers
    at least one byte; BOS, EOS and a sentencepiece dummy prefix are the extras), so shorter documents are rejected
    without tokenizing them, and a corpus is known to have no long document once every candidate proved too short.
    The draws consume the generator exactly as the reference loop does.
    """
    candidates = {i for i, d in enumerate(docs) if len(d.encode("utf-8")) + 3 > seqlen}
    long: dict[int, list[int]] = {}
    windows = []
    while len(windows) < n:
        if not candidates:
            return None
        i = rng.randint(0, len(docs) - 1)
        if i not in candidates:
            continue
        if i not in long:
            ids = _encode(tokenizer, docs[i])
            if len(ids) <= seqlen:
                candidates.discard(i)
                continue
            long[i] = ids
        ids = long[i]
        j = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(torch.tensor(ids[j : j + seqlen], dtype=torch.long))
    return windows, sum(len(ids) for ids in long.values())


def _text_samples(tokenizer: Any, texts: list[str], n: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    """One sample per text (default BOS + tokens, cut to seqlen) for the first n usable texts of a seeded shuffle."""
    if not texts:
        raise DataError("calibration set is empty: no texts given; pass at least one text of 4 or more tokens")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    bos = _default_bos(tokenizer)
    prefix = [bos] if bos is not None else []
    samples: list[torch.Tensor] = []
    for start in range(0, len(order), 512):
        chunk = [texts[k] for k in order[start : start + 512]]
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            if len(ids) >= MIN_TOKENS:
                samples.append(torch.tensor((prefix + list(ids))[:seqlen], dtype=torch.long))
            if len(samples) == n:
                return samples
    if not samples:
        raise DataError(f"calibration set is empty: all {len(texts)} texts are shorter than {MIN_TOKENS} tokens; "
                        "pass longer texts (a few hundred tokens each works best) or a named set such as c4")
    logger.warning("only %d of %d texts have %d or more tokens: using %d calibration samples instead of %d",
                   len(samples), len(texts), MIN_TOKENS, len(samples), n)
    return samples


def _sample(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    ids = ids.unsqueeze(0)  # [1, T]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
