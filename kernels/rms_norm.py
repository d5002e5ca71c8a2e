"""``rms_norm(x, weight, eps=1e-6) = x / sqrt(mean(x**2, -1) + eps) * weight``.

Contract: ``x`` has shape ``(..., N)`` with ``N <= 65536``; ``weight`` is ``(N,)`` or None (no
scale); one dtype (float32, float16, bfloat16) and device.  Statistics are computed in fp32; the
per-row reciprocal RMS (fp32) is saved for the backward pass, which recomputes the normalised
row instead of saving it.  The result is contiguous with ``x``'s shape and dtype.

The kernels here also serve ``add_rms_norm`` (``HAS_RESIDUAL``): the residual add is fused into
the same pass, so ``x + residual`` is read and written once.

Backward: ``dx = rstd * (g*w - xhat * mean(g*w*xhat))`` per row, and ``dw = sum over rows of
g * xhat``, which each program accumulates in fp32 over its rows and writes as one partial row;
the few partial rows are summed at the end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _interpreter, _utils
from ._dispatch import use_triton

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr, N,
    stride_x, stride_r, stride_y, stride_h, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per row: the whole row stays in registers between the reduction and the scale.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
        # Normalise the rounded sum we return, so y == rms_norm(h) holds exactly as documented.
        x = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, x * rstd * w, mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    gy_ptr, gh_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, M, N,
    stride_gy, stride_gh, stride_x, stride_dx,
    HAS_DRES: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # A fixed number of programs stride over the rows so each accumulates dw for many rows in
    # registers and writes a single fp32 partial row (no atomics, deterministic).
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row in range(pid, M, tl.num_programs(0)):
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + row * stride_gy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd  # recomputed, not saved by the forward
        wg = gy * w
        dx = (wg - xhat * (tl.sum(xhat * wg, axis=0) / N)) * rstd
        if HAS_DRES:
            # add_rms_norm also returns h = x + residual; its gradient adds straight through.
            dx += tl.load(gh_ptr + row * stride_gh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * stride_dx + cols, dx, mask=mask)
        dw += gy * xhat
    tl.store(dw_partial_ptr + pid * N + cols, dw, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers (shared with add_rms_norm)
# ----------------------------------------------------------------------------------------------


def _rows(t, N):
    t2 = _utils.flatten_rows(t)
    return t2 if (N == 0 or t2.stride(1) == 1) else t2.contiguous()


def _fwd(x, residual: torch.Tensor | None, weight, eps):
    """Returns (y, h or None, rstd); h = x + residual when a residual is given."""
    N = x.shape[-1]
    x2 = _rows(x, N)
    M = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        if N == 0:
            rstd.fill_(eps ** -0.5)  # mean of an empty row is 0, as torch computes it
        return y, h, rstd
    r2 = _rows(residual, N) if residual is not None else x2
    h_arg = h if h is not None else y  # unused when HAS_RESIDUAL is False
    block, num_warps = _utils.row_settings(N)
    _rms_norm_fwd_kernel[(M,)](
        x2, r2, weight, y, h_arg, rstd, N, x2.stride(0), r2.stride(0), N, N, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block, num_warps=num_warps,
    )
    return y, h, rstd


def _bwd(gy, gh: torch.Tensor | None, x, weight, rstd):
    """(dx, dw) where x is the tensor that was normalised (h for add_rms_norm)."""
    N = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return dx, torch.zeros_like(weight)
    x2, gy2 = _rows(x, N), _rows(gy, N)
    gh2 = _rows(gh, N) if gh is not None else gy2
    M = x2.shape[0]
    n_programs = min(M, 4 * _interpreter.num_sms(x.device))
    partial = torch.empty((n_programs, N), dtype=torch.float32, device=x.device)
    block, num_warps = _utils.row_settings(N)
    _rms_norm_bwd_kernel[(n_programs,)](
        gy2, gh2, x2, weight, rstd, dx, partial, M, N, gy2.stride(0), gh2.stride(0), x2.stride(0), N,
        HAS_DRES=gh is not None, BLOCK_N=block, num_warps=num_warps,
    )
    return dx, partial.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# PyTorch fallback (shared with add_rms_norm)
# ----------------------------------------------------------------------------------------------


def _torch_fwd(x, residual, weight, eps):
    h = (x.float() + residual.float()).to(x.dtype) if residual is not None else None
    xf = (h if h is not None else x).float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    y = (xf * rstd[..., None] * weight.float()).to(x.dtype).contiguous()
    return y, (h.contiguous() if h is not None else None), rstd


def _torch_bwd(gy, gh, x, weight, rstd):
    xhat = x.float() * rstd[..., None]
    wg = gy.float() * weight.float()
    dx = (wg - xhat * (xhat * wg).mean(-1, keepdim=True)) * rstd[..., None]
    if gh is not None:
        dx = dx + gh.float()
    dw = _utils.flatten_rows(gy.float() * xhat).sum(0)
    return dx.to(x.dtype).contiguous(), dw.to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# Custom op registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("pycomm_kernels::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _fwd(x, None, weight, eps) if use_triton(x) else _torch_fwd(x, None, weight, eps)
    return y, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("pycomm_kernels::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(
    gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _bwd(gy, None, x, weight, rstd) if use_triton(x) else _torch_bwd(gy, None, x, weight, rstd)


@_rms_norm_bwd_op.register_fake
def _(gy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, gy, _grstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd_op(gy, x, weight, rstd)
    return dx, dw, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def _check(x, weight, names=("x", "weight")):
    _utils.check_tensor(names[0], x, ndim_min=1)
    if weight is not None:
        _utils.check_tensor(names[1], weight)
        _utils.check_same(names, (x, weight))
        if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(
                f"{names[1]} must have shape ({x.shape[-1]},) to match the last dimension of "
                f"{names[0]} {tuple(x.shape)}, got {tuple(weight.shape)}"
            )
    _utils.check_row_width(names[0], x.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """RMS-normalise the last dimension of ``x`` and scale by ``weight`` (see module docstring)."""
    _check(x, weight)
    if weight is None:
        weight = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    return _rms_norm_op(x, weight, float(eps))[0]
