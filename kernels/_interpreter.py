"""Every workaround for Triton's CPU interpreter (``TRITON_INTERPRET=1``) lives in this module.

The interpreter runs each program instance sequentially with numpy, which lets the test suite
exercise the real kernels on a machine without a GPU.  It differs from compiled Triton in a few
ways, and each difference is handled here and nowhere else:

* ``INTERPRETING`` is read once, at import: Triton decides between interpreter and compiler when
  the ``@triton.jit`` decorators run, so changing the variable later has no effect on our kernels.
* The interpreter has no GPU driver, so ``triton.autotune`` with more than one config (it
  benchmarks) fails with "0 active drivers".  ``autotune`` below keeps a single config there.
* ``tl.dot`` on bfloat16 operands returns garbage in the interpreter (triton-lang/triton#11584:
  it stores bf16 as uint16 and only converts 8-bit floats for the dot).  Launchers pass
  ``DOT_F32=dot_in_fp32(dtype)`` and kernels upcast both operands to fp32 before the dot when it
  is set; on a GPU it is always False, so the compiled kernel is unchanged.
* ``constexpr * tensor`` (a ``tl.constexpr`` global on the left) yields a constexpr wrapping the
  tensor in the interpreter, and the next ``tl`` call on it fails with "cannot convert ... to
  tensor".  Module constants in ``kernels/_activations.py`` are therefore always written on the
  right of a product (``x * _C``); compiled code is identical either way.
* The interpreter converts float32 to bfloat16 by truncation (``InterpreterBuilder.cast_impl``
  passes no rounding mode), so every bf16 store could be off by one ulp where a GPU rounds to
  nearest even.  ``_patch_bf16_rounding`` replaces that one conversion with round-to-nearest-even
  so interpreted results match compiled ones.
* The interpreter cannot query the number of SMs; ``num_sms`` returns a small stand-in so grids of
  persistent-style kernels stay small (each interpreted program costs about a millisecond).
"""
from __future__ import annotations

import os

import torch

from . import _tuning

INTERPRETING: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _patch_bf16_rounding() -> None:
    """Make the interpreter's fp32 -> bf16 cast round to nearest even, as compiled Triton does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = getattr(interp, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    if original is None or getattr(original, "_pycomm_rtne", False):
        return  # a Triton without this hook, or already patched

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(src.data)
            rounded = np.where(nan, np.uint16(0x7FC0), rounded)  # keep NaN a NaN after rounding
            return interp.TensorHandle(rounded.reshape(np.shape(src.data)), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._pycomm_rtne = True
    builder.cast_impl = cast_impl
    # The create_* aliases captured the original function at class creation; repoint the ones
    # that reach fp32 -> bf16.
    builder.create_fp_trunc = lambda self, src, dst_type: self.cast_impl(src, dst_type)


if INTERPRETING:
    _patch_bf16_rounding()


def autotune(configs, key, interpreter_config, bucketed=(), shared_memory=None, keep=None):
    """``_tuning.autotune`` over ``configs`` on a GPU; over ``[interpreter_config]`` when interpreting.

    One config means the autotuner never benchmarks, which is what the driver-less interpreter
    needs.  The interpreter config should use large blocks: interpreted cost is per program.
    ``bucketed``, ``shared_memory`` and ``keep`` are passed on (see kernels/_tuning.py).
    """
    return _tuning.autotune([interpreter_config] if INTERPRETING else configs, key, bucketed=bucketed,
                            shared_memory=shared_memory, keep=keep)


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """True when kernels must upcast ``tl.dot`` operands of ``dtype`` to fp32 (interpreter bf16 bug)."""
    return INTERPRETING and dtype == torch.bfloat16


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small constant for the interpreter."""
    if device.type == "cuda" and not INTERPRETING:
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
