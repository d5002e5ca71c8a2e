"""torch's dtypes and reduce ops as pycomm._C's codes, which _C exports by name.

``reduce_op(fn, op, dtype)`` turns a string or a ``torch.distributed.ReduceOp`` into an
:class:`Op`, checking that it applies to the dtype; errors say what to use instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pycomm import _C

DTYPES: dict[torch.dtype, int] = {getattr(torch, name): code for name, code in _C.DTYPES.items()}
"""the dtypes pycomm moves as themselves"""
HALF = (torch.float16, torch.bfloat16)
"""moved as themselves, reduced in float32 (upcast once, round once)"""
COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}
"""moved and summed as their real views (pairs of floats)"""
COLLECTIVES: dict[str, int] = dict(_C.COLLECTIVES)
ALGORITHMS: dict[str, int] = dict(_C.ALGORITHMS)
SUPPORTED = ", ".join(str(t).removeprefix("torch.") for t in [*DTYPES, *COMPLEX])

_INTEGER = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool}


@dataclass(frozen=True)
class Op:
    """A reduction: its name and its code in _C (avg travels as avg, is reduced as a sum,
    and the result is divided by the group size)."""

    name: str
    code: int

    @property
    def avg(self) -> bool:
        return self.name == "avg"


OPS: dict[str, Op] = {name: Op(name, code) for name, code in _C.OPS.items() if name != "none"}
NONE = Op("none", _C.OPS["none"])
_TORCH_NAMES = {"product": "prod", "premul_sum": "premul_sum"}


def _name(op) -> str:
    if isinstance(op, str):
        return op.lower()
    # torch.distributed.ReduceOp.SUM and friends (RedOpType members, or a ReduceOp wrapping
    # one) all print as "...SUM".
    name = str(getattr(op, "op", op)).rsplit(".", 1)[-1].lower()
    return _TORCH_NAMES.get(name, name)


def reduce_op(fn: str, op, dtype: torch.dtype) -> Op:
    """The Op for `op` on tensors of `dtype`, or ValueError/TypeError saying what to do."""
    o = OPS.get(op) if isinstance(op, str) else None
    if o is None:
        name = _name(op)
        o = OPS.get(name)
        if o is None:
            raise ValueError(
                f"pycomm.{fn}: unknown reduce op {op!r}: use one of 'sum', 'avg', 'prod', 'min', "
                "'max', 'band', 'bor', 'bxor' (or the matching torch.distributed.ReduceOp)")
    if o.avg and not (dtype.is_floating_point or dtype in COMPLEX):
        raise TypeError(f"pycomm.{fn}: op='avg' needs a floating-point tensor, not {dtype}; "
                        "use op='sum' and divide")
    if o.name in ("band", "bor", "bxor") and dtype not in _INTEGER:
        raise TypeError(f"pycomm.{fn}: op={o.name!r} is bitwise and needs an integer or bool "
                        f"tensor, not {dtype}")
    if dtype in COMPLEX and o.name not in ("sum", "avg"):
        raise TypeError(f"pycomm.{fn}: complex tensors can be reduced with 'sum' or 'avg' only, "
                        f"not {o.name!r}")
    return o
