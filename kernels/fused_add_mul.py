"""``fused_add_mul(a, b, c, d) = d + (a + b) * c`` in one pass over memory.

Contract: ``a, b, c, d`` are tensors of one floating dtype (float32, float16, bfloat16) on one
device whose shapes broadcast together (torch rules); the result has the broadcast shape, is
contiguous, and is computed in fp32 and rounded once.  Broadcast and non-contiguous inputs are
read in place through strides (no expanded copies).  Gradients flow to all four inputs; the
gradient of a broadcast input is summed back to its shape (in fp32, with torch's ``sum_to_size``).

Unfused PyTorch reads the four inputs and writes/reads two temporaries (``a+b`` and the product);
fused, each element is read once per input and written once, so this op is purely bandwidth
bound at ``5 * numel * itemsize`` bytes.
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
def _offsets(idx, S1, S2, S3, s0, s1, s2, s3):
    # Element offset of flat output index `idx` in a tensor with (broadcast) strides s0..s3.
    i3 = idx % S3
    rest = idx // S3
    i2 = rest % S2
    rest = rest // S2
    i1 = rest % S1
    i0 = rest // S1
    return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3


@triton.jit
def _fused_add_mul_fwd_kernel(
    a_ptr, b_ptr, c_ptr, d_ptr, out_ptr, n_elements,
    S1, S2, S3,
    sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3, sc0, sc1, sc2, sc3, sd0, sd1, sd2, sd3,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    a = tl.load(a_ptr + _offsets(idx, S1, S2, S3, sa0, sa1, sa2, sa3), mask=mask, other=0.0)
    b = tl.load(b_ptr + _offsets(idx, S1, S2, S3, sb0, sb1, sb2, sb3), mask=mask, other=0.0)
    c = tl.load(c_ptr + _offsets(idx, S1, S2, S3, sc0, sc1, sc2, sc3), mask=mask, other=0.0)
    d = tl.load(d_ptr + _offsets(idx, S1, S2, S3, sd0, sd1, sd2, sd3), mask=mask, other=0.0)
    # fp32 math, one rounding at the store: more accurate than torch's three roundings.
    out = d.to(tl.float32) + (a.to(tl.float32) + b.to(tl.float32)) * c.to(tl.float32)
    tl.store(out_ptr + idx, out, mask=mask)


@triton.jit
def _fused_add_mul_bwd_kernel(
    g_ptr, a_ptr, b_ptr, c_ptr, gab_ptr, gc_ptr, n_elements,
    S1, S2, S3,
    sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3, sc0, sc1, sc2, sc3,
    BLOCK: tl.constexpr,
):
    # d out / d a = d out / d b = c and d out / d c = a + b; both products are written at full
    # (broadcast) size and reduced to each input's shape on the host.  The stores cast to the
    # buffers' dtype, which the launcher makes fp32 when a reduction follows.
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + _offsets(idx, S1, S2, S3, sa0, sa1, sa2, sa3), mask=mask, other=0.0)
    b = tl.load(b_ptr + _offsets(idx, S1, S2, S3, sb0, sb1, sb2, sb3), mask=mask, other=0.0)
    c = tl.load(c_ptr + _offsets(idx, S1, S2, S3, sc0, sc1, sc2, sc3), mask=mask, other=0.0)
    tl.store(gab_ptr + idx, g * c.to(tl.float32), mask=mask)
    tl.store(gc_ptr + idx, g * (a.to(tl.float32) + b.to(tl.float32)), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_BLOCK = 1024


def _layout(shape, tensors):
    layout = _utils.broadcast_layout(shape, tensors)
    if layout is None:
        # More than 4 non-mergeable dims: materialise once and index flat.
        tensors = [t.expand(shape).contiguous() for t in tensors]
        n = _utils.prod(shape)
        layout = [1, 1, 1, max(n, 1)], [[0, 0, 0, 1] for _ in tensors]
    (_, S1, S2, S3), strides = layout
    return tensors, (S1, S2, S3), [s for st in strides for s in st]


def _fwd(a, b, c, d):
    shape = torch.broadcast_shapes(a.shape, b.shape, c.shape, d.shape)
    out = torch.empty(shape, dtype=a.dtype, device=a.device)
    n = out.numel()
    if n == 0:
        return out
    (a, b, c, d), sizes, strides = _layout(shape, [a, b, c, d])
    grid = (triton.cdiv(n, _BLOCK),)
    _fused_add_mul_fwd_kernel[grid](a, b, c, d, out, n, *sizes, *strides, BLOCK=_BLOCK, num_warps=4)
    return out


def _grad_dtypes(a, b, c, shape):
    # fp32 buffers when the gradient will be summed over broadcast dims, so the sum is not done
    # on rounded fp16/bf16 values; the input dtype otherwise (the buffer is the gradient itself).
    full = torch.Size(shape)
    ab = a.dtype if (a.shape == full and b.shape == full) else torch.float32
    cc = c.dtype if c.shape == full else torch.float32
    return ab, cc


def _bwd(g, a, b, c):
    shape = g.shape
    ab_dtype, c_dtype = _grad_dtypes(a, b, c, shape)
    gab = torch.empty(shape, dtype=ab_dtype, device=g.device)
    gc = torch.empty(shape, dtype=c_dtype, device=g.device)
    n = g.numel()
    if n == 0:
        return gab, gc
    g = g.contiguous()
    (a, b, c), sizes, strides = _layout(shape, [a, b, c])
    grid = (triton.cdiv(n, _BLOCK),)
    _fused_add_mul_bwd_kernel[grid](g, a, b, c, gab, gc, n, *sizes, *strides, BLOCK=_BLOCK, num_warps=4)
    return gab, gc


# ----------------------------------------------------------------------------------------------
# PyTorch fallback (CPU without the interpreter, or PYCOMM_KERNELS_BACKEND=torch)
# ----------------------------------------------------------------------------------------------


def _torch_fwd(a, b, c, d):
    return (d + (a + b) * c).contiguous()


def _torch_bwd(g, a, b, c):
    ab_dtype, c_dtype = _grad_dtypes(a, b, c, g.shape)
    gf = g.float()
    return (gf * c.float()).to(ab_dtype).contiguous(), (gf * (a.float() + b.float())).to(c_dtype).contiguous()


# ----------------------------------------------------------------------------------------------
# Custom op registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("pycomm_kernels::fused_add_mul", mutates_args=())
def _fused_add_mul_op(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return _fwd(a, b, c, d) if use_triton(a) else _torch_fwd(a, b, c, d)


@_fused_add_mul_op.register_fake
def _(a, b, c, d):
    shape = torch.broadcast_shapes(a.shape, b.shape, c.shape, d.shape)
    return a.new_empty(shape)


@torch.library.custom_op("pycomm_kernels::fused_add_mul_bwd", mutates_args=())
def _fused_add_mul_bwd_op(
    g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _bwd(g, a, b, c) if use_triton(g) else _torch_bwd(g, a, b, c)


@_fused_add_mul_bwd_op.register_fake
def _(g, a, b, c):
    ab_dtype, c_dtype = _grad_dtypes(a, b, c, g.shape)
    return g.new_empty(g.shape, dtype=ab_dtype), g.new_empty(g.shape, dtype=c_dtype)


def _setup_context(ctx, inputs, output):
    a, b, c, d = inputs
    ctx.save_for_backward(a, b, c)
    ctx.d_shape = d.shape


def _backward(ctx, grad):
    a, b, c = ctx.saved_tensors
    gab, gc = _fused_add_mul_bwd_op(grad, a, b, c)
    ga = gab.sum_to_size(a.shape).to(a.dtype) if ctx.needs_input_grad[0] else None
    gb = gab.sum_to_size(b.shape).to(b.dtype) if ctx.needs_input_grad[1] else None
    gc = gc.sum_to_size(c.shape).to(c.dtype) if ctx.needs_input_grad[2] else None
    gd = grad.sum_to_size(ctx.d_shape) if ctx.needs_input_grad[3] else None
    return ga, gb, gc, gd


_fused_add_mul_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def fused_add_mul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``d + (a + b) * c`` with torch broadcasting, in one pass (see the module docstring)."""
    names = ("a", "b", "c", "d")
    for name, t in zip(names, (a, b, c, d)):
        _utils.check_tensor(name, t)
    _utils.check_same(names, (a, b, c, d))
    try:
        torch.broadcast_shapes(a.shape, b.shape, c.shape, d.shape)
    except RuntimeError:
        raise ValueError(
            f"shapes a={tuple(a.shape)}, b={tuple(b.shape)}, c={tuple(c.shape)}, d={tuple(d.shape)} "
            "do not broadcast together; make each dimension equal or 1"
        ) from None
    return _fused_add_mul_op(a, b, c, d)
