"""``swiglu_mlp(x, gate_weight, up_weight, down_weight, gate_bias=None, up_bias=None,
down_bias=None)``: the gated MLP of Llama/Mistral/Qwen/Phi-3, ``down(silu(gate(x)) * up(x))``;
``geglu_mlp(..., approximate="tanh")``: Gemma's, ``down(gelu(gate(x)) * up(x))``.

Contract: ``x`` is ``(..., E)``; ``gate_weight`` and ``up_weight`` are ``(I, E)``, ``down_weight``
``(E_out, I)`` (``nn.Linear`` layout, pass the modules' ``.weight`` as is); biases ``(I,)``,
``(I,)``, ``(E_out,)`` or None; one dtype (float32, float16, bfloat16) and device.  Returns
``(..., E_out)``.

What is fused and what is not, and why:

* The three projections stay on torch (cuBLAS on a GPU).  They are large GEMMs with nothing to
  gain from a Triton re-implementation; the activation is elementwise and bandwidth-bound, so
  the win is in not making extra passes over the ``(tokens x I)`` intermediates.
* ``act(gate) * up`` is one Triton kernel (``kernels.swiglu``'s and ``kernels.geglu``'s): one read
  of gate and up, one write of the product, fp32 math.
* Memory: autograd around three ``F.linear`` and an activation keeps four ``tokens x I``
  tensors alive until backward (gate, up, the product, and inside silu its input).  This op keeps
  two (gate and up); the backward recomputes ``act(gate) * up`` with the same kernel that also
  yields d gate and d up (Liger's trade: one cheap elementwise pass against a tensor of memory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _utils
from . import swiglu as _gated


@torch.library.custom_op("pycomm_kernels::gated_mlp", mutates_args=())
def _gated_mlp_op(
    x2: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
    bg: torch.Tensor | None, bu: torch.Tensor | None, bd: torch.Tensor | None, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gate = F.linear(x2, wg, bg)
    up = F.linear(x2, wu, bu)
    return F.linear(_gated.forward(gate, up, activation), wd, bd), gate, up


@_gated_mlp_op.register_fake
def _(x2, wg, wu, wd, bg, bu, bd, activation):
    N, inter = x2.shape[0], wg.shape[0]
    return x2.new_empty((N, wd.shape[0])), x2.new_empty((N, inter)), x2.new_empty((N, inter))


@torch.library.custom_op("pycomm_kernels::gated_mlp_bwd", mutates_args=())
def _gated_mlp_bwd_op(
    g: torch.Tensor, x2: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
    gate: torch.Tensor, up: torch.Tensor, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    act = _gated.forward(gate, up, activation)  # recomputed instead of saved
    dwd = g.t() @ act
    dbd = g.sum(0, dtype=torch.float32).to(g.dtype)
    dact = g @ wd
    dgate, dup = _gated.backward(dact, gate, up, activation)
    dx = dgate @ wg
    dx.addmm_(dup, wu)
    dbg = dgate.sum(0, dtype=torch.float32).to(g.dtype)
    dbu = dup.sum(0, dtype=torch.float32).to(g.dtype)
    return dx, dgate.t() @ x2, dup.t() @ x2, dwd, dbg, dbu, dbd


@_gated_mlp_bwd_op.register_fake
def _(g, x2, wg, wu, wd, gate, up, activation):
    inter = wg.shape[0]
    return (x2.new_empty(x2.shape), wg.new_empty(wg.shape), wu.new_empty(wu.shape), wd.new_empty(wd.shape),
            wg.new_empty((inter,)), wu.new_empty((inter,)), wd.new_empty((wd.shape[0],)))


def _setup_context(ctx, inputs, output):
    x2, wg, wu, wd, bg, bu, bd, ctx.activation = inputs
    _, gate, up = output
    ctx.save_for_backward(x2, wg, wu, wd, gate, up)
    ctx.has_bias = (bg is not None, bu is not None, bd is not None)
    ctx.mark_non_differentiable(gate, up)


def _backward(ctx, g, _ggate, _gup):
    x2, wg, wu, wd, gate, up = ctx.saved_tensors
    dx, dwg, dwu, dwd, dbg, dbu, dbd = _gated_mlp_bwd_op(g.contiguous(), x2, wg, wu, wd, gate, up, ctx.activation)
    hg, hu, hd = ctx.has_bias
    return dx, dwg, dwu, dwd, dbg if hg else None, dbu if hu else None, dbd if hd else None, None


_gated_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def _gated_mlp(x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias, activation):
    names = ("x", "gate_weight", "up_weight", "down_weight", "gate_bias", "up_bias", "down_bias")
    tensors = (x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias)
    for name, t in zip(names, tensors):
        if t is not None or name in names[:4]:
            _utils.check_tensor(name, t, ndim_min=1)
    _utils.check_same(names, tensors)
    E = x.shape[-1]
    inter = gate_weight.shape[0]
    if gate_weight.dim() != 2 or gate_weight.shape[1] != E:
        raise ValueError(f"gate_weight must be (intermediate, {E}) for x {tuple(x.shape)}, "
                         f"got {tuple(gate_weight.shape)}")
    if up_weight.shape != gate_weight.shape:
        raise ValueError(f"up_weight {tuple(up_weight.shape)} must have gate_weight's shape {tuple(gate_weight.shape)}")
    if down_weight.dim() != 2 or down_weight.shape[1] != inter:
        raise ValueError(f"down_weight must be (out_features, {inter}), got {tuple(down_weight.shape)}")
    for name, b, n in (("gate_bias", gate_bias, inter), ("up_bias", up_bias, inter),
                       ("down_bias", down_bias, down_weight.shape[0])):
        if b is not None and b.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(b.shape)}")
    x2 = _utils.flatten_rows(x)
    out = _gated_mlp_op(x2, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias, activation)[0]
    return out.reshape(*x.shape[:-1], down_weight.shape[0])


def swiglu_mlp(
    x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor,
    gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(F.silu(F.linear(x, gate_weight, gate_bias)) * F.linear(x, up_weight, up_bias),
    down_weight, down_bias)`` with the activation fused and less saved for backward (see the
    module docstring)."""
    return _gated_mlp(x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias, "silu")


def geglu_mlp(
    x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor,
    gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
    approximate: str = "tanh",
) -> torch.Tensor:
    """``swiglu_mlp`` with ``F.gelu(..., approximate=approximate)`` in place of silu: Gemma's MLP
    (its ``gelu_pytorch_tanh`` is the default ``"tanh"``)."""
    return _gated_mlp(x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias,
                      _gated.gelu_activation(approximate))
