"""Kernels for QuantLinear. Each is a plain module with:

    name: str
    supports(layer, device) -> None if it can run, else a one-sentence reason
    prepare(layer) -> None    derive kernel-specific layouts once, as non-persistent buffers
    forward(layer, x) -> y    x [..., K] -> y [..., N]

`select` walks an explicit, ordered list and takes the first that supports the layer.
"""

from __future__ import annotations

import importlib
import logging

import torch

log = logging.getLogger(__name__)

# Most specific first; the reference kernel runs everywhere and closes the list.
# On CPU: avx2-q8 (2/3/4/8-bit codes read in place, activations rounded to int8 per 32 on decode: the fastest, with
# an error of the size bf16 activations give), avx2 (the same for 4-bit codes with fp32 activations; it runs only
# where avx2-q8 does, so "auto" reaches it only by name), cpu (PyTorch's int4 op; any bits), then the reference.
ORDER = {"cuda": ("triton", "torch"), "cpu": ("avx2-q8", "avx2", "cpu", "torch")}
MODULES = {"torch": "reference", "avx2": "cpu_avx2", "avx2-q8": "cpu_avx2_q8", "cpu": "cpu_int4",
           "triton": "triton_gptq"}


class KernelError(RuntimeError):
    pass


def load(name: str):
    if name not in MODULES:
        raise KernelError(f"unknown kernel {name!r}; choose one of {', '.join(MODULES)} or 'auto'")
    try:
        return importlib.import_module(f".{MODULES[name]}", __name__)
    except ImportError as e:
        raise KernelError(f"kernel {name!r} is not available: {e}") from e


def select(layer, device: torch.device | str, preferred: str = "auto"):
    """(kernel module, reasons the kernels ahead of it in ORDER declined) for `layer` on `device`."""
    device = torch.device(device)
    if preferred != "auto":
        k = load(preferred)
        why = k.supports(layer, device)
        if why is not None:
            raise KernelError(f"kernel {preferred!r} cannot run this layer: {why}")
        return k, []
    reasons = []
    for kname in ORDER.get(device.type, ("torch",)):
        try:
            k = load(kname)
        except KernelError as e:
            reasons.append(str(e))
            continue
        why = k.supports(layer, device)
        if why is None:
            return k, reasons
        reasons.append(f"{kname}: {why}")
    raise KernelError("no kernel can run this layer: " + "; ".join(reasons))
