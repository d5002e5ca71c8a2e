"""The dtype a patched module computes in: the one the op it replaces would use.

One rule for every module ``kernels.patch`` swaps (and ``kernels.nn.Linear``): under autocast a
matmul-like op (``F.linear``, attention) casts its inputs to autocast's dtype, exactly as torch's
autocast does for ``linear``/``scaled_dot_product_attention``; an elementwise op (norms, rope)
promotes mixed inputs as eager PyTorch would.  ``None`` means "not a dtype the kernels take"
(float64, integers): the caller then runs the original torch code.
"""
from __future__ import annotations

import torch

from ._utils import SUPPORTED_DTYPES


def matmul_dtype(x: torch.Tensor, *params: torch.Tensor | None) -> torch.dtype | None:
    """dtype ``F.linear(x, *params)`` computes in, or None for the torch path."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        if x.dtype not in SUPPORTED_DTYPES or any(p is not None and p.dtype not in SUPPORTED_DTYPES for p in params):
            return None  # autocast leaves float64 alone
    else:
        dt = x.dtype
        if any(p is not None and p.dtype != dt for p in params):
            return None  # torch raises its own dtype error for this; let it
    return dt if dt in SUPPORTED_DTYPES else None


def promoted_dtype(*tensors: torch.Tensor | None) -> torch.dtype | None:
    """dtype an elementwise torch expression over ``tensors`` produces, or None for the torch path."""
    dt = None
    for t in tensors:
        if t is not None:
            dt = t.dtype if dt is None else torch.promote_types(dt, t.dtype)
    return dt if dt in SUPPORTED_DTYPES else None


def cast(dt: torch.dtype, *tensors: torch.Tensor | None):
    """``tensors`` in ``dt`` (no copy when already there; None stays None)."""
    return tuple(None if t is None else t.to(dt) for t in tensors)
