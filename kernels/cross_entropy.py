"""``softmax_cross_entropy(logits, target, ignore_index=-100)``: mean cross-entropy over the
targets that are not ``ignore_index``, like ``F.cross_entropy(logits, target)``.

Contract: ``logits`` is ``(..., V)`` (classes last) in float32, float16 or bfloat16; ``target`` is
an integer tensor of shape ``logits.shape[:-1]`` with values in ``[0, V)`` or ``ignore_index``
(anything else raises ValueError).  Returns a 0-d tensor in ``logits.dtype``; NaN when every
target is ignored, as torch.  The log-sum-exp of each row is computed online over blocks of the
vocabulary in fp32 (so V may be large, e.g. 128K) and saved for the backward pass.

The op computes per-row losses; the mean (sum / number of kept rows) is ordinary torch code, so
the backward kernel receives a per-row upstream gradient and writes
``dlogits = (softmax(logits) - onehot(target)) * grad_row`` without materialising the softmax
in the forward pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._dispatch import use_triton

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr, target_ptr, loss_ptr, lse_ptr, V, stride_row, ignore_index, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    # Online log-sum-exp, one running (max, sum) per lane; the lanes are merged at the end.  This
    # streams the row once however long the vocabulary is.
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # A lane that has only seen -inf (padding past V) would compute exp(-inf - -inf) = nan;
        # shifting by 0 there instead keeps it at s = 0.
        shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - m_row), 0.0), axis=0)
    lse = m_row + tl.log(s_row)
    target = tl.load(target_ptr + row)
    keep = target != ignore_index
    x_t = tl.load(base + tl.where(keep, target, 0), mask=keep, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(keep, lse - x_t, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(
    logits_ptr, target_ptr, lse_ptr, grad_ptr, dlogits_ptr, V, stride_row, stride_drow, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(target_ptr + row)
    lse = tl.load(lse_ptr + row)
    # Ignored rows get an exact zero gradient whatever the upstream gradient says.
    grad = tl.where(target != ignore_index, tl.load(grad_ptr + row).to(tl.float32), 0.0)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(logits_ptr + row * stride_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)  # softmax recomputed from the saved log-sum-exp
        d = (p - tl.where(start + cols == target, 1.0, 0.0)) * grad
        tl.store(dlogits_ptr + row * stride_drow + start + cols, d, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _block_v(V):
    return min(triton.next_power_of_2(max(V, 1)), 4096)


def _fwd(logits2, target1, ignore_index):
    M, V = logits2.shape
    loss = torch.empty(M, dtype=torch.float32, device=logits2.device)
    lse = torch.empty(M, dtype=torch.float32, device=logits2.device)
    if M:
        _cross_entropy_fwd_kernel[(M,)](
            logits2, target1, loss, lse, V, logits2.stride(0), ignore_index, BLOCK_V=_block_v(V), num_warps=8
        )
    return loss, lse


def _bwd(grad_rows, logits2, target1, lse, ignore_index):
    M, V = logits2.shape
    dlogits = torch.empty((M, V), dtype=logits2.dtype, device=logits2.device)
    if M:
        _cross_entropy_bwd_kernel[(M,)](
            logits2, target1, lse, grad_rows.contiguous(), dlogits, V, logits2.stride(0), V, ignore_index,
            BLOCK_V=_block_v(V), num_warps=8,
        )
    return dlogits


# ----------------------------------------------------------------------------------------------
# PyTorch fallback
# ----------------------------------------------------------------------------------------------


def _torch_fwd(logits2, target1, ignore_index):
    xf = logits2.float()
    lse = torch.logsumexp(xf, dim=-1)
    keep = target1 != ignore_index
    x_t = xf.gather(1, torch.where(keep, target1, 0)[:, None])[:, 0]
    return torch.where(keep, lse - x_t, 0.0), lse


def _torch_bwd(grad_rows, logits2, target1, lse, ignore_index):
    keep = target1 != ignore_index
    p = torch.exp(logits2.float() - lse[:, None])
    p[torch.arange(p.shape[0], device=p.device), torch.where(keep, target1, 0)] -= 1.0
    return (p * torch.where(keep, grad_rows.float(), 0.0)[:, None]).to(logits2.dtype)


# ----------------------------------------------------------------------------------------------
# Custom op registration
# ----------------------------------------------------------------------------------------------


def _check_targets(target1, V, ignore_index):
    bad = (target1 != ignore_index) & ((target1 < 0) | (target1 >= V))
    if bool(bad.any()):
        value = int(target1[bad][0])
        raise ValueError(
            f"target contains {value}, outside [0, {V}) and not ignore_index={ignore_index}; "
            "targets must be class indices into the last dimension of logits"
        )


@torch.library.custom_op("pycomm_kernels::cross_entropy_rows", mutates_args=())
def _cross_entropy_op(
    logits2: torch.Tensor, target1: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # Checked here, on real tensors, so the data-dependent test never reaches torch.compile's
    # tracer (the fake implementation skips it).
    _check_targets(target1, logits2.shape[1], ignore_index)
    if use_triton(logits2):
        return _fwd(logits2, target1, ignore_index)
    return _torch_fwd(logits2, target1, ignore_index)


@_cross_entropy_op.register_fake
def _(logits2, target1, ignore_index):
    M = logits2.shape[0]
    return logits2.new_empty(M, dtype=torch.float32), logits2.new_empty(M, dtype=torch.float32)


@torch.library.custom_op("pycomm_kernels::cross_entropy_rows_bwd", mutates_args=())
def _cross_entropy_bwd_op(
    grad_rows: torch.Tensor, logits2: torch.Tensor, target1: torch.Tensor, lse: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    if use_triton(logits2):
        return _bwd(grad_rows, logits2, target1, lse, ignore_index)
    return _torch_bwd(grad_rows, logits2, target1, lse, ignore_index)


@_cross_entropy_bwd_op.register_fake
def _(grad_rows, logits2, target1, lse, ignore_index):
    return logits2.new_empty(logits2.shape)


def _setup_context(ctx, inputs, output):
    logits2, target1, ignore_index = inputs
    ctx.save_for_backward(logits2, target1, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_rows, _glse):
    logits2, target1, lse = ctx.saved_tensors
    return _cross_entropy_bwd_op(grad_rows, logits2, target1, lse, ctx.ignore_index), None, None


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (classes last) against ``target`` (see module docstring)."""
    _utils.check_tensor("logits", logits, ndim_min=1)
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(
            "target must be an integer tensor of class indices (e.g. torch.long); "
            f"got {getattr(target, 'dtype', type(target).__name__)}"
        )
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target has shape {tuple(target.shape)} but logits {tuple(logits.shape)} needs "
            f"{tuple(logits.shape[:-1])} (classes are the last dimension of logits)"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits on {logits.device}; move them to one device")
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits has 0 classes in its last dimension")
    logits2 = _utils.flatten_rows(logits)
    if logits2.stride(1) != 1:
        logits2 = logits2.contiguous()
    target1 = target.reshape(-1).to(torch.int64)
    rows, _ = _cross_entropy_op(logits2, target1, int(ignore_index))
    count = (target1 != ignore_index).sum()
    return (rows.sum() / count).to(logits.dtype)
