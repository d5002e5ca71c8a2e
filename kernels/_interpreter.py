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
* The interpreter cannot query the number of SMs; ``num_sms`` returns a small stand-in so grids of
  persistent-style kernels stay small (each interpreted program costs about a millisecond).
"""
from __future__ import annotations

import os

import torch
import triton

INTERPRETING: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune(configs, key, interpreter_config):
    """``triton.autotune`` over ``configs`` on a GPU; over ``[interpreter_config]`` when interpreting.

    One config means the autotuner never benchmarks, which is what the driver-less interpreter
    needs.  The interpreter config should use large blocks: interpreted cost is per program.
    """
    if INTERPRETING:
        return triton.autotune(configs=[interpreter_config], key=key)
    return triton.autotune(configs=configs, key=key)


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """True when kernels must upcast ``tl.dot`` operands of ``dtype`` to fp32 (interpreter bf16 bug)."""
    return INTERPRETING and dtype == torch.bfloat16


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small constant for the interpreter."""
    if device.type == "cuda" and not INTERPRETING:
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
