"""``layer_norm(x, weight, bias, eps=1e-5)``, like ``F.layer_norm`` over the last dimension.

Contract: ``x`` is ``(..., N)`` with ``N <= 65536``; ``weight`` and ``bias`` are ``(N,)`` or None;
one dtype (float32, float16, bfloat16) and device.  Mean and variance (biased, as torch) are
computed in fp32; per-row mean and reciprocal std (fp32) are saved for the backward pass, which
recomputes the normalised row.  Result contiguous, shaped and typed like ``x``.

Backward per row: ``dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat))``; ``dw = sum g*xhat``
and ``db = sum g`` over rows, accumulated in fp32 per program and reduced from a few partial rows.
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
def _layer_norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, N, stride_x, stride_y, eps, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    # Two-pass variance on the register-resident row: no E[x^2]-E[x]^2 cancellation.
    diff = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / N + eps)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, diff * rstd * w + b, mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    gy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr, M, N,
    stride_gy, stride_x, stride_dx, BLOCK_N: tl.constexpr,
):
    # Programs stride over rows and keep dw/db partial sums in fp32 registers (see rms_norm).
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row in range(pid, M, tl.num_programs(0)):
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + row * stride_gy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        wg = gy * w
        c1 = tl.sum(xhat * wg, axis=0) / N
        c2 = tl.sum(wg, axis=0) / N
        dx = (wg - c2 - xhat * c1) * rstd
        tl.store(dx_ptr + row * stride_dx + cols, dx, mask=mask)
        dw += gy * xhat
        db += gy
    tl.store(dw_partial_ptr + pid * N + cols, dw, mask=mask)
    tl.store(db_partial_ptr + pid * N + cols, db, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _rows(t, N):
    t2 = _utils.flatten_rows(t)
    return t2 if (N == 0 or t2.stride(1) == 1) else t2.contiguous()


def _fwd(x, weight, bias, eps):
    N = x.shape[-1]
    x2 = _rows(x, N)
    M = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, mean.fill_(float("nan")), rstd.fill_(float("nan"))
    block, num_warps = _utils.row_settings(N)
    _layer_norm_fwd_kernel[(M,)](
        x2, weight, bias, y, mean, rstd, N, x2.stride(0), N, eps, BLOCK_N=block, num_warps=num_warps
    )
    return y, mean, rstd


def _bwd(gy, x, weight, mean, rstd):
    N = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(weight)
    x2, gy2 = _rows(x, N), _rows(gy, N)
    M = x2.shape[0]
    n_programs = min(M, 4 * _interpreter.num_sms(x.device))
    dw_partial = torch.empty((n_programs, N), dtype=torch.float32, device=x.device)
    db_partial = torch.empty((n_programs, N), dtype=torch.float32, device=x.device)
    block, num_warps = _utils.row_settings(N)
    _layer_norm_bwd_kernel[(n_programs,)](
        gy2, x2, weight, mean, rstd, dx, dw_partial, db_partial, M, N, gy2.stride(0), x2.stride(0), N,
        BLOCK_N=block, num_warps=num_warps,
    )
    return dx, dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# PyTorch fallback
# ----------------------------------------------------------------------------------------------


def _torch_fwd(x, weight, bias, eps):
    xf = x.float()
    mean = xf.mean(-1)
    rstd = torch.rsqrt(xf.var(-1, unbiased=False) + eps)
    y = (xf - mean[..., None]) * rstd[..., None] * weight.float() + bias.float()
    return y.to(x.dtype).contiguous(), mean, rstd


def _torch_bwd(gy, x, weight, mean, rstd):
    xhat = (x.float() - mean[..., None]) * rstd[..., None]
    g = gy.float()
    wg = g * weight.float()
    dx = (wg - wg.mean(-1, keepdim=True) - xhat * (xhat * wg).mean(-1, keepdim=True)) * rstd[..., None]
    dw = _utils.flatten_rows(g * xhat).sum(0)
    db = _utils.flatten_rows(g).sum(0)
    return dx.to(x.dtype).contiguous(), dw.to(weight.dtype), db.to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# Custom op registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("pycomm_kernels::layer_norm", mutates_args=())
def _layer_norm_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd(x, weight, bias, eps) if use_triton(x) else _torch_fwd(x, weight, bias, eps)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    stats = x.shape[:-1]
    return x.new_empty(x.shape), x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)


@torch.library.custom_op("pycomm_kernels::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(
    gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(gy, x, weight, mean, rstd) if use_triton(x) else _torch_bwd(gy, x, weight, mean, rstd)


@_layer_norm_bwd_op.register_fake
def _(gy, x, weight, mean, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, gy, _gmean, _grstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd_op(gy, x, weight, mean, rstd)
    return dx, dw, db, None


_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """Layer-normalise the last dimension of ``x`` (see the module docstring)."""
    _utils.check_tensor("x", x, ndim_min=1)
    N = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _utils.check_tensor(name, p)
            _utils.check_same(("x", name), (x, p))
            if p.dim() != 1 or p.shape[0] != N:
                raise ValueError(
                    f"{name} must have shape ({N},) to match the last dimension of x {tuple(x.shape)}, "
                    f"got {tuple(p.shape)}"
                )
    _utils.check_row_width("x", N)
    # Missing affine parameters become constants; their gradients are simply not returned.
    if weight is None:
        weight = torch.ones(N, dtype=x.dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(N, dtype=x.dtype, device=x.device)
    return _layer_norm_op(x, weight, bias, float(eps))[0]
