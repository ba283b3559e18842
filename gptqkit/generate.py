"""Text generation from a checkpoint or a dense model: plain prompts, chat templates, instruction templates.

Instruction templates are plain data: a dict of format pieces, joined in a fixed order

    system_line (with the system text) + instruction + [input] + [context] + response

where each piece is a str.format pattern over {system}, {instruction}, {input}, {context}. The answer is what the
model writes after `response`, cut at the first of `stop`. Add a template by passing a JSON file holding one
such dict (`--template my.json`); keys are those of TEMPLATES["alpaca"], and any may be omitted except
`instruction` and `response`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                  "request.")
_ALPACA_SYSTEM_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                        "context. Write a response that appropriately completes the request.")
_ES_SYSTEM = ("A continuación hay una instrucción que describe una tarea. Escribe una respuesta que complete "
              "adecuadamente la solicitud.")
_ES_SYSTEM_INPUT = ("A continuación hay una instrucción que describe una tarea, junto con una entrada que "
                    "proporciona más contexto. Escribe una respuesta que complete adecuadamente la solicitud.")

TEMPLATES: dict[str, dict[str, Any]] = {
    "alpaca": {
        "description": "Stanford Alpaca (English)",
        "system_line": "{system}\n\n",
        "default_system": _ALPACA_SYSTEM,
        "default_system_input": _ALPACA_SYSTEM_INPUT,  # used when an input or context is given
        "instruction": "### Instruction:\n{instruction}\n\n",
        "input": "### Input:\n{input}\n\n",
        "response": "### Response:\n",
        "stop": ["\n###", "### Instruction:"],
    },
    "alpaca-es": {
        "description": "Alpaca in Spanish, as used by Spanish instruction-tuned Llama-2 GPTQ models",
        "system_line": "{system}\n\n",
        "default_system": _ES_SYSTEM,
        "default_system_input": _ES_SYSTEM_INPUT,
        "instruction": "### Instrucción:\n{instruction}\n\n",
        "input": "### Entrada:\n{input}\n\n",
        "context": "### Contexto:\n{context}\n\n",
        "response": "### Respuesta:\n",
        "stop": ["\n###", "### Instrucción:"],
    },
    "chatml": {
        "description": "ChatML (<|im_start|>role ... <|im_end|>)",
        "system_line": "<|im_start|>system\n{system}<|im_end|>\n",
        "instruction": "<|im_start|>user\n{instruction}",
        "input": "\n\n{input}",
        "context": "\n\n{context}",
        "response": "<|im_end|>\n<|im_start|>assistant\n",
        "stop": ["<|im_end|>", "<|im_start|>"],
    },
}


class TemplateError(ValueError):
    pass


def load_template(template: str | os.PathLike | dict) -> dict[str, Any]:
    """A template dict from a name in TEMPLATES, a path to a JSON file holding one, or a dict (checked)."""
    if isinstance(template, dict):
        t = template
    elif str(template) in TEMPLATES:
        t = TEMPLATES[str(template)]
    elif str(template).endswith(".json") or Path(template).is_file():
        p = Path(template)
        if not p.is_file():
            raise TemplateError(f"template file {p} does not exist")
        try:
            t = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TemplateError(f"template file {p} is not valid JSON: {e}") from e
    else:
        raise TemplateError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)} or a .json file")
    if not isinstance(t, dict) or not isinstance(t.get("instruction"), str) or not isinstance(t.get("response"), str):
        raise TemplateError(f"template {template!r} needs string keys 'instruction' and 'response' "
                            f"(see gptqkit.generate.TEMPLATES['alpaca'] for all keys)")
    return t


def render(template: str | os.PathLike | dict, instruction: str, input: str | None = None,
           context: str | None = None, system: str | None = None) -> str:
    """The prompt text for `instruction` in `template`.

    >>> render("alpaca", "Name three colors.").endswith("### Instruction:\\nName three colors.\\n\\n### Response:\\n")
    True
    """
    t = load_template(template)
    fields = {"instruction": instruction, "input": input or "", "context": context or "", "system": ""}
    for key, value in (("input", input), ("context", context)):
        if value and key not in t:
            raise TemplateError(f"template {t.get('description', template)!r} has no {key} section")
    if system is None:
        system = t.get("default_system_input" if (input or context) else "default_system") or t.get("default_system")
    parts = []
    if system and "system_line" in t:
        parts.append(t["system_line"].format(**{**fields, "system": system}))
    parts.append(t["instruction"].format(**fields))
    for key in ("input", "context"):
        if fields[key]:
            parts.append(t[key].format(**fields))
    parts.append(t["response"].format(**fields))
    return "".join(parts)


def extract_answer(text: str, template: str | os.PathLike | dict) -> str:
    """The answer in `text`: what follows the template's response marker (its last occurrence, if the text holds
    one, e.g. a full transcript), up to the first stop string, without surrounding whitespace."""
    t = load_template(template)
    marker = t["response"].strip()
    if marker and marker in text:
        text = text.rsplit(marker, 1)[1]
    return _cut(text, t.get("stop", []))[0].strip()


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class _Sink:
    """Streamer for transformers' generate: decodes the new tokens, cuts at stop strings, and hands out text that
    can no longer change (held back: a tail that may start a stop string, trailing whitespace in answer mode, an
    unfinished UTF-8 sequence). What it hands out, joined, is exactly the final text."""

    def __init__(self, tokenizer, stops: list[str], answer: bool, callback: Callable[[str], None] | None):
        self.tok, self.stops, self.answer, self.callback = tokenizer, [s for s in stops if s], answer, callback
        self.prompt: list[int] | None = None
        self.ids: list[int] = []
        self.text = ""  # handed out so far
        self.stopped = False

    def _decoded(self) -> str:
        kw = {"skip_special_tokens": True}
        prefix = self.tok.decode(self.prompt, **kw)
        full = self.tok.decode(self.prompt + self.ids, **kw)  # decoding with the prompt keeps the first space
        return full[len(prefix):] if full.startswith(prefix) else self.tok.decode(self.ids, **kw)

    def _emit(self, final: bool) -> None:
        text, hit = _cut(self._decoded(), self.stops)
        self.stopped = self.stopped or hit
        if self.answer:
            text = text.lstrip()
        if not (final or hit):
            if text.endswith("\ufffd"):
                text = text.rstrip("\ufffd")
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        if self.answer:
            text = text.rstrip()
        if text.startswith(self.text) and len(text) > len(self.text):
            new, self.text = text[len(self.text):], text
            if self.callback is not None:
                self.callback(new)

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self.prompt is None:  # generate() first hands over the prompt
            self.prompt = ids
            return
        self.ids.extend(ids)
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)


@dataclass
class Generation:
    text: str  # the continuation (the answer, with a template)
    prompt: str  # the prompt as given to the tokenizer
    prompt_tokens: int
    new_tokens: int
    seconds: float


def check_prefill_chunk(n: int | None) -> None:
    """Raise ValueError unless n is None (the prompt in one piece) or a positive number of tokens."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"prefill_chunk must be a positive number of tokens, not {n!r}")


def run_generation(model, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                   stream: Callable[[str], None] | None = None, chat: bool = False,
                   template: str | os.PathLike | dict | None = None, system: str | None = None,
                   input: str | None = None, context: str | None = None, seed: int | None = None,
                   kv_cache: str = "auto", prefill_chunk: int | None = None) -> Generation:
    """Like `generate`, with token counts and time."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from .cache import cache_for, cache_kwarg

    if chat and template is not None:
        raise TemplateError("choose either chat (the tokenizer's chat template) or an instruction template")
    check_prefill_chunk(prefill_chunk)
    stops: list[str] = []
    if template is not None:
        t = load_template(template)
        text = render(t, prompt, input=input, context=context, system=system)
        stops = list(t.get("stop", []))
        add_special = True
    elif chat:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("this tokenizer has no chat template; use an instruction template instead "
                                f"(one of {', '.join(TEMPLATES)})")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt + "".join(f"\n\n{s}" for s in (input, context) if s)}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        add_special = False  # the chat template writes its own BOS
    else:
        if input or context or system:
            raise TemplateError("input, context and system need chat or a template")
        text, add_special = prompt, True
    device = next(model.parameters()).device
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=add_special).to(device)
    sink = _Sink(tokenizer, stops, answer=template is not None, callback=stream)

    class _Stop(StoppingCriteria):  # ends generation once the sink has seen a stop string
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), sink.stopped, dtype=torch.bool, device=input_ids.device)

    kw: dict[str, Any] = {"do_sample": temperature > 0, "repetition_penalty": repetition_penalty}
    if temperature > 0:
        kw.update(temperature=temperature, top_p=top_p, top_k=top_k)
        if seed is not None:
            torch.manual_seed(seed)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    if prefill_chunk is not None:
        kw["prefill_chunk_size"] = prefill_chunk  # transformers feeds the prompt in pieces into the same cache
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n_prompt = enc["input_ids"].shape[1]
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, streamer=sink, pad_token_id=pad,
                             stopping_criteria=StoppingCriteriaList([_Stop()]),
                             **{cache_kwarg(model): cache_for(model, kv_cache, n_prompt + max_new_tokens)}, **kw)
    seconds = time.perf_counter() - t0
    return Generation(text=sink.text, prompt=text, prompt_tokens=n_prompt, new_tokens=out.shape[1] - n_prompt,
                      seconds=seconds)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             stream: Callable[[str], None] | None = None, chat: bool = False,
             template: str | os.PathLike | dict | None = None, system: str | None = None,
             input: str | None = None, context: str | None = None, seed: int | None = None,
             kv_cache: str = "auto", prefill_chunk: int | None = None) -> str:
    """Generate a continuation of `prompt` (greedy when temperature is 0) and return it.

    chat: wrap the prompt with the tokenizer's chat template. template: a name in TEMPLATES or a JSON file; the
    prompt is the instruction, `input`/`context` fill the optional sections, and the answer after the response
    marker is returned. stream: called with each new piece of text; the pieces join to the returned string.
    kv_cache: "auto" keeps the KV cache in bf16 where gptqkit's float32 CPU attention runs (cache.kv_dtype: the
    bytes a bf16 model's cache takes), "model" in the model's dtype. prefill_chunk: feed the prompt in pieces of at
    most this many tokens into the cache (transformers' prefill_chunk_size), so a long prompt's activations take
    that many rows at a time instead of all of them; the logits agree with a whole prefill up to rounding.

    >>> model, tok = load_for_inference("smollm2-gptq-4bit")  # doctest: +SKIP
    >>> generate(model, tok, "Resume en una frase.", template="alpaca-es", input=texto)  # doctest: +SKIP
    """
    return run_generation(model, tokenizer, prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                          stream, chat, template, system, input, context, seed, kv_cache, prefill_chunk).text


def is_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    if (p / "quantize_config.json").exists() or (p / "quant_config.json").exists():
        return True
    c = p / "config.json"
    return c.exists() and "quantization_config" in json.loads(c.read_text())


def load_for_inference(path: str | os.PathLike, device: str = "cpu", kernel: str = "auto",
                       dtype: torch.dtype | str | None = None, adapter: str | os.PathLike | None = None):
    """(model, tokenizer) for a GPTQ checkpoint (QuantLinear kernels) or a floating-point model folder, with the
    LoRA adapter folder `adapter` on it (finetune.with_adapter).

    dtype None: the checkpoint loader's default (float32 on CPU, where the embedding and lm_head are then kept in
    bfloat16 storage, as `bench` does: see bench.default_dtypes) or float32 for a dense model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import bundled
    from .checkpoint import load
    from .finetune import adapter_folder, with_adapter

    if str(path).lower() in (bundled.NAME.lower(), "smollm2"):
        path = bundled.smollm2()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if adapter is not None:
        adapter_folder(adapter)  # a missing or incomplete adapter fails before the model is read
    tok = AutoTokenizer.from_pretrained(path)
    if is_checkpoint(path):
        dense = None
        if dtype is None and torch.device(device).type == "cpu":
            from .bench import default_dtypes

            dense = default_dtypes(device)[1]
        model = load(path, device=device, dtype=dtype, kernel=kernel, dense_dtype=dense)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, low_cpu_mem_usage=True)
        model = model.to(device).eval()
    return (model if adapter is None else with_adapter(model, adapter)), tok


# ------------------------------------------------------------------------------------------------------- CLI


ADAPTER_HELP = ("a LoRA adapter folder (peft's format, e.g. from `gptqkit finetune --lora`) to run with: beside a "
                "checkpoint's quantized layers, merged into a floating-point model; needs the peft extra")


def add_generate_args(p) -> None:
    p.add_argument("model", help="GPTQ checkpoint folder, a floating-point model folder, or 'SmolLM2-135M-Instruct'")
    p.add_argument("--prompt", required=True, help="the prompt (the instruction, with --template)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    p.add_argument("--template", default=None,
                   help=f"instruction template: {', '.join(TEMPLATES)}, or a .json file with the same keys")
    p.add_argument("--system", default=None, help="system text (chat or template)")
    p.add_argument("--input", default=None, help="optional input section (template: ### Input / ### Entrada)")
    p.add_argument("--context", default=None, help="optional context section (alpaca-es: ### Contexto)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernel", default="auto", help="auto, cpu, torch, triton")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16")
    p.add_argument("--adapter", default=None, metavar="DIR", help=ADAPTER_HELP)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    add_kv_cache_arg(p)
    add_prefill_chunk_arg(p)


def add_prefill_chunk_arg(p) -> None:
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prefill the prompt N tokens at a time (less memory on long prompts; default: all at once)")


def add_kv_cache_arg(p) -> None:
    from .cache import KV_CACHE_CHOICES

    p.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default="auto",
                   help="KV cache dtype: auto = bfloat16 under gptqkit's float32 CPU attention (half the bytes, "
                        "keys and values rounded as a bf16 model's), else the model's; model = the model's dtype")


def run_generate(args) -> int:
    import sys

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.template is not None:
        load_template(args.template)  # fail on a bad template before loading the model
    model, tok = load_for_inference(args.model, device=args.device, kernel=args.kernel, dtype=args.dtype,
                                    adapter=args.adapter)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    g = run_generation(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                       stream=None if args.no_stream else show, chat=args.chat, template=args.template,
                       system=args.system, input=args.input, context=args.context, seed=args.seed,
                       kv_cache=args.kv_cache, prefill_chunk=args.prefill_chunk)
    if args.no_stream:
        sys.stdout.write(g.text)
    sys.stdout.write("\n")
    print(f"[{g.prompt_tokens} prompt tokens, {g.new_tokens} new tokens in {g.seconds:.2f} s, "
          f"{g.new_tokens / max(g.seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0
