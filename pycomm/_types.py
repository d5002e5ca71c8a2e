"""Mapping between torch's dtypes and reduce ops and the codes of pycomm._C (csrc/common.h)."""
from __future__ import annotations

import torch

# csrc/common.h: enum class DType
DTYPE_CODES = {
    torch.uint8: 0,
    torch.int32: 1,
    torch.int64: 2,
    torch.float32: 3,
    torch.float64: 4,
    torch.float16: 5,
    torch.bfloat16: 6,
}
# Half types travel as themselves but are reduced in float32 (see collectives.py).
HALF_TYPES = (torch.float16, torch.bfloat16)
SUPPORTED = ", ".join(str(t).removeprefix("torch.") for t in DTYPE_CODES)

# csrc/common.h: enum class RedOp.  "avg" is a sum followed by a division.
OPS = {"sum": 0, "prod": 1, "min": 2, "max": 3, "avg": 0}
ALGORITHMS = {"ring": 0, "tree": 1}


def reduce_op_name(op) -> str:
    """'sum' | 'avg' | 'prod' | 'min' | 'max' from a string or a torch.distributed.ReduceOp."""
    if isinstance(op, str):
        name = op.lower()
    else:
        # torch.distributed.ReduceOp.SUM and friends (RedOpType members, or a ReduceOp
        # wrapping one) all print as "...SUM".
        name = str(getattr(op, "op", op)).rsplit(".", 1)[-1].lower()
        name = {"product": "prod"}.get(name, name)
    if name not in OPS:
        raise ValueError(
            f"unknown reduce op {op!r}: use one of 'sum', 'avg', 'prod', 'min', 'max' "
            "(or the matching torch.distributed.ReduceOp)"
        )
    return name
