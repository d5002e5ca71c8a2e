"""``bias_gelu(x, bias, approximate="none"|"tanh") = gelu(x + bias)``, fused.

Contract: ``x`` has shape ``(..., N)``, ``bias`` shape ``(N,)``, one dtype (float32, float16,
bfloat16) and one device.  Returns a contiguous tensor shaped like ``x``.  The sum and the GELU
are computed in fp32 and rounded once.  Backward: ``dx = g * gelu'(x + bias)`` and
``dbias = sum of dx over all leading dimensions``; the column sums are accumulated in fp32 inside
the backward kernel (one partial row per row-program), then the few partial rows are summed.

This is the epilogue of a Linear without its own matmul: unfused it costs one extra write and
read of the activation tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _activations, _interpreter, _utils
from ._dispatch import use_triton

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr, bias_ptr, out_ptr, M, N, stride_xm, stride_om,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 2-D tiles: the bias slice is loaded once per tile and reused for BLOCK_M rows.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows[:, None] < M) & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0)
    z = x.to(tl.float32) + bias.to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], _activations.apply(z, ACTIVATION), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    g_ptr, x_ptr, bias_ptr, dx_ptr, dbias_partial_ptr, M, N, stride_gm, stride_xm, stride_dxm,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Each program walks row tiles pid_m, pid_m + P, ... so the bias gradient of a whole column
    # strip is summed in registers (fp32) and written once as one partial row, instead of one
    # partial row per tile.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    num_pm = tl.num_programs(0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(pid_m, tl.cdiv(M, BLOCK_M), num_pm):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0)
        dz = g.to(tl.float32) * _activations.derivative(x.to(tl.float32) + bias[None, :], ACTIVATION)
        dz = tl.where(mask, dz, 0.0)  # padded rows must not leak into the bias sum
        tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :], dz, mask=mask)
        dbias += tl.sum(dz, axis=0)
    tl.store(dbias_partial_ptr + pid_m * N + cols, dbias, mask=col_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _tiles(M, N):
    block_n = min(triton.next_power_of_2(max(N, 1)), 256)
    # About 4096 elements a tile: enough bytes in flight per program on a GPU, few programs in
    # the interpreter.
    block_m = max(1, min(4096 // block_n, triton.next_power_of_2(max(M, 1))))
    return block_m, block_n


def _fwd(x, bias, activation):
    N = x.shape[-1]
    x2 = _utils.flatten_rows(x)
    if N > 0 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_m, block_n = _tiles(M, N)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _bias_gelu_fwd_kernel[grid](
        x2, bias, out, M, N, x2.stride(0), N, ACTIVATION=activation, BLOCK_M=block_m, BLOCK_N=block_n
    )
    return out


def _bwd(g, x, bias, activation):
    N = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return dx, torch.zeros_like(bias)
    x2 = _utils.flatten_rows(x)
    g2 = _utils.flatten_rows(g)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    g2 = g2 if g2.stride(1) == 1 else g2.contiguous()
    M = x2.shape[0]
    block_m, block_n = _tiles(M, N)
    n_row_programs = min(triton.cdiv(M, block_m), 4 * _interpreter.num_sms(x.device))
    partial = torch.empty((n_row_programs, N), dtype=torch.float32, device=x.device)
    grid = (n_row_programs, triton.cdiv(N, block_n))
    _bias_gelu_bwd_kernel[grid](
        g2, x2, bias, dx, partial, M, N, g2.stride(0), x2.stride(0), N,
        ACTIVATION=activation, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return dx, partial.sum(0).to(bias.dtype)


# ----------------------------------------------------------------------------------------------
# PyTorch fallback
# ----------------------------------------------------------------------------------------------


def _torch_fwd(x, bias, activation):
    z = x.float() + bias.float()
    return _activations.torch_apply(z, activation).to(x.dtype).contiguous()


def _torch_bwd(g, x, bias, activation):
    dz = g.float() * _activations.torch_derivative(x.float() + bias.float(), activation)
    return dz.to(x.dtype).contiguous(), _utils.flatten_rows(dz).sum(0).to(bias.dtype)


# ----------------------------------------------------------------------------------------------
# Custom op registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("pycomm_kernels::bias_gelu", mutates_args=())
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor, activation: str) -> torch.Tensor:
    return _fwd(x, bias, activation) if use_triton(x) else _torch_fwd(x, bias, activation)


@_bias_gelu_op.register_fake
def _(x, bias, activation):
    return x.new_empty(x.shape)


@torch.library.custom_op("pycomm_kernels::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd_op(
    g: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _bwd(g, x, bias, activation) if use_triton(x) else _torch_bwd(g, x, bias, activation)


@_bias_gelu_bwd_op.register_fake
def _(g, x, bias, activation):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, bias, activation = inputs
    ctx.save_for_backward(x, bias)
    ctx.activation = activation


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    dx, dbias = _bias_gelu_bwd_op(grad, x, bias, ctx.activation)
    return dx, dbias, None


_bias_gelu_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

_APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(x + bias)`` like ``F.gelu(x + bias, approximate=approximate)``, fused."""
    _utils.check_tensor("x", x, ndim_min=1)
    _utils.check_tensor("bias", bias)
    _utils.check_same(("x", "bias"), (x, bias))
    if bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
        raise ValueError(
            f"bias must have shape ({x.shape[-1]},) to match the last dimension of x {tuple(x.shape)}, "
            f"got {tuple(bias.shape)}"
        )
    if approximate not in _APPROXIMATE:
        raise ValueError(f"approximate must be 'none' or 'tanh' (as in F.gelu), got {approximate!r}")
    return _bias_gelu_op(x, bias, _APPROXIMATE[approximate])
