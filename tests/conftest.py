"""Shared fixtures: the real assets in ../shared/assets and tiny random models of each supported architecture."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
STORIES = ASSETS / "models" / "stories260K"
CORPORA = ASSETS / "corpora"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def need_assets():
    if not STORIES.exists():
        pytest.skip(f"the shared assets are not at {ASSETS}")


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    need_assets()
    return STORIES


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    need_assets()
    text = (CORPORA / "calibration" / "tiny.txt").read_text()
    return [t.strip() for t in text.split("\n\n") if len(t.strip()) > 200][:64]


def random_model(arch: str, seed: int = 0):
    """A tiny random causal LM of `arch` whose Linear sizes are multiples of 32 (packable at every width)."""
    from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                              OPTConfig, Qwen2Config, GemmaConfig)

    torch.manual_seed(seed)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    if arch == "llama":
        cfg = LlamaConfig(num_key_value_heads=2, **common)
    elif arch == "mistral":
        cfg = MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(num_key_value_heads=2, **common)
    elif arch == "gemma":
        cfg = GemmaConfig(num_key_value_heads=2, head_dim=16, **common)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(**common)
    elif arch == "opt":
        cfg = OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, word_embed_proj_dim=64)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256, n_inner=128)
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if arch == "qwen2":  # its q/k/v biases random: transformers starts them at zero, where they change nothing
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model.eval()


def random_samples(n: int, T: int, vocab: int = 256, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (1, T), generator=g),
             "attention_mask": torch.ones(1, T, dtype=torch.long)} for _ in range(n)]


def rtn_checkpoint(tmp_path: Path, arch: str, bits: int = 4) -> Path:
    """A `bits` RTN checkpoint (group 32) of random_model(arch), every Linear of its blocks quantized (on CPU load()
    then makes a Llama's blocks DecodeLayers and its stack a DecodeStack)."""
    from gptqkit.checkpoint import save
    from gptqkit.config import QuantConfig
    from gptqkit.sequential import quantize_model

    model = random_model(arch)
    cfg = QuantConfig(bits=bits, group_size=32, quant_method="rtn")
    quantize_model(model, random_samples(1, 8), cfg, progress=False)
    return save(model, tmp_path / (arch if bits == 4 else f"{arch}-{bits}bit"), cfg)


def stories_checkpoint(tmp_path_factory) -> Path:
    """A 4-bit g32 checkpoint of stories260K, made once per test session (shared by the test files)."""
    from gptqkit.config import QuantConfig
    from gptqkit.pipeline import quantize

    out = tmp_path_factory.getbasetemp() / "stories-gptq-4bit-g32"
    if not (out / "quantize_config.json").exists():
        texts = [t for t in (CORPORA / "calibration" / "tiny.txt").read_text().split("\n") if t.strip()][:64]
        quantize(STORIES, out, QuantConfig(bits=4, group_size=32), dataset=texts, nsamples=16, seqlen=128,
                 progress=False, overwrite=True)
    return out


@pytest.fixture(scope="module")
def one_thread_module():
    """One intra-op thread for a module of tiny-model tests: fastest for tiny matmuls, and OpenMP threads do not
    spin against other processes on a shared 2-core machine (10x slower forwards were measured with two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def two_threads():
    """Two intra-op threads for one test (the C calls' pool takes torch's count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
