"""A model's RMSNorms, gated MLPs, rotary attention and whole decoder blocks, swapped for modules that run decode rows
through one C call each.

Between two quantized matmuls of a decoded token, every torch op costs several times its warm microseconds: the
matmuls have just streamed megabytes of codes through the caches, so the interpreter's and torch's code and data
come from DRAM. Two small-op sequences that transformers' Llama, Mistral and Qwen2 run in every block are therefore
done in C for float32 rows fewer than C_ROWS (decode; prefill, other dtypes and autograd keep the torch formula):

- RMSNorm, six torch ops (x.float(), pow, mean, + eps, rsqrt, two multiplies): ~30 us per call in a loop on one
  2048-wide row, about three times that in a decoded token, 45 calls per token of a 22-block model.
  cpu_avx2.rms_norm does it in one pass; on the 1.1B shape (avx2-q8, 2 threads) an in-process A/B took 3.9-4.6 ms
  off each token, 2.5 ms on SmolLM2-135M.
- The gated MLP's silu(gate) * up, two ops on 5632 floats: 5.6 us in a loop, 50-70 us per layer in a decoded
  token. cpu_avx2.silu_mul does it in one pass; the same A/B took 0.9-1.2 ms off each token.
- Rotary attention's one-token step between the q/k/v and o projections: views and transposes, the rotary
  embedding (rotate_half's slices and cat, four multiplies, two adds), the cache's two copies, the attention call
  and the reshape, ~20 torch ops per layer. cpu_avx2.rope_decode_attention rotates, writes the cache and attends in
  one call; alternating 25-token rounds in one process took a median 1.8-2.5 ms off each token on the 1.1B shape
  (three processes) and 3.1 ms on SmolLM2-135M. It needs gptqkit's GrowingCache (which gptqkit's generate and
  bench pass) and the model switched to gptqkit.attention's implementation, as load() leaves it on CPU.
- A whole pre-norm block made of those swapped parts, with every projection on the avx2 kernels: the ~12 module
  calls and ~8 C calls of its one-token step through Python become one C call (cpu_avx2.decode_layer), bit for bit
  the same; alternating 25-token rounds took a median 2.2-3.1 ms off each token on the 1.1B shape (three processes).
- A decoder stack of such blocks with an RMSNorm at its end (Llama's and Mistral's LlamaModel / MistralModel): the
  blocks' Python around their C calls, ~50 us per block, becomes one C call per token for all blocks and the norm
  (cpu_avx2.decode_stack); 3.7-4.8% off each token on the 1.1B shape (alternating 16-token rounds in one process).

Which modules qualify is discovered, not tabled per model, and a probe on random float32 rows decides:
- a norm is a leaf with one 1-D `weight`, an `eps` or `variance_epsilon` float and nothing else, whose output equals
  RMSNorm's formula, Llama's w * x or Gemma's x * (1 + w); LayerNorm and look-alikes keep their class;
- a gated MLP has gate_proj / up_proj / down_proj submodules and an act_fn equal to SiLU or tanh-approximated GELU
  (Gemma's), and its output equals down(act(gate(x)) * up(x)); exact (erf) GELU and GPT-2's / OPT's ungated MLPs
  keep their class;
- an attention module has q_proj / k_proj / v_proj / o_proj and nothing else (no q/k norms, no sinks), head_dim,
  scaling and layer_idx, no logit softcapping, and one decode step with random cos and sin gives its output.
  GPT-2's, OPT's and GPT-NeoX's attention, and partial rotary, keep their class.
- a block has exactly input_layernorm, self_attn, post_attention_layernorm and mlp, all swapped above, and its
  decode_step gives exactly the block's own output on the same kind of probe. A projection's bias (Qwen2's q/k/v)
  is added in C after its matmul, one fp32 add as QuantLinear's own. A projection may be a LoRA wrapper around a
  QuantLinear (gptqkit.finetune.QuantLoraLinear, one adapter active): the C call adds the adapter's term after the
  projection with the function the wrapper itself calls (cpu_avx2.lora_add), and checks before each step that the
  term is still the wrapper's (its decode_guard).
- a stack has exactly embed_tokens, layers (all swapped blocks, as many as the config says), norm and rotary_emb,
  and its one-token step gives exactly its own forward's output after a 5-token prefill of random ids.
A swapped module holds the same Parameter or submodules under the same names, so state_dict() does not change.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import attention
from .cache import GrowingCache, GrowingLayer, cache_kwarg, given_cache
from .kernels import cpu_avx2

log = logging.getLogger(__name__)

C_ROWS = 32  # rows from which a call stays in torch (prefill: torch's vectorised ops run on every thread)


def _c_rows(x: torch.Tensor, *inputs: torch.Tensor) -> bool:
    """x [..., K] is fewer than C_ROWS float32 CPU rows and no input needs a gradient."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() < C_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)))


class RMSNorm(nn.Module):
    """weight * (x * rsqrt(mean(x^2, -1) + eps)), computed in float32 and returned in x's dtype (transformers'
    Llama formula); with offset, Gemma's (x * rsqrt(...)) * (1 + weight), all in float32, then x's dtype. Few
    float32 rows on CPU go through the C function."""

    def __init__(self, weight: nn.Parameter, eps: float, offset: bool = False):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype == torch.float32 and _c_rows(x, x, w):
            y = cpu_avx2.rms_norm(x, w, self.variance_epsilon, self.offset)
            if y is not None:
                return y
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.offset:
            return (h * (1.0 + w.float())).to(dtype)
        return w * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}" + (", offset" if self.offset else "")


class GatedMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)), act SiLU (Llama's) or tanh-approximated GELU (Gemma's); the product
    of few float32 rows on CPU in one C call."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn: nn.Module,
                 act: str = "silu"):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn
        self.act = act  # cpu_avx2.ACTS' name of what act_fn computes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _c_rows(x, x):
            y = cpu_avx2.gated_prefill(self.gate_proj, self.up_proj, self.down_proj, x, self.act)  # avx2 prefill
            if y is not None:
                return y
        g, u = self.gate_proj(x), self.up_proj(x)
        if _c_rows(g, g, u):
            h = cpu_avx2.act_mul(g, u, self.act)
            if h is not None:
                return self.down_proj(h)
        if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
            return self.down_proj(self.act_fn(g) * u)
        # Prefill: silu and the product in place in g (act_fn equals F.silu, _mlp_agrees checked), and u gone before
        # down_proj runs, so at most two [M, intermediate] tensors are alive (11.5 MB each on the 1.1B shape at 512
        # float32 rows).
        h = (F.silu(g, inplace=True) if self.act == "silu" else self.act_fn(g)).mul_(u)
        del g, u
        return self.down_proj(h)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same in torch for any rows (what the probe compares a module with)."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _norm_for(module: nn.Module) -> RMSNorm | None:
    """An RMSNorm over the weight of a module shaped like one (one 1-D weight, an eps, no other tensors), else None;
    with offset where the module's output on a probe is Gemma's formula rather than Llama's."""
    params = dict(module.named_parameters(recurse=False))
    if list(module.children()) or list(module.buffers(recurse=False)) or list(params) != ["weight"]:
        return None
    if params["weight"].dim() != 1:
        return None
    for attr in ("variance_epsilon", "eps"):
        eps = getattr(module, attr, None)
        if isinstance(eps, float):
            plain, gemma = RMSNorm(params["weight"], eps), RMSNorm(params["weight"], eps, offset=True)
            return gemma if _norm_agrees(module, gemma) and not _norm_agrees(module, plain) else plain
    return None


def _norm_agrees(module: nn.Module, new: RMSNorm) -> bool:
    w = new.weight
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    ref = module(x)
    return ref.shape == x.shape and ref.dtype == x.dtype and torch.allclose(new(x), ref, rtol=1e-5, atol=1e-6)




def _mlp_for(module: nn.Module) -> GatedMLP | None:
    """A GatedMLP holding a module's gate_proj, up_proj, down_proj and act_fn, where act_fn is one of
    cpu_avx2.ACT_TORCH on a probe; else None."""
    parts = tuple(getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    if not all(isinstance(p, nn.Module) for p in parts):
        return None
    t = torch.linspace(-12, 12, 97)
    try:
        got = parts[3](t)
    except RuntimeError:
        return None
    act = next((a for a, f in cpu_avx2.ACT_TORCH.items() if torch.allclose(got, f(t), rtol=1e-6, atol=1e-7)), None)
    return GatedMLP(*parts, act=act) if act is not None else None


def _mlp_agrees(module: nn.Module, new: GatedMLP) -> bool:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    hidden = getattr(new.gate_proj, "in_features", None)
    if tensor is None or hidden is None:
        return False
    t = torch.linspace(-12, 12, 97, device=tensor.device)
    if not torch.allclose(new.act_fn(t), cpu_avx2.ACT_TORCH[new.act](t), rtol=1e-6, atol=1e-7):
        return False
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(0)).to(tensor.device)  # the C path's rows
    try:
        ref = module(x)
    except RuntimeError:  # e.g. a model that computes in another dtype
        return False
    return ref.shape == (3, hidden) and torch.allclose(new.reference(x), ref, rtol=1e-5, atol=1e-6)


def _one_token_call(attention_mask, position_embeddings, cache, config) -> bool:
    """A forward call that may be a one-token C step: no mask, rotary cos/sin given, a GrowingCache, and the model on
    gptqkit.attention's implementation (set_attn_implementation("sdpa") undoes it)."""
    return (attention_mask is None and position_embeddings is not None and type(cache) is GrowingCache
            and config._attn_implementation == attention.NAME)


def _free_slot(cache: GrowingCache, i: int, window: int | None, x: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, *inputs: torch.Tensor) -> tuple[GrowingLayer, int] | None:
    """(layer i of the cache, the position T a new token is written at) where x [1, 1, hidden] is one float32 CPU
    token that needs no gradient (nor do `inputs`), layer i is a GrowingLayer with room below the sliding window,
    and its buffers (float32 or bfloat16), cos and sin (float32) are contiguous; else None."""
    layers = cache.layers
    if not (x.numel() == x.shape[-1] and _c_rows(x, x, *inputs) and i < len(layers)):
        return None
    layer = layers[i]
    T = layer.free_slot(1) if type(layer) is GrowingLayer else None
    if T is None or (window is not None and T >= window):
        return None
    if not (layer._kbuf.dtype in cpu_avx2.KV_DTYPES and cos.dtype == sin.dtype == torch.float32
            and cos.is_contiguous() and sin.is_contiguous()):
        return None
    return layer, T


class DecodeAttention(nn.Module):
    """Mixed in front of a rotary attention class (Llama's, Mistral's, Qwen2's, ...) whose forward is
    o_proj(attention(rope(q_proj(x)), rope(k_proj(x)), v_proj(x))): one new float32 token on CPU with a GrowingCache,
    in a model switched to gptqkit.attention's implementation, runs decode_step; every other call the class's own
    forward. The subclass keeps the class (isinstance, output recorders) and the module's attributes and
    submodules, so state_dict() does not change."""

    window: int | None  # positions from which the class's forward runs (a sliding window's width), or None

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs):
        cache = given_cache(kwargs)  # `cache` or `past_key_values`, as the installed transformers names it
        if _one_token_call(attention_mask, position_embeddings, cache, self.config):
            y = self.decode_step(hidden_states, *position_embeddings, cache)
            if y is not None:
                return y, None
        return super().forward(hidden_states, position_embeddings=position_embeddings,
                               attention_mask=attention_mask, **kwargs)

    def decode_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    cache: GrowingCache) -> torch.Tensor | None:
        """o_proj of the attention of x [1, 1, hidden], at the position whose rotary cos, sin [1, 1, head_dim] are
        given, over the cache's positions and its own, which it appends to the cache; None (nothing changed) where
        this is not a one-token float32 CPU step into a GrowingLayer with room."""
        slot = _free_slot(cache, self.layer_idx, self.window, x, cos, sin)  # sizes: rope_decode_attention
        if slot is None:
            return None
        layer, T = slot
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [1, 1, H * D], [1, 1, Hkv * D] x 2
        if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()) or (
                torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            return None  # e.g. adapters on q/k/v that train: their gradient needs the torch ops
        out = cpu_avx2.rope_decode_attention(q, k, v, cos, sin, layer._kbuf, layer._vbuf, T, self.scaling)
        if out is None:
            return None
        layer.extend(1)
        return self.o_proj(out)

    def __reduce_ex__(self, protocol):
        # The class is made at run time (_decode_class), so pickle names the attention class it extends.
        return _decode_copy, (type(self).__bases__[1], self.__dict__)


def _decode_copy(cls: type, state: dict) -> DecodeAttention:
    """A Decode subclass instance of attention class `cls` holding `state` (a module's __dict__, shallow-copied)."""
    return _plain_copy(_decode_class(cls), state)


def _plain_copy(cls: type, state: dict) -> nn.Module:
    """An instance of module class `cls` holding `state` (a module's __dict__, shallow-copied: its own parameter,
    buffer and submodule dicts, the same tensors and submodules)."""
    new = cls.__new__(cls)
    new.__dict__.update(state)
    for d in ("_parameters", "_buffers", "_modules"):
        new.__dict__[d] = dict(state[d])
    return new


def _unswapped_state(module: nn.Module) -> dict:
    """A DecodeLayer's or DecodeStack's __dict__ without what the swap added: the plain module's."""
    return {k: v for k, v in module.__dict__.items() if k not in module._FUSED}


@functools.cache
def _decode_class(cls: type) -> type:
    return type(f"Decode{cls.__name__}", (DecodeAttention, cls), {"__module__": __name__})


def _attention_for(module: nn.Module) -> DecodeAttention | None:
    """A DecodeAttention copy of a module shaped like rotary attention (q/k/v/o_proj and nothing else, head_dim,
    scaling, layer_idx, no logit softcapping), else None."""
    children = dict(module.named_children())
    config = getattr(module, "config", None)
    D = getattr(module, "head_dim", None)
    if (sorted(children) != ["k_proj", "o_proj", "q_proj", "v_proj"] or list(module.parameters(recurse=False))
            or list(module.buffers(recurse=False)) or not isinstance(D, int) or D % 8
            or not isinstance(getattr(module, "scaling", None), float)
            or not isinstance(getattr(module, "layer_idx", None), int)
            or getattr(config, "attn_logit_softcapping", None) is not None):
        return None
    H, Hkv = (getattr(children[n], "out_features", 0) // D for n in ("q_proj", "k_proj"))
    if not (H and Hkv and H % Hkv == 0 and getattr(children["v_proj"], "out_features", 0) == Hkv * D):
        return None
    new = _decode_copy(type(module), module.__dict__)
    windows = [w for w in (getattr(module, "sliding_window", None), getattr(config, "sliding_window", None))
               if isinstance(w, int)]
    new.window = min(windows) if windows else None
    return new


def _attention_agrees(module: nn.Module, new: DecodeAttention) -> bool:
    """Prefill 5 random positions through the module into one cache and through `new` into another, then decode a
    sixth through both: new's decode_step must run and agree (_agree_to_rounding). cos and sin are random, so the
    probe checks the rotation's formula, not only its values at real positions."""
    ref, got = _probe(module, new, new.q_proj.in_features, new.head_dim)
    return got is not None and got.shape == ref.shape and _agree_to_rounding(got, ref)


def _agree_to_rounding(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """got equals ref up to float32 rounding of sums taken in another order: within 1e-4 of each element, or 1e-5 of
    ref's largest magnitude. The module's own step runs SDPA, `new` the C attention; their outputs differ by a few
    float32 steps of the output's magnitude, so an element near zero of a large output (one of SmolLM2-135M's 30
    blocks: 1.9e-5 at a magnitude of 109) is not held to its own size alone. A formula that differs (a rotation of
    part of each head, a missing scale) moves the outputs by a sizeable fraction of that magnitude."""
    return torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(ref.abs().max())))


def _probe(module: nn.Module, new: nn.Module, hidden: int, head_dim: int) -> tuple:
    """(module's output, new.decode_step's) for a sixth random position after 5 prefilled through each into its own
    GrowingCache, with random cos and sin; (None, None) where the forward does not fit this probe."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, hidden, generator=g)
    cos, sin = (torch.rand(1, 6, head_dim, generator=g) * 2 - 1 for _ in range(2))
    caches = GrowingCache(length=6), GrowingCache(length=6)  # five positions and the sixth
    name = cache_kwarg(module)
    try:
        for m, cache in zip((module, new), caches):
            m(x[:, :5], position_embeddings=(cos[:, :5], sin[:, :5]), attention_mask=None, **{name: cache})
        pos = (cos[:, 5:].contiguous(), sin[:, 5:].contiguous())
        ref = module(x[:, 5:], position_embeddings=pos, attention_mask=None, **{name: caches[0]})
        got = new.decode_step(x[:, 5:], *pos, caches[1])
    except (RuntimeError, TypeError, ValueError, AttributeError):  # a forward this probe does not fit
        return None, None
    return (ref[0] if isinstance(ref, tuple) else ref), got


@torch.no_grad()
def _swap(model: nn.Module, make: Callable, agrees: Callable, kind: type, what: str) -> int:
    """Replace each module that make() builds a `kind` for and whose output agrees with it on a probe; log what was
    swapped and which classes kept their own forward."""
    swapped, kept = 0, set()
    for name, module in list(model.named_modules()):
        new = make(module) if not isinstance(module, kind) else None
        if new is None:
            continue
        if not agrees(module, new):
            kept.add(type(module).__name__)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        swapped += 1
    if swapped:
        log.info("fused: %d %s modules run decode rows in C", swapped, kind.__name__)
    for cls in sorted(kept):
        log.info("fused: %s keeps its own forward (it does not compute %s)", cls, what)
    return swapped


def use_norms(model: nn.Module) -> int:
    """Swap every module of `model` that computes RMSNorm as RMSNorm does for one; returns how many.

    >>> use_norms(model)  # doctest: +SKIP
    45
    """
    return _swap(model, _norm_for, _norm_agrees, RMSNorm, "weight * x / rms(x)")


def use_mlps(model: nn.Module) -> int:
    """Swap every module of `model` that computes down(silu(gate(x)) * up(x)) for a GatedMLP holding the same
    submodules; returns how many.

    >>> use_mlps(model)  # doctest: +SKIP
    22
    """
    return _swap(model, _mlp_for, _mlp_agrees, GatedMLP, "down(silu(gate(x)) * up(x))")


def use_attention(model: nn.Module) -> int:
    """Swap every rotary attention module of `model` whose one-token step decode_step reproduces (see DecodeAttention)
    for a copy of it that runs that step; returns how many.

    >>> use_attention(model)  # doctest: +SKIP
    22
    """
    return _swap(model, _attention_for, _attention_agrees, DecodeAttention, "o(attention(rope(q), rope(k), v))")


class DecodeLayer(nn.Module):
    """Mixed in front of a pre-norm decoder block class (Llama's, Mistral's) whose forward is

        h = x + self_attn(input_layernorm(x));  y = h + mlp(post_attention_layernorm(h))

    with the norms, attention and MLP already swapped by use_norms / use_mlps / use_attention and every projection
    on the avx2 kernels: a step DecodeAttention would take runs the whole block in one C call (cpu_avx2.decode_layer:
    the same C functions, in the same order, with the same roundings). Every other call, and any call after a part
    of the block was replaced, hooked or moved to another kernel, runs the class's own forward."""

    window: int | None
    _args: cpu_avx2.LayerArgs
    _parts: tuple  # ((owner's _modules, name, module), ...) as swapped: the C call stands for exactly these
    _linears: tuple  # ((QuantLinear, kernel, plan, shared), ...) as swapped
    _adapters: tuple  # ((LoRA wrapper, (A, B, scale)), ...): the adapter terms the C call adds
    _guard: Callable | None  # whether those terms are still the wrappers' (see _adapter_guard)
    _biases: tuple  # ((the dict holding a QuantLinear's bias, the bias, its address), ...): read in place by the C call
    _FUSED = ("_args", "_parts", "_linears", "_adapters", "_guard", "_biases", "window")  # added by the swap

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                position_embeddings: tuple | None = None, **kwargs):
        # keyword-only past the mask: the class's own signature has position_ids and the cache in between
        cache = given_cache(kwargs)
        if _one_token_call(attention_mask, position_embeddings, cache, self.self_attn.config):
            y = self.decode_step(hidden_states, *position_embeddings, cache)
            if y is not None:
                return y
        return super().forward(hidden_states, attention_mask=attention_mask,
                               position_embeddings=position_embeddings, **kwargs)

    def intact(self) -> bool:
        """The block's parts are still the ones the C call was built for, with no hooks and the same kernels."""
        for modules, name, m in self._parts:
            if modules.get(name) is not m or m._forward_hooks or m._forward_pre_hooks:
                return False
        for m, kernel, plan, shared in self._linears:
            if m.kernel is not kernel or m._avx2_plan is not plan or m._avx2_shared is not shared:
                return False
        return (_biases_intact(self._biases) and (self._guard is None or self._guard())
                and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks))

    def decode_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    cache: GrowingCache) -> torch.Tensor | None:
        """The block's output for x [1, 1, hidden] at the position whose rotary cos, sin [1, 1, head_dim] are given,
        appending its key and value to the cache; None (nothing changed) where this is not a one-token float32 CPU
        step into a GrowingLayer with room, or the block changed since it was swapped."""
        if not self.intact():
            return None
        slot = _free_slot(cache, self.self_attn.layer_idx, self.window, x, cos, sin,
                          self.input_layernorm.weight, self.post_attention_layernorm.weight,
                          *(t for _, term in self._adapters for t in term[:2]))  # adapters that train: torch ops
        if slot is None:
            return None
        layer, T = slot
        y = cpu_avx2.decode_layer(self._args, x, cos, sin, layer._kbuf, layer._vbuf, T)
        if y is None:
            return None
        layer.extend(1)
        return y

    def __reduce_ex__(self, protocol):
        # Pickled (or deep-copied) as the plain block: the C call's arguments are addresses in this process.
        return _plain_copy, (type(self).__bases__[1], _unswapped_state(self))



@functools.cache
def _layer_class(cls: type) -> type:
    return type(f"Decode{cls.__name__}", (DecodeLayer, cls), {"__module__": __name__})


def _layer_for(module: nn.Module) -> DecodeLayer | None:
    """A DecodeLayer copy of a block made of exactly input_layernorm, self_attn, post_attention_layernorm and mlp,
    already swapped (RMSNorm, DecodeAttention, GatedMLP) and on the avx2 kernels; else None."""
    children = dict(module.named_children())
    if sorted(children) != ["input_layernorm", "mlp", "post_attention_layernorm", "self_attn"]:
        return None
    n1, n2, attn, mlp = (children[k] for k in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"))
    if not (type(n1) is RMSNorm and type(n2) is RMSNorm and isinstance(attn, DecodeAttention)
            and type(mlp) is GatedMLP and not list(module.parameters(recurse=False))
            and not list(module.buffers(recurse=False))):
        return None
    projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    linears, adapters, extra = [], [], []  # the QuantLinears; LoRA wrappers' terms and modules
    for m in projections:
        if type(m).__name__ != "QuantLinear":  # a LoRA wrapper (finetune.QuantLoraLinear) around one?
            base, term = getattr(m, "base_layer", None), getattr(m, "decode_adapter", lambda: None)()
            if type(base).__name__ != "QuantLinear" or term is None:
                return None
            adapters.append((m, term))
            extra += m.decode_modules()
            m = base
        linears.append(m)
    H, Hkv = linears[0].out_features // attn.head_dim, linears[1].out_features // attn.head_dim
    terms = {linears[projections.index(w)]: term for w, term in adapters}
    args = cpu_avx2.layer_args(n1.weight, n1.variance_epsilon, n2.weight, n2.variance_epsilon, linears[:3],
                               linears[3], linears[4:6], linears[6], H, Hkv, attn.head_dim, attn.scaling, terms,
                               (n1.offset, n2.offset), mlp.act)
    if isinstance(args, str):
        log.debug("fused: %s keeps its own forward (%s)", type(module).__name__, args)
        return None
    new = _plain_copy(_layer_class(type(module)), module.__dict__)
    new._args, new.window = args, attn.window
    owners = [(new, ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")),
              (attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))]
    new._parts = tuple((owner._modules, n, owner._modules[n]) for owner, names in owners for n in names)
    new._parts += tuple((owner._modules, n, owner._modules[n]) for owner, n in extra)
    new._linears = tuple((m, m.kernel, m._avx2_plan, m._avx2_shared) for m in linears)
    new._adapters, new._guard = tuple(adapters), _adapter_guard(adapters)
    new._biases = tuple((m._buffers if "bias" in m._buffers else m._parameters, m.bias, m.bias.data_ptr())
                        for m in linears if m.bias is not None)
    return new


def _biases_intact(biases: tuple) -> bool:
    """Each (dict, bias, address) still holds: the layer's bias is that tensor, at that address (the C call reads it
    in place, so in-place changes count)."""
    return all(d.get("bias") is b and b.data_ptr() == p for d, b, p in biases)


def _adapter_guard(adapters: list) -> Callable | None:
    """A check, for every decoded token, that each (wrapper, term) still holds: the wrapper's decode_adapter() would
    give that term (A, B, scale) with A and B where they were (read in place: in-place updates count). The wrapper
    class's decode_guard builds it (finetune.QuantLoraLinear's: maps over the wrappers' attribute dicts, where calling
    decode_adapter() through peft's properties cost ~5 us a wrapper, 1.2 ms of a ~3.4 ms SmolLM2 token with its 210
    projections adapted). None for no adapters."""
    if not adapters:
        return None
    by_class: dict = {}
    for w, term in adapters:
        by_class.setdefault(type(w), []).append((w, term))
    checks = [cls.decode_guard(*zip(*pairs)) for cls, pairs in by_class.items()]
    return checks[0] if len(checks) == 1 else lambda: all(check() for check in checks)


def _layer_agrees(module: nn.Module, new: DecodeLayer) -> bool:
    """Prefill 5 random positions through the block into one cache and through `new` into another, then decode a
    sixth through both: new's decode_step must run and give the block's own output exactly (it runs the same C
    functions as the block's swapped parts; random cos and sin, as _attention_agrees). The block's attention must
    be on gptqkit.attention's implementation already, so that its own decode step takes the C path too."""
    ref, got = _probe(module, new, new._args.hidden, new.self_attn.head_dim)
    return got is not None and torch.equal(got, ref)


def use_layers(model: nn.Module) -> int:
    """Swap every decoder block of `model` whose whole one-token step runs in one C call (see DecodeLayer) for a
    copy of it that does; returns how many. Needs use_norms, use_mlps, use_attention and attention.use first (load()
    calls them all on CPU with the avx2 kernels).

    >>> use_layers(model)  # doctest: +SKIP
    22
    """
    return _swap(model, _layer_for, _layer_agrees, DecodeLayer, "x + attention(norm(x)), then h + mlp(norm(h))")


class DecodeStack(nn.Module):
    """Mixed in front of a decoder stack class (Llama's and Mistral's LlamaModel / MistralModel) whose forward is

        h = embed_tokens(ids);  cos, sin = rotary_emb(h, positions);  h = block(h, ...) for each block;  norm(h)

    with every block a DecodeLayer and the norm an RMSNorm: a one-token step in which every block would take its C
    call runs all of them and the norm in one C call (cpu_avx2.decode_stack), bit for bit the same. Around each
    block's C call the stack's loop, the block's checks and its cache views took ~50 us of Python on the 1.1B shape
    (every object read from DRAM again after the block's codes streamed through the caches); one call per token took
    3.7-4.8% off each token (alternating 16-token rounds in one process, two runs). Every other call (prefill,
    batches, padding, output_hidden_states, autograd), and any call after a block, one of its parts or the norm was
    replaced, hooked or moved to another kernel, runs the class's own forward, whose blocks then take their own C
    calls."""

    _stack: object  # cpu_avx2.stack_args() of the blocks
    _blocks: tuple  # the DecodeLayers, in call order (block i writes cache layer i)
    _window: int | None  # positions from which the class's forward runs (the narrowest sliding window), or None
    _parts: tuple  # (owners' _modules dicts, names, modules) as swapped: the C call stands for exactly these
    _hooks: tuple  # forward (pre-)hook dicts of the modules the C call runs without calling them (torch adds to
    # these dicts in place)
    _linears: tuple  # (the QuantLinears' __dict__s, their kernel, plan and shared of each in turn) as swapped
    _guard: Callable | None  # whether the blocks' LoRA terms are still their wrappers' (_adapter_guard)
    _biases: tuple  # the blocks' (DecodeLayer._biases)
    _FUSED = ("_stack", "_blocks", "_window", "_parts", "_hooks", "_linears", "_guard", "_biases")  # the swap's

    def forward(self, *args, **kwargs):
        if not args:  # transformers' causal LMs call their stack by keyword
            out = self.decode_step(kwargs)
            if out is not None:
                return out
        return super().forward(*args, **kwargs)

    def intact(self) -> bool:
        """The blocks, their parts and the norm are still the ones the C call was built for, with no hooks and the
        same kernels (DecodeLayer.intact for all blocks at once, with the loops in C: each check reads its objects
        from DRAM)."""
        g = nn.modules.module
        if g._global_forward_hooks or g._global_forward_pre_hooks:
            return False
        dicts, names, modules = self._parts
        if not all(map(operator.is_, map(dict.get, dicts, names), modules)) or any(map(len, self._hooks)):
            return False
        # Each QuantLinear's three attributes from its own __dict__ (where Module.__setattr__ keeps them), in one
        # pass: a cold attribute lookup walks the class's MRO too. Three getattr passes took 164 us a token on the
        # 1.1B shape and 124 on SmolLM2-135M, this 130 and 92 (medians of 64 tokens each, alternating in one process).
        linears, expected = self._linears
        try:
            if not all(map(operator.is_, itertools.chain.from_iterable(map(_LINEAR_STATE, linears)), expected)):
                return False
        except KeyError:  # an attribute deleted: not the layer the C call was built for
            return False
        return _biases_intact(self._biases) and (self._guard is None or self._guard())

    def decode_step(self, kw: dict):
        """The stack's output (transformers' BaseModelOutputWithPast) for a forward called with keyword arguments
        `kw` that decode one token of batch 1 into a GrowingCache with room in every layer, no gradient and no
        extra outputs asked for, each block's key and value appended to the cache; None (nothing changed)
        otherwise."""
        ids, cache, mask, config = kw.get("input_ids"), given_cache(kw), kw.get("attention_mask"), self.config
        if not (type(cache) is GrowingCache and isinstance(ids, torch.Tensor) and ids.shape == (1, 1)
                and ids.device.type == "cpu" and kw.get("inputs_embeds") is None and kw.get("use_cache") is not False
                and kw.get("return_dict", getattr(config, "return_dict", True))
                and not kw.get("output_hidden_states", getattr(config, "output_hidden_states", False))
                and not kw.get("output_attentions", getattr(config, "output_attentions", False))
                and not torch.is_grad_enabled() and config._attn_implementation == attention.NAME
                and len(cache.layers) == len(self._blocks) == config.num_hidden_layers
                and len(self._modules.get("layers", ())) == len(self._blocks) and self.intact()):
            return None
        layers = cache.layers
        T = layers[0].free_slot(1) if type(layers[0]) is GrowingLayer else None
        if T is None or (self._window is not None and T >= self._window):
            return None
        if not all(type(layer) is GrowingLayer and layer.free_slot(1) == T for layer in layers):
            return None
        # one query attends to every cached position: a mask of all ones masks nothing (transformers' mask builder
        # gives the blocks none for it)
        if mask is not None and not (mask.shape == (1, T + 1) and bool(mask.all())):
            return None
        x = self.embed_tokens(ids)  # [1, 1, hidden]
        positions = kw.get("position_ids")
        if positions is None:  # the class's own: the cached length onwards
            positions = torch.full((1, 1), T, dtype=torch.long)
        # On one torch thread: torch runs even a 128-element cos in a parallel region (Gemma's head_dim 256), whose
        # OpenMP worker then spins on the core the C call's own worker needs (a Gemma-shaped 4-bit model with 2
        # threads: 13-16 ms per token with the region, 4.9-6.4 without). Per calling thread, restored at once.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cos, sin = self.rotary_emb(x, positions)  # [1, 1, head_dim] each
        finally:
            torch.set_num_threads(threads)
        if not (x.dtype == cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()):
            return None
        norm = self.norm
        y = cpu_avx2.decode_stack(self._stack, x, cos, sin, [layer._kbuf for layer in layers],
                                  [layer._vbuf for layer in layers], T, norm.weight, norm.variance_epsilon, norm.offset)
        if y is None:
            return None
        for layer in layers:
            layer.extend(1)
        return _stack_output(y, cache)

    def __reduce_ex__(self, protocol):
        # Pickled (or deep-copied) as the plain stack: the C call's arguments are addresses in this process.
        return _plain_copy, (type(self).__bases__[1], _unswapped_state(self))


_LINEAR_STATE = operator.itemgetter("kernel", "_avx2_plan", "_avx2_shared")  # of a QuantLinear's __dict__


def _stack_output(y: torch.Tensor, cache: GrowingCache):
    """BaseModelOutputWithPast(last_hidden_state=y) with the cache under the field this transformers names it by."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    field = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
    return BaseModelOutputWithPast(last_hidden_state=y, **{field: cache})


@functools.cache
def _stack_class(cls: type) -> type:
    return type(f"Decode{cls.__name__}", (DecodeStack, cls), {"__module__": __name__})


def _stack_for(module: nn.Module) -> DecodeStack | None:
    """A DecodeStack copy of a module made of exactly embed_tokens, layers (DecodeLayers writing cache layers 0, 1,
    ... in order, as many as the config's num_hidden_layers), norm (an RMSNorm in float32) and rotary_emb; else
    None."""
    children = dict(module.named_children())
    if sorted(children) != ["embed_tokens", "layers", "norm", "rotary_emb"]:
        return None
    blocks, norm = children["layers"], children["norm"]
    if not (type(blocks) is nn.ModuleList and len(blocks) > 0 and all(isinstance(b, DecodeLayer) for b in blocks)
            and [b.self_attn.layer_idx for b in blocks] == list(range(len(blocks)))
            and getattr(getattr(module, "config", None), "num_hidden_layers", None) == len(blocks)
            and type(norm) is RMSNorm and norm.weight.dtype == torch.float32
            and not list(module.parameters(recurse=False)) and not list(module.buffers(recurse=False))):
        return None
    new = _plain_copy(_stack_class(type(module)), module.__dict__)
    _register_output_capture(new)
    new._stack = cpu_avx2.stack_args([b._args for b in blocks])
    new._blocks = tuple(blocks)
    windows = [b.window for b in blocks if b.window is not None]
    new._window = min(windows) if windows else None
    parts = [(new._modules, n, children[n]) for n in ("embed_tokens", "layers", "norm", "rotary_emb")]
    parts += [(blocks._modules, n, b) for n, b in blocks._modules.items()]
    parts += [p for b in blocks for p in b._parts]
    new._parts = tuple(zip(*parts))
    unseen = [blocks, norm, *blocks, *(m for b in blocks for _, _, m in b._parts)]  # embed_tokens, rotary_emb: called
    new._hooks = tuple(h for m in unseen for h in (m._forward_hooks, m._forward_pre_hooks))
    linears = [lin for b in blocks for lin in b._linears]  # (QuantLinear, kernel, plan, shared)
    new._linears = (tuple(m.__dict__ for m, *_ in linears), tuple(x for _, *state in linears for x in state))
    new._guard = _adapter_guard([a for b in blocks for a in b._adapters])
    new._biases = tuple(x for b in blocks for x in b._biases)
    return new


def _register_output_capture(new: nn.Module) -> None:
    """transformers (>= 5) finds what a model's forward can record for output_hidden_states / output_attentions in a
    registry keyed by the model's class name, which PreTrainedModel.__init__ fills for each model it builds. `new` was
    copied without __init__, so its class is registered here the same way: its own forward, which the stack falls
    back to for those outputs, then records them."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # versions that read the class attribute itself
        return
    _CAN_RECORD_REGISTRY[new] = getattr(new, "_can_record_outputs", None)


def _stack_agrees(module: nn.Module, new: DecodeStack) -> bool:
    """Prefill 5 random token ids through the stack into one GrowingCache and through `new` into another, then decode
    a sixth through both: new's decode_step must run and give the stack's own output exactly (its blocks take their
    own C calls, the same functions). A stack whose forward does more than the one-call step (an older Gemma's
    embeddings scaled in its forward rather than by its embedding module) fails it."""
    vocab = getattr(module.embed_tokens, "num_embeddings", None) or module.config.vocab_size
    ids = torch.randint(0, vocab, (1, 6), generator=torch.Generator().manual_seed(0))
    name = cache_kwarg(module)
    caches = GrowingCache(length=6), GrowingCache(length=6)  # five positions and the sixth
    try:
        for m, cache in zip((module, new), caches):
            m(input_ids=ids[:, :5], use_cache=True, **{name: cache})
        ref = module(input_ids=ids[:, 5:], use_cache=True, **{name: caches[0]})
        got = new.decode_step({"input_ids": ids[:, 5:], "use_cache": True, name: caches[1]})
    except (RuntimeError, TypeError, ValueError, AttributeError):  # a forward this probe does not fit
        return False
    return got is not None and torch.equal(got.last_hidden_state, ref.last_hidden_state)


def refresh(model: nn.Module) -> int:
    """Build again the one-call blocks and stack of `model` whose parts changed since they were swapped, as when a LoRA
    wrapper takes a projection's place (finetune.add_lora / load_lora call this): each such block or stack goes back
    to its plain class, then use_layers and use_stack swap again whatever now runs in one C call, wrappers and their
    adapter terms included. Returns how many blocks run in one C call.

    >>> refresh(load_lora(model, "adapter").base_model.model)  # doctest: +SKIP
    22
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, (DecodeLayer, DecodeStack)) and not module.intact():
            parent, _, child = name.rpartition(".")
            plain = _plain_copy(type(module).__bases__[1], _unswapped_state(module))
            setattr(model.get_submodule(parent) if parent else model, child, plain)
    # The probes compare eval-mode steps: an adapter's dropout (new modules start in training mode) would make the
    # wrappers' own forward random. Whether a dropout is on is checked at each call (the wrappers' decode_guard).
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        use_layers(model)
        use_stack(model)
    finally:
        for m, mode in modes:
            m.training = mode
    return sum(isinstance(m, DecodeLayer) for m in model.modules())


def use_stack(model: nn.Module) -> int:
    """Swap the decoder stack of `model` whose blocks all run in one C call each (see DecodeStack) for a copy of it
    that runs them all and its norm in one C call per token; returns how many stacks (0 or 1). Needs use_layers first
    (load() calls it on CPU with the avx2 kernels).

    >>> use_stack(model)  # doctest: +SKIP
    1
    """
    return _swap(model, _stack_for, _stack_agrees, DecodeStack, "its blocks one after another, then norm(h)")
