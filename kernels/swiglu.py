"""Gated MLP activations, fused: ``swiglu(gate, up) = silu(gate) * up`` (Llama, Mistral, Qwen,
Phi-3) and ``geglu(gate, up) = gelu(gate) * up`` (Gemma; tanh approximation by default, as
Gemma's ``gelu_pytorch_tanh``).

Contract: ``gate`` and ``up`` have the same shape, dtype (float32, float16, bfloat16) and device;
the result is contiguous with that shape.  The math is fp32 with one rounding.  One kernel pair
serves every activation (a ``tl.constexpr`` picks it, kernels/_activations.py holds the formulas).
Backward recomputes ``act(gate)`` instead of saving it (a few flops against a tensor of memory):
``dgate = g * up * act'(gate)`` and ``dup = g * act(gate)``.
Non-contiguous inputs are copied to contiguous ones first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _activations, _utils
from ._dispatch import use_triton

GATED = ("silu", "gelu", "gelu_tanh")  # the activations a gated MLP may use

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gated_fwd_kernel(gate_ptr, up_ptr, out_ptr, n_elements, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # the activation needs fp32
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _activations.apply(gate, ACTIVATION) * up, mask=mask)


@triton.jit
def _gated_bwd_kernel(g_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_elements, ACTIVATION: tl.constexpr,
                      BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # recomputed rather than saved by the forward
    tl.store(dgate_ptr + offs, g * up * _activations.derivative(gate, ACTIVATION), mask=mask)
    tl.store(dup_ptr + offs, g * _activations.apply(gate, ACTIVATION), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_BLOCK = 1024


def _fwd(gate, up, activation="silu"):
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = out.numel()
    if n:
        grid = (triton.cdiv(n, _BLOCK),)
        _gated_fwd_kernel[grid](gate.contiguous(), up.contiguous(), out, n, ACTIVATION=activation, BLOCK=_BLOCK)
    return out


def _bwd(g, gate, up, activation="silu"):
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n:
        grid = (triton.cdiv(n, _BLOCK),)
        _gated_bwd_kernel[grid](g.contiguous(), gate.contiguous(), up.contiguous(), dgate, dup, n,
                                ACTIVATION=activation, BLOCK=_BLOCK)
    return dgate, dup


# ----------------------------------------------------------------------------------------------
# PyTorch fallback
# ----------------------------------------------------------------------------------------------


def _torch_fwd(gate, up, activation="silu"):
    return (_activations.torch_apply(gate.float(), activation) * up.float()).to(gate.dtype).contiguous()


def _torch_bwd(g, gate, up, activation="silu"):
    gf, uf, gg = gate.float(), up.float(), g.float()
    dgate = gg * uf * _activations.torch_derivative(gf, activation)
    dup = gg * _activations.torch_apply(gf, activation)
    return dgate.to(gate.dtype).contiguous(), dup.to(gate.dtype).contiguous()


def forward(gate, up, activation):
    """``act(gate) * up`` on the path the dispatcher picks (for ops that fuse more around it)."""
    return _fwd(gate, up, activation) if use_triton(gate) else _torch_fwd(gate, up, activation)


def backward(g, gate, up, activation):
    """``(d gate, d up)`` for ``forward``'s output gradient ``g``."""
    return _bwd(g, gate, up, activation) if use_triton(gate) else _torch_bwd(g, gate, up, activation)


# ----------------------------------------------------------------------------------------------
# Custom op registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("pycomm_kernels::gated_act", mutates_args=())
def _gated_op(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    return forward(gate, up, activation)


@_gated_op.register_fake
def _(gate, up, activation):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("pycomm_kernels::gated_act_bwd", mutates_args=())
def _gated_bwd_op(g: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                  activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    return backward(g, gate, up, activation)


@_gated_bwd_op.register_fake
def _(g, gate, up, activation):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    gate, up, ctx.activation = inputs
    ctx.save_for_backward(gate, up)


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    return *_gated_bwd_op(grad, gate, up, ctx.activation), None


_gated_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def gelu_activation(approximate: str) -> str:
    """The activation name of ``F.gelu(approximate=...)``; a clear error for anything else."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none' (as for F.gelu), got {approximate!r}")
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def _gated(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    _utils.check_tensor("gate", gate)
    _utils.check_tensor("up", up)
    _utils.check_same(("gate", "up"), (gate, up))
    if gate.shape != up.shape:
        raise ValueError(
            f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape "
            "(split a merged gate/up projection with .chunk(2, dim=-1) first)"
        )
    return _gated_op(gate, up, activation)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``, fused (see the module docstring)."""
    return _gated(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``F.gelu(gate, approximate=approximate) * up``, fused (see the module docstring).  The
    default is the tanh form Gemma uses (``gelu_pytorch_tanh``); ``approximate="none"`` is erf's."""
    return _gated(gate, up, gelu_activation(approximate))
