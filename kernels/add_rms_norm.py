"""``add_rms_norm(x, residual, weight, eps=1e-6) -> (rms_norm(x + residual), x + residual)``.

The pre-norm transformer step "add the residual stream, then normalise it" in one pass: the sum
is written once (it is the next residual) and normalised while still in registers.  Contract as
for ``rms_norm``, with ``residual`` shaped, typed and placed like ``x``.  The returned sum is
rounded to the input dtype and the normalisation is applied to that rounded sum, so the pair is
exactly ``(rms_norm(h), h)``.  Kernels and launchers live in ``kernels/rms_norm.py``
(``HAS_RESIDUAL`` / ``HAS_DRES``).
"""
from __future__ import annotations

import torch

from . import _utils
from ._dispatch import use_triton
from .rms_norm import _bwd, _check, _fwd, _torch_bwd, _torch_fwd


@torch.library.custom_op("pycomm_kernels::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd(x, residual, weight, eps) if use_triton(x) else _torch_fwd(x, residual, weight, eps)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("pycomm_kernels::add_rms_norm_bwd", mutates_args=())
def _add_rms_norm_bwd_op(
    gy: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _bwd(gy, gh, h, weight, rstd) if use_triton(h) else _torch_bwd(gy, gh, h, weight, rstd)


@_add_rms_norm_bwd_op.register_fake
def _(gy, gh, h, weight, rstd):
    return h.new_empty(h.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    _, _, weight, _ = inputs
    _, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _backward(ctx, gy, gh, _grstd):
    h, weight, rstd = ctx.saved_tensors
    if gy is None:
        gy = torch.zeros_like(h)
    if gh is None:
        gh = torch.zeros_like(h)
    dh, dw = _add_rms_norm_bwd_op(gy, gh, h, weight, rstd)
    # h = x + residual, so both receive dh.
    return dh, dh, dw, None


_add_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual, weight, eps), x + residual)`` in one pass."""
    _check(x, weight)
    _utils.check_tensor("residual", residual)
    _utils.check_same(("x", "residual"), (x, residual))
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must have the shape of x {tuple(x.shape)}")
    if weight is None:
        weight = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    y, h, _ = _add_rms_norm_op(x, residual, weight, float(eps))
    return y, h
