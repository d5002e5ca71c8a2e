"""Tensor-parallel communication as autograd functions (Megatron's ``mappings.py`` shape).

Three levels: private tensor helpers (``_reduce``, ``_split_last``, ``_gather_last``), private
autograd pairs whose backward is the conjugate of their forward, and one-line public functions.
Every helper returns its input untouched when the group has one rank, so tp=1 costs nothing.

The conjugate pair f/g of Megatron's MLP (Shoeybi et al., 2019):

* ``copy_to_tensor_parallel`` (f): identity forward, all-reduce backward.  Placed where a
  replicated activation enters column-parallel layers: each rank's shard only sees its part of
  the input gradient, the sum over ranks is the true one.
* ``reduce_from_tensor_parallel`` (g): all-reduce forward, identity backward.  Placed after
  row-parallel layers: each rank holds a partial sum of the output.

``scatter_to_tensor_parallel`` / ``gather_from_tensor_parallel`` split and gather along the last
dimension (conjugates of each other).  All tensors are CPU tensors; results are new tensors
(pycomm reduces in place, so the helpers copy first and never modify autograd inputs).
"""
from __future__ import annotations

import torch

import pycomm
from pycomm.distributed import Group

from .mesh import default_group

__all__ = [
    "copy_to_tensor_parallel",
    "reduce_from_tensor_parallel",
    "scatter_to_tensor_parallel",
    "gather_from_tensor_parallel",
    "resolve_tp_group",
]


def resolve_tp_group(group: Group | None) -> Group:
    return default_group("tp") if group is None else group


# ------------------------------------------------------------------------- tensor helpers


def _reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group.size == 1:
        return x
    out = x.contiguous().clone()
    pycomm.all_reduce(out, op="sum", group=group)
    return out


def _split_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group.size == 1:
        return x
    n = x.shape[-1]
    if n % group.size:
        raise ValueError(
            f"cannot split the last dimension ({n}) of a {tuple(x.shape)} tensor over "
            f"{group.size} tensor-parallel ranks; make it a multiple of {group.size}"
        )
    return x.chunk(group.size, dim=-1)[group.rank].contiguous()


def _gather_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group.size == 1:
        return x
    x = x.contiguous()
    flat = torch.empty(group.size * x.numel(), dtype=x.dtype)
    pycomm.all_gather(flat, x.view(-1), group=group)
    # flat is [rank][...x.shape]: move the rank axis next to the last dimension.
    parts = flat.view(group.size, *x.shape)
    return torch.cat(parts.unbind(0), dim=-1)


# ------------------------------------------------------------------------- autograd pairs


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _reduce(x, group) if group.size > 1 else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group) if group.size > 1 else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group) if group.size > 1 else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


# ------------------------------------------------------------------------- public functions


def copy_to_tensor_parallel(x: torch.Tensor, group: Group | None = None) -> torch.Tensor:
    """f: identity forward, all-reduce of the gradient backward."""
    return _CopyToTP.apply(x, resolve_tp_group(group))


def reduce_from_tensor_parallel(x: torch.Tensor, group: Group | None = None) -> torch.Tensor:
    """g: all-reduce forward, identity backward."""
    return _ReduceFromTP.apply(x, resolve_tp_group(group))


def scatter_to_tensor_parallel(x: torch.Tensor, group: Group | None = None) -> torch.Tensor:
    """This rank's chunk of the last dimension forward; all-gather of the gradient backward."""
    return _ScatterToTP.apply(x, resolve_tp_group(group))


def gather_from_tensor_parallel(x: torch.Tensor, group: Group | None = None) -> torch.Tensor:
    """All-gather along the last dimension forward; this rank's chunk of the gradient backward."""
    return _GatherFromTP.apply(x, resolve_tp_group(group))
