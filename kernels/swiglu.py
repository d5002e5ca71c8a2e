"""``swiglu(gate, up) = silu(gate) * up``, the gated MLP activation, fused.

Contract: ``gate`` and ``up`` have the same shape, dtype (float32, float16, bfloat16) and device;
the result is contiguous with that shape.  The math is fp32 with one rounding.  Backward
recomputes ``sigmoid(gate)`` instead of saving it (one cheap exp against a tensor of memory):
``dgate = g * up * s * (1 + gate * (1 - s))`` and ``dup = g * gate * s``.
Non-contiguous inputs are copied to contiguous ones first.
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
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # sigmoid needs fp32
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, gate * tl.sigmoid(gate) * up, mask=mask)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_elements, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(gate)  # recomputed rather than saved by the forward
    tl.store(dgate_ptr + offs, g * up * s * (1.0 + gate * (1.0 - s)), mask=mask)
    tl.store(dup_ptr + offs, g * gate * s, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_BLOCK = 1024


def _fwd(gate, up):
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = out.numel()
    if n:
        grid = (triton.cdiv(n, _BLOCK),)
        _swiglu_fwd_kernel[grid](gate.contiguous(), up.contiguous(), out, n, BLOCK=_BLOCK)
    return out


def _bwd(g, gate, up):
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n:
        grid = (triton.cdiv(n, _BLOCK),)
        _swiglu_bwd_kernel[grid](g.contiguous(), gate.contiguous(), up.contiguous(), dgate, dup, n, BLOCK=_BLOCK)
    return dgate, dup


# ----------------------------------------------------------------------------------------------
# PyTorch fallback
# ----------------------------------------------------------------------------------------------


def _torch_fwd(gate, up):
    gf = gate.float()
    return (gf * torch.sigmoid(gf) * up.float()).to(gate.dtype).contiguous()


def _torch_bwd(g, gate, up):
    gf, uf, gg = gate.float(), up.float(), g.float()
    s = torch.sigmoid(gf)
    dgate = gg * uf * s * (1.0 + gf * (1.0 - s))
    return dgate.to(gate.dtype).contiguous(), (gg * gf * s).to(gate.dtype).contiguous()


# ----------------------------------------------------------------------------------------------
# Custom op registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("pycomm_kernels::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _fwd(gate, up) if use_triton(gate) else _torch_fwd(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("pycomm_kernels::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(g: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _bwd(g, gate, up) if use_triton(gate) else _torch_bwd(g, gate, up)


@_swiglu_bwd_op.register_fake
def _(g, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    return _swiglu_bwd_op(grad, gate, up)


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``, fused (see the module docstring)."""
    _utils.check_tensor("gate", gate)
    _utils.check_tensor("up", up)
    _utils.check_same(("gate", "up"), (gate, up))
    if gate.shape != up.shape:
        raise ValueError(
            f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape "
            "(split a merged gate/up projection with .chunk(2, dim=-1) first)"
        )
    return _swiglu_op(gate, up)
