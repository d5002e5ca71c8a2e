"""The one rule that decides whether an op runs its Triton kernels or the PyTorch fallback.

``PYCOMM_KERNELS_BACKEND`` (read at every call, so it can be changed at run time):

* ``auto`` (default): Triton when the inputs are on a CUDA device, or when Triton's interpreter is
  active (``TRITON_INTERPRET=1`` set before ``kernels`` was imported); PyTorch otherwise, so a
  laptop without a GPU gets correct results from plain PyTorch.
* ``triton``: always Triton.  CPU tensors then need the interpreter; without it this raises.
* ``torch``: always the PyTorch fallback (useful to compare, or to debug a model).
"""
from __future__ import annotations

import os

import torch

from . import _interpreter

ENV_VAR = "PYCOMM_KERNELS_BACKEND"
_CHOICES = ("auto", "triton", "torch")


def backend() -> str:
    """The configured backend name: ``auto``, ``triton`` or ``torch``."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {_CHOICES}; unset it or pick one of those")
    return value


def use_triton(t: torch.Tensor) -> bool:
    """True when an op on tensors like ``t`` should launch its Triton kernels."""
    choice = backend()
    if choice == "torch":
        return False
    runnable = t.is_cuda or _interpreter.INTERPRETING
    if choice == "triton" and not runnable:
        raise RuntimeError(
            f"{ENV_VAR}=triton but the tensor is on {t.device} and Triton's interpreter is off: "
            "move the tensors to a CUDA device, or set TRITON_INTERPRET=1 before importing kernels, "
            f"or set {ENV_VAR}=torch"
        )
    return runnable
