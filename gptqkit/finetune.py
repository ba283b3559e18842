"""Fine-tuning around quantization. Each part below is one topic with its own public functions (a section comment, the
functions, their tests in tests/test_finetune.py).

Partial quantization and tail fine-tuning: tail_parameters(), train(), finetune() (`gptqkit finetune`)
    `quantize(..., first_blocks=K)` (`--first-blocks K`) quantizes the first K decoder blocks and leaves the rest and
    lm_head in floating point, as one "-:" `dynamic` rule that gptqkit, GPTQModel and vLLM read. The float tail is
    then fine-tuned on the quantized front: tail_parameters() unfreezes exactly what runs after the last quantized
    block (those blocks, the final norm, lm_head), so the quantized blocks see the inputs their GPTQ solve assumed,
    and the tail learns to correct what their rounding changed. On stories260K with its first three blocks at 2 bits,
    40 AdamW steps took held-out loss on real stories from 1.935 to 1.848 (the float model: 1.489). save() writes
    the result as a GPTQ checkpoint whose quantized tensors are the original's, byte for byte.

LoRA on quantized layers (QLoRA with GPTQ codes): add_lora(), load_lora(), QuantLoraLinear
    peft's LoRA wraps nn.Linear and a few known quantized classes; gptqkit's QuantLinear is none of them, so it is
    registered through peft's extension point for custom modules (LoraConfig._register_custom_module). The layer
    computes

        y = base(x) + sum over active adapters of B(A(dropout(x))) * scaling     A [r, K], B [N, r]

    with the 4-bit base frozen: its qweight / qzeros / scales / g_idx are buffers, never parameters, and stay byte
    for byte the checkpoint's. QuantLinear's kernels take their autograd path (W dequantized in x's dtype, one
    GEMM) when x needs a gradient, so training backpropagates through the quantized layers of later blocks. Where x
    needs none (the first block's q/k/v read the frozen embeddings) avx2-q8 keeps its inference path (bf16 GEMM on
    CPUs with native bf16, int8 activations for decode rows): the adapters' gradients then differ from the reference
    kernel's by ~2% on stories260K; with inputs_embeds that need a gradient they are equal. Decode rows that need
    no gradient add the term in one C call (cpu_avx2.lora_add), and add_lora / load_lora rebuild gptqkit.fused's
    one-C-call blocks and stack over the wrappers (fused.refresh), the term added after each projection inside the
    C call: a 3-bit SmolLM2 with r = 8 on all 210 projections decodes in 4.4 ms per token instead of 12.9 (3.2
    without the adapter; `gptqkit bench --adapter`, 2 threads). A change the C call cannot follow (adapters
    disabled or switched, a scaling changed, dropout in training mode, a gradient, a hook, peft's unload()) makes it
    run its own forward, which calls the modules in place; fused.refresh(model) builds it again.

Adapter merge (the "QLoRA -> merge -> GPTQ" flow): merge_adapter(), and with_adapter() for inference
    An adapter trained on a quantized model is merged into the floating-point base model, W + scaling * B @ A, and
    the merged model is then quantized. Merging into the 4-bit codes instead cannot be exact (W + scaling * B @ A
    falls between the points of a grid whose scales and zeros were fitted to W alone), so QuantLoraLinear.merge()
    refuses and names this route.

peft is an optional dependency (`pip install 'gptqkit[peft]'`): it is imported where used, and the LoRA layer class
is built on first use (`gptqkit.finetune.QuantLoraLinear` builds it).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import logging
import operator
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from . import fused
from .kernels import cpu_avx2
from .qlinear import QuantLinear
from .sequential import find_blocks

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what PeftModel.save_pretrained writes
MERGE_ROUTE = ("merge the adapter into the floating-point base model with gptqkit.finetune.merge_adapter(model, "
               "adapter_dir) (or `gptqkit quantize --adapter`), then quantize the merged model")


class AdapterError(ValueError):
    """An adapter or model that cannot be used as asked; the message names the problem and the fix."""


def _peft():
    """The peft module, or an ImportError that names the extra to install."""
    try:
        import peft
        from peft.tuners.lora import LoraConfig
        from peft.tuners.lora.layer import LoraLayer
    except ImportError as e:
        raise ImportError("LoRA and adapter merging need peft: pip install 'gptqkit[peft]'") from e
    # The custom-module hook and update_layer(config=...) are what QuantLoraLinear is written against.
    if (not hasattr(LoraConfig, "_register_custom_module")
            or "config" not in inspect.signature(LoraLayer.update_layer).parameters):
        raise ImportError(f"peft {peft.__version__} is too old for gptqkit's LoRA layers (no custom-module "
                          "registration or update_layer(config=...)): pip install -U 'gptqkit[peft]'")
    return peft


# --------------------------------------------------------------------------------- LoRA on quantized layers


@functools.cache
def _lora_layer_class() -> type:
    """QuantLoraLinear, built once on first use: its base class, peft's LoraLayer, exists only where peft does."""
    _peft()
    from peft.tuners.lora.layer import LoraLayer

    class QuantLoraLinear(nn.Module, LoraLayer):
        """LoRA around a QuantLinear: base(x) + sum over active adapters of B(A(dropout(x))) * scaling, the low-rank
        term computed in the adapter weights' dtype and added in the base output's dtype. Plain LoRA only (DoRA and
        peft's other variants are refused); merge() raises, see the module docstring."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                     **kwargs):
            # peft calls custom layers as cls(target, adapter_name, config=config, r=..., lora_alpha=..., **rest)
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config,
                              target_name=kwargs.get("target_name", ""))

        def resolve_lora_variant(self, *, config, **kwargs):
            try:  # LoraLayer's table here is {(): None}: any variant asked for raises
                return LoraLayer.resolve_lora_variant(self, config=config, **kwargs)
            except ValueError as e:
                raise AdapterError(f"gptqkit's quantized layers run plain LoRA only ({e}); leave use_dora and the "
                                   "other LoRA variants off") from e

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            return base.in_features, base.out_features  # peft's generic lookup would warn "unsupported layer"

        def decode_adapter(self) -> tuple | None:
            """(A [r, K], B [N, r], scaling) of the one active adapter, where the layer's output is base(x) + B(A(x))
            * scaling with nothing else whenever its dropout is off (adapters on, one active, no biases): the term
            that cpu_avx2.lora_add computes, here and in gptqkit.fused's one-call blocks. Else None. A dropout with
            p > 0 is off in eval mode only, which forward and decode_guard check at each call."""
            name = self._one_active()
            if name is None or self.disable_adapters or self.merged:
                return None
            A, B = self.lora_A[name], self.lora_B[name]
            if A.bias is not None or B.bias is not None:
                return None
            return A.weight, B.weight, float(self.scaling[name])

        def decode_modules(self) -> list[tuple[nn.Module, str]]:
            """(owner, name) of the modules a C call that adds decode_adapter()'s term runs without calling: the base
            layer, and the active adapter's A, B and dropout (gptqkit.fused checks they stay in place, unhooked)."""
            name = self._one_active()
            return [(self, "base_layer"), (self.lora_A, name), (self.lora_B, name), (self.lora_dropout, name)]

        def _one_active(self) -> str | None:
            """The name of the one active adapter this layer holds; None for none or several."""
            names = [n for n in self.active_adapters if n in self.lora_A]
            return names[0] if len(names) == 1 else None

        def _dropout_on(self) -> bool:
            """The active adapter's dropout drops something now (p > 0, training mode)."""
            drop = self.lora_dropout[self._one_active()]
            return drop.training and getattr(drop, "p", 0) > 0

        @staticmethod
        def decode_guard(layers: tuple, terms: tuple) -> Callable[[], bool]:
            """A check, cheap enough for every decoded token (gptqkit.fused runs it before each one-call step), that
            each layer's decode_adapter() still gives its term (A, B, scale) of `terms`, with A and B at the same
            addresses: adapters not disabled, the same one active, the same A and B Parameters and scaling, and its
            dropout (where p > 0) in eval mode. C-level maps over the layers' attribute dicts, peft's own state
            (BaseTunerLayer keeps `_disable_adapters` and `_active_adapter` there)."""
            names = [m._one_active() for m in layers]
            dicts = [m.__dict__ for m in layers]
            active = [d.get("_active_adapter") for d in dicts]
            a_params = [m.lora_A[n]._parameters for m, n in zip(layers, names)]
            b_params = [m.lora_B[n]._parameters for m, n in zip(layers, names)]
            scalings = [m.scaling for m in layers]
            drops = [m.lora_dropout[n].__dict__ for m, n in zip(layers, names) if getattr(m.lora_dropout[n], "p", 0)]
            As, Bs, scales = zip(*terms)
            pa, pb = [A.data_ptr() for A in As], [B.data_ptr() for B in Bs]
            each = itertools.repeat

            def check() -> bool:
                return (not any(map(dict.get, dicts, each("_disable_adapters")))
                        and all(map(operator.is_, map(dict.get, dicts, each("_active_adapter")), active))
                        and all(map(operator.is_, map(dict.get, a_params, each("weight")), As))
                        and all(map(operator.is_, map(dict.get, b_params, each("weight")), Bs))
                        and all(map(operator.eq, map(dict.get, scalings, names), scales))
                        and not any(map(dict.get, drops, each("training")))
                        and all(map(operator.eq, map(torch.Tensor.data_ptr, As), pa))
                        and all(map(operator.eq, map(torch.Tensor.data_ptr, Bs), pb)))

            return check

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # base_layer, not get_base_layer(): a nested wrapper adds its own adapters
            result = self.base_layer(x)  # [..., N] in the base's dtype
            if self.disable_adapters:
                return result
            adapter = self.decode_adapter() if x.dtype == result.dtype == torch.float32 else None
            if adapter is not None and not self._dropout_on() and not (torch.is_grad_enabled() and (
                    x.requires_grad or adapter[0].requires_grad or adapter[1].requires_grad)):
                # Inference in float32: decode rows on CPU in one C call instead of ~6 torch ops and 3 module calls,
                # the same function as the one-call blocks' (so both give the same bits); more rows in one addmm
                # after one GEMM, where the formula below takes 3 more ops and 2 module calls (a 3-bit SmolLM2 with
                # r = 8 everywhere prefilled 128 / 512 tokens 4% / 12% faster, in one process)
                A, B, scale = adapter
                if x.device.type == "cpu" and x.numel() < cpu_avx2.M_MAX * x.shape[-1]:
                    y = cpu_avx2.lora_add(x, result, adapter)
                    if y is not None:
                        return y
                t = x.reshape(-1, x.shape[-1]) @ A.T  # [M, r]
                return torch.addmm(result.reshape(-1, B.shape[0]), t, B.T, alpha=scale).view(result.shape)
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                A, B = self.lora_A[name], self.lora_B[name]  # Linear(K -> r), Linear(r -> N)
                h = self.lora_dropout[name](x.to(A.weight.dtype))
                result = result + (B(A(h)) * self.scaling[name]).to(result.dtype)
            return result

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            raise AdapterError("a LoRA adapter cannot be merged into 4-bit GPTQ codes exactly (W + scaling * B @ A "
                               f"falls between the quantization grid's points); {MERGE_ROUTE}")

        def unmerge(self) -> None:
            pass  # nothing is ever merged (merge() refuses)

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    QuantLoraLinear.__module__ = __name__
    QuantLoraLinear.__qualname__ = "QuantLoraLinear"  # found again by pickle through this module's __getattr__
    return QuantLoraLinear


def __getattr__(name: str):
    # `from gptqkit.finetune import QuantLoraLinear` builds the class (and imports peft) only when asked for
    if name == "QuantLoraLinear":
        return _lora_layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def quantized_names(model: nn.Module) -> list[str]:
    """The leaf names of model's QuantLinear layers (e.g. ["k_proj", "o_proj", "q_proj", "v_proj"]), sorted."""
    return sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, QuantLinear)})


def _lora_config(peft, config=None, **fields):
    """A LoraConfig (the given one or a new one from `fields`) that dispatches QuantLinear to QuantLoraLinear."""
    config = config if config is not None else peft.LoraConfig(**fields)
    config._register_custom_module({QuantLinear: _lora_layer_class()})
    return config


def _no_match(e: ValueError, path: Path | None = None) -> AdapterError | None:
    """AdapterError for peft's "target modules not found" error (NoMatchingPeftModuleError in recent peft, a plain
    ValueError before), else None."""
    import peft

    no_match = getattr(peft, "NoMatchingPeftModuleError", ())
    if not (isinstance(e, no_match) or "not found in the base model" in str(e)):
        return None
    what = f"the adapter in {path}" if path is not None else "the LoRA config"
    return AdapterError(f"{what} targets modules this model does not have ({e}); it was made for another "
                        "architecture: use the model it was trained on, or name target_modules that this model's "
                        "named_modules() has")


def add_lora(model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0,
             target_modules: list[str] | str | None = None) -> "PeftModel":
    """LoRA adapters (rank r, scaling alpha / r) on a gptqkit-loaded model's QuantLinear layers, and on its nn.Linear
    ones where target_modules names them; returns peft's PeftModel (the model is changed in place). Only the
    lora_A / lora_B weights require a gradient. target_modules: peft's (leaf names or a regex); default every
    QuantLinear's leaf name.

    >>> model = add_lora(load("stories-gptq-4bit"), r=8)  # doctest: +SKIP
    >>> [n for n, p in model.named_parameters() if p.requires_grad][:1]  # doctest: +SKIP
    ['base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight']
    >>> model.save_pretrained("adapter")  # doctest: +SKIP
    """
    peft = _peft()
    if target_modules is None:
        target_modules = quantized_names(model)
        if not target_modules:
            raise AdapterError(f"{type(model).__name__} has no QuantLinear layers: load a GPTQ checkpoint with "
                               "gptqkit.checkpoint.load, or name the layers to adapt in target_modules")
    config = _lora_config(peft, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                          bias="none", task_type="CAUSAL_LM")
    try:
        peft_model = peft.get_peft_model(model, config)
    except ValueError as e:
        raise (_no_match(e) or e) from e
    log.info("LoRA r=%d alpha=%s on %d layers (%s)", r, alpha, _count_lora(peft_model), ", ".join(
        [target_modules] if isinstance(target_modules, str) else target_modules))
    fused.refresh(model)
    return peft_model


def load_lora(model: nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False) -> "PeftModel":
    """A LoRA adapter saved by PeftModel.save_pretrained (adapter_config.json + adapter_model.safetensors) onto a
    gptqkit-loaded model; is_trainable=True to go on training it. The model is changed in place.

    >>> model = load_lora(load("stories-gptq-4bit"), "adapter")  # doctest: +SKIP
    """
    peft = _peft()
    path = adapter_folder(adapter_dir)
    config = _lora_config(peft, peft.LoraConfig.from_pretrained(str(path)))
    try:
        peft_model = peft.PeftModel.from_pretrained(model, str(path), is_trainable=is_trainable, config=config)
    except ValueError as e:
        raise (_no_match(e, path) or e) from e
    except RuntimeError as e:
        raise (_size_mismatch(e, path) or e) from e
    log.info("LoRA adapter %s loaded on %d layers", path, _count_lora(peft_model))
    fused.refresh(model)
    return peft_model


def _count_lora(model: nn.Module) -> int:
    from peft.tuners.lora.layer import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


# ------------------------------------------------------------------------------------------- adapter merge


def adapter_folder(adapter_dir: str | os.PathLike) -> Path:
    """adapter_dir as a Path once it holds a LoRA adapter as peft saves one; else FileNotFoundError / AdapterError
    naming what is missing (checked here: peft would go on to look the name up on the Hub)."""
    path = Path(adapter_dir)
    saved_by = "give the folder that PeftModel.save_pretrained(folder) wrote"
    if not path.exists():
        raise FileNotFoundError(f"adapter folder {path} does not exist; {saved_by}")
    if not path.is_dir():
        raise AdapterError(f"{path} is a file, not an adapter folder; {saved_by}")
    if not (path / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{path} has no {ADAPTER_CONFIG}, so it is not a peft adapter folder; {saved_by}")
    if not any((path / f).is_file() for f in ADAPTER_WEIGHTS):
        raise AdapterError(f"{path} has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}); "
                           f"the save did not finish: save the adapter again")
    try:
        kind = json.loads((path / ADAPTER_CONFIG).read_text()).get("peft_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise AdapterError(f"{path / ADAPTER_CONFIG} is not a JSON object ({e}); save the adapter again") from e
    if kind != "LORA":
        raise AdapterError(f"{path} holds a {kind} adapter; gptqkit loads and merges LoRA adapters only")
    return path


def _size_mismatch(e: RuntimeError, path: Path) -> AdapterError | None:
    if "size mismatch" not in str(e):
        return None
    return AdapterError(f"the adapter in {path} has shapes this model's layers do not ({e}); it was trained on "
                        "another model: use the model it was trained on")


def merge_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """The floating-point (not quantized) `model` with the LoRA adapter saved in adapter_dir merged into its
    weights, W + scaling * B @ A for every adapted layer, as a plain transformers model (no peft modules left):
    the "merge" of QLoRA -> merge -> GPTQ, ready to quantize. The model is changed in place and returned; the files
    it was read from are not touched.

    >>> base = AutoModelForCausalLM.from_pretrained("TinyLlama-1.1B", dtype=torch.float32)  # doctest: +SKIP
    >>> merged = merge_adapter(base, "adapter")  # doctest: +SKIP
    """
    peft = _peft()
    path = adapter_folder(adapter_dir)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if quantized:
        raise AdapterError(f"{type(model).__name__} has {len(quantized)} quantized layers ({quantized[0]}, ...); "
                           "an adapter cannot be merged into 4-bit codes exactly: merge it into the floating-point "
                           "base model (the original, unquantized weights), then quantize the merged model")
    if isinstance(model, peft.PeftModel):
        raise AdapterError(f"{type(model).__name__} already carries adapters; give the plain base model (or call its "
                           "merge_and_unload() yourself)")
    try:
        peft_model = peft.PeftModel.from_pretrained(model, str(path))
    except ValueError as e:
        raise (_no_match(e, path) or e) from e
    except RuntimeError as e:
        raise (_size_mismatch(e, path) or e) from e
    n = _count_lora(peft_model)
    merged = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: NaNs in the sum raise instead of landing
    log.info("merged the LoRA adapter %s into %d layers of %s", path, n, type(merged).__name__)
    return merged


def with_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """`model` running the LoRA adapter saved in adapter_dir, for inference (`eval`, `generate` and `bench`
    --adapter). On a model with QuantLinear layers the adapter's layers sit beside them (load_lora; the 4-bit codes
    cannot take the update exactly); on a floating-point model it is merged into the weights (merge_adapter: the
    same function without the side path's cost per call). Returns the transformers model to call, in eval mode: the
    same object, changed in place, for a quantized model.

    >>> model = with_adapter(load("smollm2-gptq-4bit"), "adapter")  # doctest: +SKIP
    """
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        return merge_adapter(model, adapter_dir).eval()
    return load_lora(model, adapter_dir).base_model.model.eval()


# ------------------------------------------------------------------ partial quantization and tail fine-tuning


def tail_parameters(model: nn.Module, head: bool = True, embeddings: bool = False) -> list[tuple[str, nn.Parameter]]:
    """Make trainable, and return as (name, Parameter), the floating-point parameters of a gptqkit-loaded model that
    lie after its quantized blocks: every decoder block holding no QuantLinear (those `quantize(first_blocks=K)`
    left dense), whatever runs between the blocks and lm_head (the final norm), and lm_head when `head`. Embedding
    tables (token and position) only when `embeddings`; a tied lm_head is the token embedding, so `head` trains it.
    Everything else, the quantized blocks' dense parts included, is frozen: their inputs do not depend on the tail,
    so the quantized blocks' outputs stay exactly the ones their GPTQ solve assumed.

    A trainable 16-bit weight (load() keeps lm_head and the embedding in bf16 on CPU) is replaced by a float32 copy,
    since Adam's updates are below bf16's resolution; the replacement keeps a tied weight tied.

    >>> model = load("llama-first16-gptq", dense_dtype=torch.float32)  # doctest: +SKIP
    >>> opt = torch.optim.AdamW([p for _, p in tail_parameters(model)], lr=1e-5)  # doctest: +SKIP
    """
    prefix, blocks = find_blocks(model)
    quantized = [any(isinstance(m, QuantLinear) for m in b.modules()) for b in blocks]
    if not any(quantized):
        raise ValueError("the model has no quantized block: load a GPTQ checkpoint with gptqkit.checkpoint.load")
    last = max(i for i, q in enumerate(quantized) if q)
    head_mod = model.get_output_embeddings()
    emb_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head_params = {id(p) for p in head_mod.parameters()} if head_mod is not None else set()
    wanted = {id(p) for b in blocks[last + 1:] for p in b.parameters()}
    for m in _run_after_blocks(model, blocks):  # the final norm; OPT's project_out (its project_in runs before)
        wanted |= {id(p) for p in m.parameters(recurse=False) if id(p) not in emb_params | head_params}
    if head:
        wanted |= head_params
    if embeddings:
        wanted |= emb_params
    if not wanted:
        raise ValueError("nothing after the quantized blocks to train: quantize with first_blocks=K (--first-blocks) "
                         "to leave the last blocks in floating point, or keep lm_head dense")
    widened: dict[int, nn.Parameter] = {}  # id of a 16-bit weight: its float32 copy, one for all modules sharing it
    for m in model.modules():
        for n, p in list(m._parameters.items()):
            if p is not None and id(p) in wanted and p.dtype != torch.float32:
                setattr(m, n, widened.setdefault(id(p), nn.Parameter(p.detach().float())))
    wanted |= {id(p) for p in widened.values()}
    out = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in wanted)
        if id(p) in wanted:
            out.append((name, p))
    log.info("training %d tensors (%d values) after block %d of %s", len(out), sum(p.numel() for _, p in out), last,
             prefix)
    return out


def train(model: nn.Module, samples: list[dict], params: list[nn.Parameter], *, steps: int, lr: float = 1e-4,
          weight_decay: float = 0.0, seed: int = 0, progress: bool = True) -> list[float]:
    """`steps` AdamW steps of next-token loss on `samples` (gptqkit.data.calibration_samples' dicts, one per step,
    in a seeded order, cycling) updating `params`; returns each step's loss. Leaves the model in eval mode."""
    from tqdm.auto import tqdm

    if not samples:
        raise ValueError("no training samples: pass at least one text with a few tokens")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is invalid; use a positive integer (--steps)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    losses = []
    model.train()
    try:
        for step in tqdm(range(steps), desc="Fine-tuning", disable=not progress):
            s = samples[order[step % len(samples)]]
            ids, mask = s["input_ids"], s["attention_mask"]
            labels = ids.masked_fill(mask == 0, -100)  # padded positions never enter the loss
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        model.eval()
    return losses


def _run_after_blocks(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """The modules outside `blocks` with parameters of their own that a forward calls after the last block (found
    by running two tokens with hooks: which modules sit between the blocks and lm_head is the model's business)."""
    inside = {id(m) for m in blocks.modules()}
    order: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: order.append(mod))
             for m in model.modules() if id(m) not in inside and any(True for _ in m.parameters(recurse=False))]
    hooks.append(blocks[-1].register_forward_hook(lambda mod, args, out: order.append(mod)))
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device),
                  use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    ends = [i for i, m in enumerate(order) if m is blocks[-1]]
    return order[ends[-1] + 1:] if ends else []


@dataclass
class FinetuneReport:
    out: Path
    losses: list[float]
    trained: int  # values updated (a LoRA's, or the float tail's)
    seconds: float


def finetune(ckpt: str | os.PathLike, out: str | os.PathLike, *, dataset="wikitext2", nsamples: int = 128,
             seqlen: int = 512, steps: int = 100, lr: float = 1e-4, seed: int = 0, data_dir=None,
             lora_rank: int | None = None, head: bool = True, overwrite: bool = False,
             progress: bool = True) -> FinetuneReport:
    """Fine-tune a GPTQ checkpoint around its quantized layers and write the result to `out`:

    - lora_rank None: the float layers after the quantized blocks (tail_parameters: the blocks `quantize
      --first-blocks` left dense, the final norm, lm_head unless head=False); `out` is a GPTQ checkpoint with the
      same quantized tensors, byte for byte, and the tuned tail;
    - lora_rank r: LoRA adapters of rank r on every quantized Linear (add_lora); `out` is the adapter in peft's
      format, which load_lora() puts back on the checkpoint.

    Training samples are gptqkit.data.calibration_samples(dataset, nsamples, seqlen, seed): a named set, a list of
    strings or a text / JSONL file, as for quantize. The checkpoint folder is only read.

    >>> finetune("llama-first16-gptq", "llama-first16-tuned", dataset="my_texts.jsonl", steps=200)  # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    from .checkpoint import check_output_dir, load, read_quant_config, save
    from .data import calibration_samples

    t0 = time.perf_counter()
    ckpt, out = Path(ckpt).expanduser(), Path(out).expanduser()
    check_output_dir(out, ckpt, overwrite)
    cfg, _ = read_quant_config(ckpt)
    model = load(ckpt, dense_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(ckpt)
    samples = calibration_samples(tok, dataset, nsamples=nsamples, seqlen=seqlen, seed=seed, data_dir=data_dir)
    if lora_rank is None:
        params = [p for _, p in tail_parameters(model, head=head)]
    else:
        model = add_lora(model, r=lora_rank)
        params = [p for p in model.parameters() if p.requires_grad]
    losses = train(model, samples, params, steps=steps, lr=lr, seed=seed, progress=progress)
    if lora_rank is None:
        save(model, out, cfg, tok, source=ckpt, overwrite=overwrite)
    else:
        _save_adapter(model, out)
    return FinetuneReport(out=out, losses=losses, trained=sum(p.numel() for p in params),
                          seconds=time.perf_counter() - t0)


def _save_adapter(model: nn.Module, out: Path) -> None:
    """peft's save_pretrained into a temporary sibling folder, renamed onto `out` when complete (an existing `out`,
    which check_output_dir let through, stays until then)."""
    from .checkpoint import replace_folder

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
