"""gptqkit.generate on stories260K: greedy decoding, templates as exact strings, answer extraction, streaming."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from conftest import stories_checkpoint
from gptqkit.generate import (TEMPLATES, TemplateError, add_generate_args, extract_answer, generate,
                              load_for_inference, load_template, render, run_generate, run_generation)

ASSETS = Path(__file__).resolve().parents[2] / "shared/assets"
MODEL = ASSETS / "models/stories260K"
TINY = ASSETS / "corpora/calibration/tiny.txt"
# llama2.c's stories260K, greedy from "Once upon a time" (its documented sample starts this way)
STORY = ", there was a little girl named Lily. She loved to play outside in the park."

needs_model = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason=f"{MODEL} not found")


@pytest.fixture(scope="module")
def dense():
    return load_for_inference(MODEL)


# ---------------------------------------------------------------------------------------------- templates


def test_alpaca_exact():
    assert render("alpaca", "Name three colors.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName three colors.\n\n### Response:\n")
    assert render("alpaca", "Translate.", input="Hola") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n"
        "### Input:\nHola\n\n### Response:\n")


def test_alpaca_es_exact():
    assert render("alpaca-es", "Resume el texto.", input="El gato duerme.", context="Un cuento corto.") == (
        "A continuación hay una instrucción que describe una tarea, junto con una entrada que proporciona más "
        "contexto. Escribe una respuesta que complete adecuadamente la solicitud.\n\n"
        "### Instrucción:\nResume el texto.\n\n### Entrada:\nEl gato duerme.\n\n### Contexto:\nUn cuento corto.\n\n"
        "### Respuesta:\n")
    assert render("alpaca-es", "¿Qué hora es?", system="Eres un asistente.") == (
        "Eres un asistente.\n\n### Instrucción:\n¿Qué hora es?\n\n### Respuesta:\n")
    only_context = render("alpaca-es", "Responde.", context="Texto.")
    assert "### Entrada:" not in only_context and only_context.endswith("### Contexto:\nTexto.\n\n### Respuesta:\n")


def test_chatml_exact():
    assert render("chatml", "Hi!", system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    assert render("chatml", "Hi!") == "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"


def test_template_from_json_and_errors(tmp_path):
    t = {"instruction": "Q: {instruction}\n", "input": "Data: {input}\n", "response": "A:", "stop": ["\nQ:"]}
    f = tmp_path / "qa.json"
    f.write_text(json.dumps(t), encoding="utf-8")
    assert load_template(f) == t
    assert render(str(f), "2+2?", input="none") == "Q: 2+2?\nData: none\nA:"
    with pytest.raises(TemplateError, match="unknown template"):
        load_template("no-such-template")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"instruction": "x"}))
    with pytest.raises(TemplateError, match="'response'"):
        load_template(bad)
    with pytest.raises(TemplateError, match="no context section"):
        render("alpaca", "x", context="y")
    assert set(TEMPLATES) >= {"alpaca", "alpaca-es", "chatml"}


def test_extract_answer():
    full = render("alpaca-es", "Saluda.") + "  ¡Hola, mundo!\n\n### Instrucción:\nOtra cosa"
    assert extract_answer(full, "alpaca-es") == "¡Hola, mundo!"
    assert extract_answer("Respuesta sin marcador.\n### Entrada: x", "alpaca-es") == "Respuesta sin marcador."
    assert extract_answer("Sure.<|im_end|>\n<|im_start|>user", "chatml") == "Sure."
    assert extract_answer("### Response:\nBlue, red, green.", "alpaca") == "Blue, red, green."


# ---------------------------------------------------------------------------------------------- generation


@needs_model
def test_greedy_is_deterministic_and_streams_the_same_text(dense):
    model, tok = dense
    pieces = []
    a = generate(model, tok, "Once upon a time", max_new_tokens=24, stream=pieces.append)
    b = generate(model, tok, "Once upon a time", max_new_tokens=24)
    assert a == b and a.startswith(STORY[:40])
    assert len(pieces) > 5 and "".join(pieces) == a


@needs_model
def test_prefill_in_pieces(dense):
    """prefill_chunk feeds the prompt in pieces of that many tokens into the cache, and greedy decoding after it is
    the same as after one whole prefill (the dense fp32 model: the pieces' sums differ only in rounding)."""
    model, tok = dense
    prompt = "Once upon a time" + STORY + " One day"
    n = len(tok(prompt)["input_ids"])
    rows: list[int] = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[1]))
    try:
        whole = generate(model, tok, prompt, max_new_tokens=20)
        assert rows[0] == n and set(rows[1:]) == {1}
        rows.clear()
        pieces = generate(model, tok, prompt, max_new_tokens=20, prefill_chunk=7)
    finally:
        hook.remove()
    assert rows[: -(-n // 7)] == [7] * (n // 7) + ([n % 7] if n % 7 else []) and set(rows[-(-n // 7):]) == {1}
    assert pieces == whole and len(whole) > 20
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="prefill_chunk must be a positive number of tokens"):
            generate(model, tok, prompt, max_new_tokens=2, prefill_chunk=bad)


@needs_model
def test_the_cache_is_made_once_for_the_prompt_and_new_tokens(dense, monkeypatch):
    """generate knows the sequence's length (prompt + max_new_tokens): each layer's keys and values get one buffer
    of that many positions, fed in pieces or not, and are never copied into a larger one."""
    import gptqkit.cache as C

    model, tok = dense
    prompt = "Once upon a time" + STORY
    n = len(tok(prompt)["input_ids"])
    made = []
    append = C._append
    monkeypatch.setattr(C, "_append", lambda *a: (lambda r: (made.append((r[1].shape[-2], r[1].data_ptr())), r)[1])(
        append(*a)))
    for chunk in (None, 9):
        made.clear()
        generate(model, tok, prompt, max_new_tokens=30, prefill_chunk=chunk)
        layers = model.config.num_hidden_layers
        assert len({p for _, p in made}) == 2 * layers and {c for c, _ in made} == {n + 30}, chunk


@needs_model
def test_stop_strings_cut_the_stream_and_stop_early(dense, tmp_path):
    model, tok = dense
    f = tmp_path / "plain.json"
    f.write_text(json.dumps({"instruction": "{instruction}", "response": "", "stop": ["."]}))
    pieces = []
    g = run_generation(model, tok, "Once upon a time", max_new_tokens=60, template=str(f), stream=pieces.append)
    assert g.text == STORY.split(".")[0] and "".join(pieces) == g.text
    assert g.new_tokens < 60  # generation stopped at the stop string


@needs_model
def test_template_answer_and_sampling(dense):
    model, tok = dense
    pieces = []
    g = run_generation(model, tok, "Cuenta un cuento.", max_new_tokens=16, template="alpaca-es",
                       input="Un perro.", stream=pieces.append)
    assert g.prompt.endswith("### Respuesta:\n") and g.prompt_tokens > 20
    assert "".join(pieces) == g.text == g.text.strip() and g.text
    s1 = generate(model, tok, "Once upon a time", max_new_tokens=16, temperature=0.8, top_p=0.9, top_k=20, seed=1)
    s2 = generate(model, tok, "Once upon a time", max_new_tokens=16, temperature=0.8, top_p=0.9, top_k=20, seed=1)
    assert s1 == s2


@needs_model
def test_chat_template(dense):
    model, tok = dense
    with pytest.raises(TemplateError, match="no chat template"):
        generate(model, tok, "Hi", chat=True)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]{% endif %}")
    try:
        g = run_generation(model, tok, "Once upon a time", max_new_tokens=8, chat=True, system="Tell a story.")
    finally:
        tok.chat_template = None
    assert g.prompt == "<s>[system] Tell a story.\n[user] Once upon a time\n[assistant]"
    assert g.new_tokens == 8


@needs_model
def test_quantized_checkpoint_and_cli(tmp_path_factory, capsys):
    ckpt = stories_checkpoint(tmp_path_factory)
    model, tok = load_for_inference(ckpt)
    text = generate(model, tok, "Once upon a time", max_new_tokens=12)
    assert text == generate(model, tok, "Once upon a time", max_new_tokens=12) and len(text) > 10
    p = argparse.ArgumentParser()
    add_generate_args(p)
    args = p.parse_args([str(ckpt), "--prompt", "Once upon a time", "--max-new-tokens", "12", "--threads", "1"])
    assert run_generate(args) == 0
    out = capsys.readouterr()
    assert out.out == text + "\n" and "tokens/s" in out.err
    # a prompt prefilled in pieces: the quantized kernels take each piece's rows, the logits agree up to rounding
    from gptqkit.cache import cache_for, cache_kwarg

    ids = tok("Once upon a time" + STORY, return_tensors="pt")["input_ids"]
    name = cache_kwarg(model)
    with torch.inference_mode():
        whole = model(ids, **{name: cache_for(model)}, use_cache=True).logits[0, -1]
        cache = cache_for(model)
        for s in range(0, ids.shape[1], 5):
            last = model(ids[:, s:s + 5], **{name: cache}, use_cache=True).logits[0, -1]
    assert cache.get_seq_length() == ids.shape[1]
    assert (last - whole).abs().max() <= 0.02 * whole.abs().max() and last.argmax() == whole.argmax()
    args = p.parse_args([str(ckpt), "--prompt", "Once upon a time", "--max-new-tokens", "12", "--prefill-chunk", "2"])
    assert args.prefill_chunk == 2 and run_generate(args) == 0 and len(capsys.readouterr().out) > 10
    # the default KV cache is bf16 under gptqkit's CPU attention; --kv-cache model keeps the model's float32
    from gptqkit.cache import given_cache

    caches = []
    real = model.generate
    model.generate = lambda *a, **k: caches.append(given_cache(k).buffer_dtype) or real(*a, **k)
    same = generate(model, tok, "Once upon a time", max_new_tokens=12, kv_cache="model")
    model.generate = real
    assert caches == [None] and len(same) > 10
    from gptqkit.cache import kv_dtype
    from gptqkit.kernels import cpu_avx2

    assert kv_dtype(model) == (None if isinstance(cpu_avx2.fast_library(), str) else torch.bfloat16)
    assert p.parse_args([str(ckpt), "--prompt", "x"]).kv_cache == "auto"
    with pytest.raises(SystemExit):
        p.parse_args([str(ckpt), "--prompt", "x", "--kv-cache", "fp8"])
    with torch.no_grad():
        assert model(torch.tensor([[1, 403]])).logits.dtype == torch.float32
