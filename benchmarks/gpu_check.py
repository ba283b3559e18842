"""The prerequisites the GPU benchmarks share: a visible CUDA device and Triton."""

from __future__ import annotations

import sys


def missing(script: str, triton_for: str = "") -> bool:
    """Print why `script` cannot run and return True when CUDA or Triton is missing."""
    import torch

    if not torch.cuda.is_available():
        print(f"{script} needs a CUDA GPU; none is visible (torch.cuda.is_available() is False).", file=sys.stderr)
        return True
    try:
        import triton  # noqa: F401
    except ImportError:
        print(f"{script} needs Triton{triton_for}: pip install gptqkit[triton]", file=sys.stderr)
        return True
    return False
