"""The rules that decide what runs an op: its Triton kernels or the PyTorch fallback, and which
family of Triton kernels (the portable one or a Hopper-native variant).

``PYCOMM_KERNELS_BACKEND`` (read at every call, so it can be changed at run time):

* ``auto`` (default): Triton when the inputs are on a CUDA device, or when Triton's interpreter is
  active (``TRITON_INTERPRET=1`` set before ``kernels`` was imported); PyTorch otherwise, so a
  laptop without a GPU gets correct results from plain PyTorch.
* ``triton``: always Triton.  CPU tensors then need the interpreter; without it this raises.
* ``torch``: always the PyTorch fallback (useful to compare, or to debug a model).

``PYCOMM_KERNEL_VARIANT`` (read at every call) picks among the Triton kernel families of an op
that has several (matmul: ``matmul_tma``; attention: ``flash_attention_tma``):

* ``auto`` (default): on a GPU, the first call of each autotune bucket (the op's bucketed key)
  times every family that can take the call, each after its own autotuning, with
  ``triton.testing.do_bench``, and the bucket keeps the fastest -- the autotuner's rule one level
  up.  Under the interpreter (no timer) and during CUDA graph capture the portable family runs.
* ``portable``: always the portable (pointer-arithmetic) kernels.
* ``hopper``: the Hopper-native family wherever it can take the call (sm_90 or newer, a Triton
  with tensor descriptors, TMA-addressable operands); the portable one elsewhere.

``use_variant(name)`` does the same as the variable inside a ``with`` block (it wins over the
variable); ``variant_choices()`` shows what each bucket chose and what it measured.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
import triton
import triton.language as tl

from . import _interpreter

ENV_VAR = "PYCOMM_KERNELS_BACKEND"
_CHOICES = ("auto", "triton", "torch")
VARIANT_ENV_VAR = "PYCOMM_KERNEL_VARIANT"
_VARIANTS = ("auto", "portable", "hopper")
PORTABLE, HOPPER = "portable", "hopper"


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


_override: list[str] = []


@contextlib.contextmanager
def use_variant(name: str) -> Iterator[None]:
    """Run the ops inside the block with kernel family ``name`` (``auto``, ``portable`` or ``hopper``)."""
    if name not in _VARIANTS:
        raise ValueError(f"use_variant({name!r}): pick one of {_VARIANTS}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def variant() -> str:
    """The configured kernel family: ``auto``, ``portable`` or ``hopper``."""
    if _override:
        return _override[-1]
    value = os.environ.get(VARIANT_ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _VARIANTS:
        raise ValueError(f"{VARIANT_ENV_VAR}={value!r} is not one of {_VARIANTS}; unset it or pick one of those")
    return value


def hopper_capable(t: torch.Tensor) -> bool:
    """Whether the Hopper-native family can run on ``t``'s device at all: a Triton with tensor
    descriptors, and sm_90 or newer (or the interpreter, which runs descriptors on the CPU)."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    if _interpreter.INTERPRETING:
        return True
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def _time(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40)


class VariantTuner:
    """Per bucketed key, which of an op's kernel families runs (see the module docstring).

    ``run(key, candidates)`` takes the families that can take this call, ``{name: launch}``, the
    portable one first; each ``launch()`` writes the op's outputs (so running it again is harmless)
    and returns its result.
    """

    def __init__(self, op: str, timer: Callable[[Callable[[], object]], float] = _time):
        self.op = op
        self.timer = timer
        self.choice: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}
        _TUNERS[op] = self

    def run(self, key: tuple, candidates: dict[str, Callable[[], object]]):
        names = list(candidates)
        key = (*key, *names)  # a bucket where only the portable family fits is a bucket of its own
        wanted = variant()
        if wanted != "auto":
            return candidates[wanted if wanted in candidates else names[0]]()
        if len(names) == 1:
            return candidates[names[0]]()
        chosen = self.choice.get(key)
        if chosen is None:
            if _interpreter.INTERPRETING or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
                return candidates[names[0]]()  # nothing to time with: the portable family
            self.timings[key] = {name: self.timer(launch) for name, launch in candidates.items()}
            chosen = self.choice[key] = min(self.timings[key], key=self.timings[key].__getitem__)
        return candidates[chosen]()


_TUNERS: dict[str, VariantTuner] = {}


def variant_choices() -> dict[str, list[dict]]:
    """What each op's buckets chose on this process's GPU: ``{op: [{"key", "variant", "ms"}]}``."""
    return {op: [{"key": key, "variant": name, "ms": t.timings.get(key, {})} for key, name in t.choice.items()]
            for op, t in _TUNERS.items()}
