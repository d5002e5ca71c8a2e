"""Shared host-side helpers: input validation with actionable messages, and launch sizing."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Longest row a row-wise kernel holds in registers at once (like Liger's limit: 64 KiB of fp32
# would spill; longer rows belong in a looped kernel, which norms over hidden sizes never need).
MAX_ROW = 65536


def check_tensor(name: str, t, *, ndim_min: int = 0) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; kernels support float32, float16 and bfloat16 "
            f"(convert with {name}.float() or {name}.to(torch.bfloat16))"
        )
    if t.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimension(s), got shape {tuple(t.shape)}")


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor | None]) -> None:
    """All given (non-None) tensors share dtype and device; otherwise say which differs."""
    pairs = [(n, t) for n, t in zip(names, tensors) if t is not None]
    n0, t0 = pairs[0]
    for n, t in pairs[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {n0} has {t0.dtype}; cast them to one dtype")
        if t.device != t0.device:
            raise ValueError(f"{n} is on {t.device} but {n0} is on {t0.device}; move them to one device")


def check_row_width(name: str, n: int) -> None:
    if n > MAX_ROW:
        raise ValueError(
            f"{name} has {n} features in its last dimension; the Triton row kernels take at most "
            f"{MAX_ROW}. Use PYCOMM_KERNELS_BACKEND=torch for such shapes"
        )


def row_settings(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that keeps one row of ``n`` elements in registers."""
    block = triton.next_power_of_2(max(n, 1))
    # More warps for longer rows so each thread holds a bounded number of elements.
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16
    return block, num_warps


def prod(shape: Sequence[int]) -> int:
    return math.prod(shape)


def broadcast_layout(shape: Sequence[int], tensors: Sequence[torch.Tensor], max_dims: int = 4):
    """Describe each tensor broadcast to ``shape`` as (sizes, [strides per tensor]) in at most
    ``max_dims`` dimensions, so an elementwise kernel can read broadcast and non-contiguous
    inputs in place (stride 0 on a broadcast dimension) instead of materialising copies.

    Size-1 dimensions are dropped and neighbouring dimensions merged wherever every tensor
    allows it.  Returns None when more than ``max_dims`` dimensions remain; the caller then
    materialises contiguous copies and treats the data as one flat dimension.
    """
    strides_in = [list(t.expand(shape).stride()) for t in tensors]
    sizes: list[int] = []
    strides: list[list[int]] = [[] for _ in tensors]
    for i, s in enumerate(shape):
        if s == 1:
            continue
        # Merge dim i into the previous kept dim when, for every tensor, stepping the outer dim
        # equals stepping the inner one `s` times.
        if sizes and all(st[-1] == src[i] * s for st, src in zip(strides, strides_in)):
            sizes[-1] *= s
            for st, src in zip(strides, strides_in):
                st[-1] = src[i]
        else:
            sizes.append(s)
            for st, src in zip(strides, strides_in):
                st.append(src[i])
    if len(sizes) > max_dims:
        return None
    pad = max_dims - len(sizes)
    return [1] * pad + sizes, [[0] * pad + st for st in strides]


def flatten_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D (rows, last dim) tensor; unlike ``reshape(-1, N)`` this also works for N == 0."""
    return t.reshape(prod(t.shape[:-1]), t.shape[-1])


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``, following torch's own choice:
    float32 products are IEEE unless ``torch.backends.cuda.matmul.allow_tf32`` is set."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"  # ignored for 16-bit operands; "tf32" is Triton's default


def _descriptor_alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def descriptor_scratch(t: torch.Tensor) -> None:
    """Before launching kernels that build tensor descriptors on the device (the Hopper family):
    they need scratch memory from Triton's allocator, which is set here for CUDA tensors."""
    if t.is_cuda:
        triton.set_allocator(_descriptor_alloc)
