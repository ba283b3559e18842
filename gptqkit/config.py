"""QuantConfig: the quantization settings, named exactly as the checkpoint's `quantization_config` keys."""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")


class ConfigError(ValueError):
    """A quantization setting that cannot work; the message names the setting and the fix."""


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 128  # -1: one group spanning all input features
    desc_act: bool = False  # act-order: quantize columns by decreasing Hessian diagonal
    sym: bool = True
    damp_percent: float = 0.01  # fraction of mean(diag(H)) added to the diagonal
    true_sequential: bool = True
    static_groups: bool = False
    # Walk whole groups by importance, columns inside a group by decreasing diag(H) (gptq.column_order). Applies
    # only when desc_act and static_groups are off; g_idx stays k // group_size, so inference pays nothing.
    act_group_aware: bool = True
    checkpoint_format: str = "gptq"  # "gptq" (v1: stores zero - 1) or "gptq_v2" (stores zero)
    # Search a shrunk clipping range per group that minimises |w - q|^2.4 (GPTQ's `mse` option). On by default: on
    # SmolLM2 (g64, 64 x 512 c4) it took WikiText-2 ppl from 27.5 to 26.1 at 4 bits and 63.9 to 43.5 at 3 bits.
    mse: bool = True
    # Quantize the output layer too (GPTQModel's and vLLM's `lm_head` key), from the last block's outputs through
    # the final norm; a tied lm_head is untied (the embedding stays dense). Off by default, as in the paper.
    lm_head: bool = False
    quant_method: str = "gptq"
    # Per-module overrides as GPTQModel writes them: {"-:regex": {}} skips, {"+:regex": {"bits": 8}} overrides.
    dynamic: dict[str, dict[str, Any]] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"bits={self.bits} is not supported; use one of {', '.join(map(str, BITS))}")
        if not isinstance(self.group_size, int) or self.group_size == 0 or self.group_size < -1:
            raise ConfigError(
                f"group_size={self.group_size} is invalid; use -1 (one group per column) or a positive size such as 128"
            )
        if not 0.0 < self.damp_percent < 1.0:
            raise ConfigError(f"damp_percent={self.damp_percent} is out of range; use a value in (0, 1), e.g. 0.01")
        if self.checkpoint_format not in FORMATS:
            raise ConfigError(
                f"checkpoint_format={self.checkpoint_format!r} is unknown; use one of {', '.join(FORMATS)}"
            )
        if self.quant_method not in ("gptq", "rtn"):
            raise ConfigError(f"quant_method={self.quant_method!r} is unknown; use 'gptq' or 'rtn'")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def uses_group_aware_order(self) -> bool:
        return self.act_group_aware and not self.desc_act and not self.static_groups and self.quant_method == "gptq"

    def group_for(self, in_features: int) -> int:
        """The effective group size for a layer with `in_features` inputs (-1 means all of them)."""
        return in_features if self.group_size == -1 else self.group_size

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """The `quantization_config` dict written to config.json and quantize_config.json."""
        from . import __version__

        d: dict[str, Any] = {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "damp_percent": self.damp_percent,
            "true_sequential": self.true_sequential,
            "static_groups": self.static_groups,
            "checkpoint_format": self.checkpoint_format,
            "lm_head": self.lm_head,
            "model_name_or_path": None,
            "model_file_base_name": None,
            "meta": {"quantizer": [f"gptqkit:{__version__}"], "method": self.quant_method, "mse": self.mse,
                     "act_group_aware": self.uses_group_aware_order,
                     **(meta or {})},
        }
        if self.dynamic:
            d["dynamic"] = self.dynamic
        return d

    def for_module(self, name: str) -> "QuantConfig | None":
        """The settings for module `name` after `dynamic` overrides; None if a "-:" rule skips it."""
        for pattern, override in (self.dynamic or {}).items():
            sign, rx = (pattern[0], pattern[2:]) if pattern[:2] in ("+:", "-:") else ("+", pattern)
            if re.match(rx, name):
                if sign == "-":
                    return None
                keep = {k: v for k, v in override.items() if k in ("bits", "group_size", "desc_act", "sym")}
                return self.replace(**keep)
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "quantization_config") -> "QuantConfig":
        """Read a quantization_config written by gptqkit, GPTQModel, AutoGPTQ or optimum.

        Missing `sym` means True (old AutoGPTQ files omit it); GPTQModel's `format` is read as checkpoint_format.
        """
        method = d.get("quant_method", "gptq")
        if str(method).lower() != "gptq":
            raise ConfigError(f"{source}: quant_method={method!r} is not GPTQ; gptqkit loads GPTQ checkpoints only")
        if "bits" not in d:
            raise ConfigError(f"{source}: 'bits' is missing; add the bit width used to quantize (2, 3, 4 or 8)")
        if "sym" not in d:
            log.warning("%s has no 'sym' key; assuming sym=True as AutoGPTQ did", source)
        fmt = d.get("checkpoint_format", d.get("format", "gptq"))
        meta = d.get("meta") or {}
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: d[k] for k in ("bits", "group_size", "desc_act", "sym", "true_sequential", "static_groups",
                                "lm_head", "dynamic") if k in d and d[k] is not None}
        damp = d.get("damp_percent", meta.get("damp_percent"))
        if damp is not None:
            kw["damp_percent"] = float(damp)
        kw["checkpoint_format"] = str(fmt).lower()
        kw["mse"] = meta.get("mse") is True  # how the codes were chosen; files that do not say get False
        # Absent from most files; it describes how the codes were chosen, never how to read them.
        kw["act_group_aware"] = meta.get("act_group_aware") is True
        assert set(kw) <= known
        return cls(**kw)
