"""``fused_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100,
label_smoothing=0.0, reduction="mean", softcap=None)``: the LM head and its cross-entropy loss in
one op that never holds the full (tokens x vocab) logits.

Contract: ``hidden`` is ``(..., H)``, ``weight`` ``(V, H)``, ``bias`` ``(V,)`` or None (one dtype:
float32, float16 or bfloat16, one device); ``target`` an integer tensor of shape
``hidden.shape[:-1]`` with values in ``[0, V)`` or ``ignore_index``.  The result equals
``F.cross_entropy(softcap(hidden @ weight.T + bias).float(), target, ignore_index=...,
label_smoothing=..., reduction=...)`` with ``softcap(x) = c * tanh(x / c)`` (Gemma-2's final logit
softcapping; applied in fp32 here).  ``reduction`` is ``"mean"`` (over non-ignored targets; NaN
when all are ignored, as torch), ``"sum"`` or ``"none"`` (per-token losses of shape
``hidden.shape[:-1]``, 0 at ignored targets).  The loss is float32.

How (Liger-Kernel's FLCE): the tokens are processed in chunks of ``C`` rows, with ``C`` chosen so
a chunk's logits (``C x V``) are about as large as ``hidden`` itself.  Per chunk: the logits
GEMM (torch/cuBLAS: a Triton GEMM would only race it), then one row kernel that computes the loss
and overwrites the logits *in place* with d loss / d logits, then two GEMMs that turn those into
this chunk's rows of ``d hidden`` and its contribution to ``d weight`` (accumulated in fp32).  So
with ``reduction`` mean or sum the gradients are complete when the forward returns, and the
backward only multiplies them, in place, by the upstream scalar (so a second backward through
the same graph with ``retain_graph=True`` raises autograd's in-place error).  With ``reduction="none"`` the upstream
gradient differs per token, so the forward computes losses only and the backward re-runs the
chunks with the per-token gradients (the logits are recomputed, never stored).

Peak extra memory is one chunk of logits plus the fp32 ``d weight`` accumulator, instead of the
``N x V`` logits, their fp32 copy and their gradient.  The CPU fallback runs the same chunk loop
with torch row math, so the saving is real without a GPU (``python -m bench kernels`` measures it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from . import _interpreter, _utils
from ._activations import _tanh
from ._dispatch import use_triton
from .cross_entropy import _check_targets

REDUCTIONS = ("mean", "sum", "none")

# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _flce_rows_kernel(
    logits_ptr, target_ptr, loss_ptr, scale_ptr, s_scale, V, stride_row, ignore_index, eps, softcap,
    BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr, GRAD: tl.constexpr,
):
    # One program per token row.  Pass 1 streams the row once for the online log-sum-exp (and
    # the sum of logits that label smoothing needs); pass 2 recomputes the softmax from the
    # log-sum-exp and writes the gradient over the logits it read, so no second (C x V) buffer
    # exists.  SOFTCAP and GRAD are compile-time: the plain variant has no tanh in its loop, and
    # evaluation (no grad) compiles without pass 2.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(target_ptr + row)
    keep = target != ignore_index
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    total = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            x = _tanh(x / softcap) * softcap
        total += tl.where(mask, x, 0.0)
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, x)
        shift = tl.where(m_new > float("-inf"), m_new, 0.0)  # lanes that saw only padding stay at 0
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - m_row), 0.0), axis=0))
    x_t = tl.load(base + tl.where(keep, target, 0)).to(tl.float32)
    if SOFTCAP:
        x_t = _tanh(x_t / softcap) * softcap
    # Label smoothing: (1 - eps) * CE(onehot) + eps * CE(uniform) = lse - (1-eps) x_t - eps mean(x).
    loss = lse - (1.0 - eps) * x_t - eps * tl.sum(total, axis=0) / V
    tl.store(loss_ptr + row, tl.where(keep, loss, 0.0))
    if GRAD:
        g = tl.where(keep, tl.load(scale_ptr + row * s_scale).to(tl.float32), 0.0)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                t = _tanh(x / softcap)
                x = t * softcap
            d = tl.exp(x - lse) - tl.where(start + cols == target, 1.0 - eps, 0.0) - eps / V
            if SOFTCAP:
                d = d * (1.0 - t * t)  # d softcap(x) / dx
            tl.store(base + start + cols, (d * g).to(logits_ptr.dtype.element_ty), mask=mask)


def _rows_triton(logits, target, scale, ignore_index, eps, softcap, grad):
    C, V = logits.shape
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    if C:
        _flce_rows_kernel[(C,)](
            logits, target, loss, scale, scale.stride(0) if scale.numel() > 1 else 0, V, logits.stride(0),
            ignore_index, eps, softcap if softcap else 1.0,
            BLOCK_V=min(triton.next_power_of_2(V), 4096), SOFTCAP=bool(softcap), GRAD=grad, num_warps=8,
        )
    return loss


# ----------------------------------------------------------------------------------------------
# PyTorch fallback of the row step (same math, on one chunk)
# ----------------------------------------------------------------------------------------------


def _rows_torch(logits, target, scale, ignore_index, eps, softcap, grad):
    # In place wherever possible: on CPU this is the path that runs, and every temporary of the
    # chunk's size eats into the memory the chunking saves.
    x = logits.float()  # the chunk's own buffer when it is fp32 already
    t = None
    if softcap:
        t = x.div_(softcap).tanh_()
        x = t * softcap
    keep = target != ignore_index
    safe = torch.where(keep, target, 0)
    loss = -(1.0 - eps) * x.gather(1, safe[:, None])[:, 0]
    if eps:
        loss = loss - eps * x.mean(dim=-1)
    # log-sum-exp by hand so the exponentials overwrite x (torch.logsumexp would allocate a
    # chunk-sized temporary); normalised, they are the softmax the gradient needs.
    m = x.amax(dim=-1)
    e = x.sub_(m[:, None]).exp_()
    total = e.sum(dim=-1)
    loss = torch.where(keep, loss + m + total.log(), 0.0)
    if grad:
        d = e.div_(total[:, None])  # softmax, over the logits (or their fp32 copy)
        d[torch.arange(d.shape[0], device=d.device), safe] -= 1.0 - eps
        if eps:
            d.sub_(eps / d.shape[1])
        if t is not None:
            d.mul_(t.mul_(t).neg_().add_(1.0))  # d softcap(x) / dx = 1 - tanh^2
        d.mul_(torch.where(keep, scale.float().expand(keep.shape), 0.0)[:, None])
        if d is not logits:
            logits.copy_(d)  # like the kernel: the chunk's logits buffer becomes its gradient
    return loss


# ----------------------------------------------------------------------------------------------
# The chunk loop (shared by both backends; only the row step differs)
# ----------------------------------------------------------------------------------------------


# CPU GEMMs with few rows run far below the CPU's peak (measured: 32-row chunks made the step
# 3.8x slower than the unfused one on the CI machine, 128-row chunks 1.4x), so on CPU a chunk
# has at least this many rows, at the price of a larger chunk of logits.
_CPU_MIN_ROWS = 128


def _chunk_rows(N: int, V: int, H: int, on_cpu: bool = False) -> int:
    # Liger's rule: a chunk's logits (C x V) about the size of hidden (N x H), so the loss costs
    # at most about one more copy of the activations; a power of two keeps GEMM shapes regular.
    rows = triton.next_power_of_2(max(1, triton.cdiv(N, triton.cdiv(V, max(H, 1)))))
    return max(rows, _CPU_MIN_ROWS) if on_cpu else rows


def _run(hidden2, weight, target1, bias, ignore_index, eps, softcap, scale, grads):
    """Losses per row, and (when ``grads`` = (dh?, dw?, db?) asks) the gradients for upstream
    per-row gradient ``scale`` (shape (N,) or (1,), broadcast)."""
    N, H = hidden2.shape
    V = weight.shape[0]
    need_dh, need_dw, need_db = grads
    grad = need_dh or need_dw or need_db
    rows = _triton_rows if use_triton(hidden2) else _rows_torch
    loss = torch.empty(N, dtype=torch.float32, device=hidden2.device)
    dh = torch.empty((N, H) if need_dh else (0,), dtype=hidden2.dtype, device=hidden2.device)
    dw = torch.zeros((V, H) if need_dw else (0,), dtype=torch.float32, device=hidden2.device)
    db = torch.zeros((V,) if need_db else (0,), dtype=torch.float32, device=hidden2.device)
    # Under the interpreter (the test suite) both backends keep Liger's small chunks, so tests of
    # a few dozen tokens still run the loop over several chunks.
    C = _chunk_rows(N, V, H, on_cpu=hidden2.device.type == "cpu" and not _interpreter.INTERPRETING)
    for lo in range(0, N, C):
        hi = min(N, lo + C)
        h = hidden2[lo:hi]
        logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
        sc = scale[lo:hi] if scale.numel() > 1 else scale
        loss[lo:hi] = rows(logits, target1[lo:hi], sc, ignore_index, eps, softcap, grad)
        if not grad:
            continue
        dlogits = logits  # overwritten in place by the row step
        if need_dh:
            torch.mm(dlogits, weight, out=dh[lo:hi])
        if need_dw:
            if dlogits.dtype == torch.float32:
                dw.addmm_(dlogits.t(), h)
            else:
                # The chunk's product in the input dtype (one GEMM, fp32 inside), added to the fp32
                # accumulator with the cast on the fly: no (V x H) fp32 temporary.
                dw.add_(dlogits.t() @ h)
        if need_db:
            db.add_(dlogits.sum(0, dtype=torch.float32))
    return loss, dh, dw.to(weight.dtype), db.to(weight.dtype)


def _triton_rows(logits, target, scale, ignore_index, eps, softcap, grad):
    return _rows_triton(logits, target, scale.float(), ignore_index, eps, softcap, grad)


# ----------------------------------------------------------------------------------------------
# Custom op registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("pycomm_kernels::fused_linear_cross_entropy", mutates_args=())
def _flce_op(
    hidden2: torch.Tensor, weight: torch.Tensor, target1: torch.Tensor, bias: torch.Tensor | None,
    ignore_index: int, label_smoothing: float, softcap: float, reduction: str,
    grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_targets(target1, weight.shape[0], ignore_index)
    keep = target1 != ignore_index
    if reduction == "mean":
        scale = (1.0 / keep.sum().float()).reshape(1)
    else:
        scale = torch.ones(1, dtype=torch.float32, device=hidden2.device)
    # reduction "none": the per-token upstream gradients are only known in backward.
    grads = (grad_hidden, grad_weight, grad_bias and bias is not None) if reduction != "none" else (False,) * 3
    loss, dh, dw, db = _run(hidden2, weight, target1, bias, ignore_index, label_smoothing, softcap, scale, grads)
    if reduction == "mean":
        out = loss.sum() / keep.sum()
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss
    return out, dh, dw, db


@_flce_op.register_fake
def _(hidden2, weight, target1, bias, ignore_index, label_smoothing, softcap, reduction,
      grad_hidden, grad_weight, grad_bias):
    N, H = hidden2.shape
    V = weight.shape[0]
    f32 = torch.float32
    out = hidden2.new_empty((N,) if reduction == "none" else (), dtype=f32)
    if reduction == "none":
        return out, hidden2.new_empty((0,)), weight.new_empty((0,)), weight.new_empty((0,))
    return (out, hidden2.new_empty((N, H) if grad_hidden else (0,)), weight.new_empty((V, H) if grad_weight else (0,)),
            weight.new_empty((V,) if grad_bias and bias is not None else (0,)))


@torch.library.custom_op("pycomm_kernels::fused_linear_cross_entropy_bwd", mutates_args=())
def _flce_bwd_op(
    grad_rows: torch.Tensor, hidden2: torch.Tensor, weight: torch.Tensor, target1: torch.Tensor,
    bias: torch.Tensor | None, ignore_index: int, label_smoothing: float, softcap: float,
    grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = (grad_hidden, grad_weight, grad_bias and bias is not None)
    _, dh, dw, db = _run(hidden2, weight, target1, bias, ignore_index, label_smoothing, softcap,
                         grad_rows.float().contiguous(), grads)
    return dh, dw, db


@_flce_bwd_op.register_fake
def _(grad_rows, hidden2, weight, target1, bias, ignore_index, label_smoothing, softcap,
      grad_hidden, grad_weight, grad_bias):
    N, H = hidden2.shape
    V = weight.shape[0]
    return (hidden2.new_empty((N, H) if grad_hidden else (0,)), weight.new_empty((V, H) if grad_weight else (0,)),
            weight.new_empty((V,) if grad_bias and bias is not None else (0,)))


def _setup_context(ctx, inputs, output):
    (hidden2, weight, target1, bias, ignore_index, label_smoothing, softcap, reduction,
     grad_hidden, grad_weight, grad_bias) = inputs
    _, dh, dw, db = output
    ctx.reduction = reduction
    ctx.args = (ignore_index, label_smoothing, softcap, grad_hidden, grad_weight, grad_bias)
    ctx.has_bias = bias is not None
    if reduction == "none":
        ctx.save_for_backward(hidden2, weight, target1, bias)
    else:
        ctx.save_for_backward(dh, dw, db)
    ctx.mark_non_differentiable(dh, dw, db)
    # Otherwise autograd builds zero "gradients" for dh/dw/db: one more (V x H) buffer.
    ctx.set_materialize_grads(False)


def _backward(ctx, g, _gdh, _gdw, _gdb):
    ignore_index, label_smoothing, softcap, grad_hidden, grad_weight, grad_bias = ctx.args
    if ctx.reduction == "none":
        hidden2, weight, target1, bias = ctx.saved_tensors
        dh, dw, db = _flce_bwd_op(g, hidden2, weight, target1, bias, *ctx.args)
    else:
        # Eager: scaled in place, since a copy would be one more (V x H) buffer at the backward's
        # peak; a second backward through the same graph (retain_graph=True) is then refused by
        # autograd's version check on these saved tensors instead of silently scaling twice.
        # Traced (torch.compile / AOTAutograd, fake tensors): out of place, because a traced
        # graph may not mutate a forward output it also returns; the compiler plans that memory.
        dh, dw, db = ctx.saved_tensors
        if is_fake(g):
            dh, dw, db = (t * g.to(t.dtype) for t in (dh, dw, db))
        else:
            for t in (dh, dw, db):
                t.mul_(g.to(t.dtype))
    return (dh if grad_hidden else None, dw if grad_weight else None, None,
            db if grad_bias and ctx.has_bias else None, None, None, None, None, None, None, None)


_flce_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean", softcap: float | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(softcap(hidden @ weight.T + bias).float(), target, ...)`` without the
    (tokens x vocab) logits (see the module docstring)."""
    _utils.check_tensor("hidden", hidden, ndim_min=1)
    _utils.check_tensor("weight", weight)
    if bias is not None:
        _utils.check_tensor("bias", bias)
    _utils.check_same(("hidden", "weight", "bias"), (hidden, weight, bias))
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (vocab, hidden) = (V, {hidden.shape[-1]}) for hidden "
                         f"{tuple(hidden.shape)}, got {tuple(weight.shape)} (pass lm_head.weight as is)")
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight has 0 rows: the vocabulary is empty")
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"bias must have shape ({V},) like weight's rows, got {tuple(bias.shape)}")
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError("target must be an integer tensor of class indices (e.g. torch.long); "
                        f"got {getattr(target, 'dtype', type(target).__name__)}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"target has shape {tuple(target.shape)} but hidden {tuple(hidden.shape)} needs "
                         f"{tuple(hidden.shape[:-1])} (one class index per token)")
    if target.device != hidden.device:
        raise ValueError(f"target is on {target.device} but hidden on {hidden.device}; move them to one device")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"softcap={softcap} must be a positive number (or None for no softcapping)")
    hidden2 = _utils.flatten_rows(hidden)
    if hidden2.stride(-1) != 1:
        hidden2 = hidden2.contiguous()
    target1 = target.reshape(-1).to(torch.int64)
    grad_on = torch.is_grad_enabled()
    out = _flce_op(
        hidden2, weight, target1, bias, int(ignore_index), float(label_smoothing), float(softcap or 0.0), reduction,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )[0]
    return out.reshape(target.shape) if reduction == "none" else out
