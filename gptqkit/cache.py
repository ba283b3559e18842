"""A key/value cache for decoding that appends in place instead of concatenating.

transformers' DynamicCache grows each layer's keys and values with torch.cat, which copies the whole cache for
every new token: on the 1.1B shape at 512 tokens that is 44 concatenations per token of ~0.5 MB each (~41 us
apiece, about a tenth of a 4-bit decode step on 2 cores), and the copy grows with the context. GrowingCache keeps
each layer's keys and values in a buffer [batch, kv_heads, capacity, head_dim] whose capacity doubles when full;
an update writes only the new tokens, and `keys` / `values` are views of the first `length` positions, which SDPA
reads through their strides.

It is a DynamicCache (same layers, same crop / reorder / mask behaviour); only full-attention layers change. Any
operation that replaces a layer's `keys` by a new tensor (beam reordering, batch selection) is noticed on the next
update, which then starts a new buffer from it.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

HEADROOM = 256  # positions: a new buffer holds its tokens plus this many; a full one doubles


def _append(view: torch.Tensor, buf: torch.Tensor | None, new: torch.Tensor, dtype: torch.dtype | None = None,
            length: int | None = None, spare: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(view of buf holding view's tokens then new's, buf) along dim -2; buf is reused when view lies in it. A new
    buffer is `spare` where that fits (its shape but along dim -2, dtype and device, and room for the tokens), else
    one of `dtype` (default new's) holding `length` positions where given (the whole sequence), else its tokens plus
    HEADROOM; a full one doubles."""
    T = view.shape[-2] if view.dim() == new.dim() else 0  # before the first update view is an empty 1-D tensor
    n = new.shape[-2]
    inside = (buf is not None and T > 0 and view.data_ptr() == buf.data_ptr() and view.stride() == buf.stride()
              and view.shape[:-2] == new.shape[:-2] and view.dtype == buf.dtype)
    if (not inside and spare is not None and T == 0 and spare.shape[:-2] == new.shape[:-2]
            and spare.shape[-1] == new.shape[-1] and spare.shape[-2] >= n and spare.dtype == (dtype or new.dtype)
            and spare.device == new.device):
        buf = spare
    elif not inside or T + n > buf.shape[-2]:
        room = 0 if length is not None else HEADROOM
        cap = max(T + n + room, length or 0, 2 * buf.shape[-2] if inside else 0)
        grown = new.new_empty(*new.shape[:-2], cap, new.shape[-1], dtype=dtype or new.dtype)
        if T:
            grown.narrow(-2, 0, T).copy_(view)
        buf = grown
    buf.narrow(-2, T, n).copy_(new)
    return buf.narrow(-2, 0, T + n), buf


class GrowingLayer(DynamicLayer):
    """DynamicLayer that appends into a doubling buffer (see the module docstring)."""

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None
    _length = 0
    # `keys` / `values` are properties. While "live" they are the first _length positions of the buffers, a view made
    # when first read after a write (and kept until the next): a decode step writes every layer's next position and
    # counts it without making two views per layer that nothing may read (2 torch calls, 7-8 us per layer per token
    # when the caches are cold between two matmuls). Anything transformers assigns to them (crop, reorder, batch
    # selection, device moves) is kept as it is and ends the live state, so the next update goes through _append's
    # checks.
    _klive = _vlive = False
    _kview: torch.Tensor | None = None
    _vview: torch.Tensor | None = None
    _kset: torch.Tensor | None = None
    _vset: torch.Tensor | None = None
    # of the buffers (None: the keys'); GrowingCache(dtype=...) sets it. (DynamicLayer's own `dtype` is the keys'.)
    buffer_dtype: torch.dtype | None = None
    length: int | None = None  # positions of the whole sequence, where known: a new buffer's size (GrowingCache's)
    _spares: tuple[torch.Tensor, torch.Tensor] | None = None  # buffers made ahead for the first update (reserve())

    @property
    def keys(self) -> torch.Tensor | None:
        if not self._klive:
            return self._kset
        if self._kview is None:
            self._kview = self._kbuf.narrow(-2, 0, self._length)
        return self._kview

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._kset, self._klive, self._kview = value, False, None

    @property
    def values(self) -> torch.Tensor | None:
        if not self._vlive:
            return self._vset
        if self._vview is None:
            self._vview = self._vbuf.narrow(-2, 0, self._length)
        return self._vview

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._vset, self._vlive, self._vview = value, False, None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        T = self.free_slot(n)
        if T is not None:
            self._kbuf.narrow(-2, T, n).copy_(key_states)
            self._vbuf.narrow(-2, T, n).copy_(value_states)
            self.extend(n)
            return self.keys, self.values
        ks, vs = self._spares or (None, None)
        self._spares = None
        kview, self._kbuf = _append(self.keys, self._kbuf, key_states, self.buffer_dtype, self.length, ks)
        vview, self._vbuf = _append(self.values, self._vbuf, value_states, self.buffer_dtype, self.length, vs)
        self._length = kview.shape[-2]
        self._kview, self._vview, self._klive, self._vlive = kview, vview, True, True
        self._kset = self._vset = None  # may be a view into a buffer just replaced: not kept alive
        return kview, vview

    def free_slot(self, n: int = 1) -> int | None:
        """The cached length T if n new positions can be written straight into the buffers at T .. T + n - 1 (room
        is left and nothing has assigned `keys` / `values` since the last update), else None. A caller that writes
        them there then calls extend(n); gptqkit.fused's decode steps do."""
        if self._klive and self._vlive:
            T = self._length
            if T + n <= self._kbuf.shape[-2]:
                return T
        return None

    def extend(self, n: int) -> None:
        """Count n positions written at free_slot() into the cache."""
        self._length += n
        self._kview = self._vview = None

    def reserve(self, shape: list[int], dtype: torch.dtype, device: torch.device) -> None:
        """Make the keys' and values' buffers [*shape] now, for the first update to start in where they fit."""
        self._spares = (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    def reset(self) -> None:
        self._kbuf = self._vbuf = self._spares = None
        super().reset()


class GrowingCache(DynamicCache):
    """DynamicCache whose full-attention layers are GrowingLayers. Pass `config` (the model's) so sliding-window
    layers keep their own type, as DynamicCache does:

    >>> out = model(ids, past_key_values=GrowingCache(model.config), use_cache=True)  # doctest: +SKIP

    dtype: what the GrowingLayers store keys and values in (default: the model's). torch.bfloat16 under a float32
    model halves the cache (the keys and values rounded to bf16, as a bf16 model's are); the keys and values a layer
    returns are then bf16 views, which gptqkit.attention's decode reads as they are and widens for SDPA
    (kv_dtype() says when that holds). length: the positions the whole sequence will take, where the caller knows it
    (generate: the prompt and max_new_tokens; gptqkit.fused's probes: 6): each layer's first buffer is made that size
    (or its tokens', if more), once, instead of tokens + HEADROOM and then doubled; a sequence that outgrows it still
    doubles it. With a config and a length, the first update makes every layer's buffers at once, all of the
    first one's shape (a layer whose keys differ makes its own): made one by one as each layer first runs, they sat
    among the prompt's activations, and glibc's heap, which cannot shrink under a live block, held the freed
    activations' memory under them (SmolLM2-135M +lm_head at 4 bits: peak resident 121.5-123.9 MiB above the runtime
    over three prefills, against 126.3-132.3).
    """

    def __init__(self, config=None, dtype: torch.dtype | None = None, length: int | None = None):
        super().__init__(config=config)
        self.buffer_dtype, self.length = dtype, length
        self._reserve = length is not None
        if self.layers:
            self.layers = [self._layer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        else:
            self.layer_class_to_replicate = self._layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self._reserve:
            self._reserve = False
            shape = [*key_states.shape[:-2], max(self.length, key_states.shape[-2]), key_states.shape[-1]]
            for layer in self.layers:
                if type(layer) is GrowingLayer and layer._kbuf is None:
                    layer.reserve(shape, self.buffer_dtype or key_states.dtype, key_states.device)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _layer(self) -> GrowingLayer:
        layer = GrowingLayer()
        layer.buffer_dtype, layer.length = self.buffer_dtype, self.length
        return layer


def kv_dtype(model) -> torch.dtype | None:
    """The dtype gptqkit's generate and bench keep a model's GrowingCache in: bfloat16 for a CPU model that runs
    gptqkit.attention (its decode reads a bf16 cache as it is, its prefill widens it to the queries' dtype for SDPA),
    so a float32 model's cache takes the bytes a bf16 model's does; None (the model's dtype) otherwise: transformers'
    own attention functions take keys of the queries' dtype only."""
    from .attention import NAME

    config = getattr(model, "config", None)
    param = next(model.parameters(), None)
    if config is None or param is None or getattr(config, "_attn_implementation", None) != NAME:
        return None
    return torch.bfloat16 if param.device.type == "cpu" else None


# transformers 5.24 renamed the KV cache argument of models, decoder layers and attention modules from
# `past_key_values` to `cache` (and the outputs' field likewise); the old names still work, with a FutureWarning, until
# 5.40. gptqkit supports both: these three helpers are where the name is decided.


def cache_kwarg(module) -> str:
    """The keyword `module`'s forward (a model, decoder layer or attention module) takes its KV cache by."""
    for cls in type(module).__mro__:  # a gptqkit mix-in's forward(**kwargs) defers to the class it extends
        forward = cls.__dict__.get("forward")
        if forward is not None:
            params = inspect.signature(forward).parameters
            if "cache" in params:
                return "cache"
            if "past_key_values" in params:
                return "past_key_values"
    return "past_key_values"


def given_cache(kwargs: dict):
    """The KV cache a forward was called with, by either name (see cache_kwarg); None if neither."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def output_cache(out):
    """The KV cache of a model output: its `cache` field (transformers >= 5.24), else `past_key_values`."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


KV_CACHE_CHOICES = ("auto", "model")


def cache_for(model, kv_cache: str = "auto", length: int | None = None) -> GrowingCache:
    """A GrowingCache for model: `auto` keeps it in kv_dtype(model) (bf16 under gptqkit's float32 CPU attention),
    `model` in the model's own dtype. length: the positions the sequence will take, where known (GrowingCache)."""
    if kv_cache not in KV_CACHE_CHOICES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_CHOICES)}, not {kv_cache!r}")
    return GrowingCache(model.config, dtype=kv_dtype(model) if kv_cache == "auto" else None, length=length)
