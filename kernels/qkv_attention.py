"""``qkv_attention(x, w_qkv, b_qkv=None, *, num_heads, num_kv_heads=None, causal=True)``:
merged QKV projection followed by flash attention, before the output projection.

Contract: ``x`` is ``(B, S, E)``; ``w_qkv`` is ``((H + 2*H_kv) * D, E)``: the rows of Wq, then Wk,
then Wv (the layout of ``nn.MultiheadAttention.in_proj_weight`` when ``H_kv == H``); ``b_qkv`` is
``((H + 2*H_kv) * D,)`` or None; one dtype and device.  Returns ``(B, S, H*D)``, contiguous, with
head ``h`` in columns ``h*D:(h+1)*D`` (ready for the output projection).

Why merged: one GEMM with N = (H + 2*H_kv)*D reads ``x`` once instead of three times and keeps
the tensor cores busier than three narrow GEMMs.  The attention kernels then read q, k and v as
strided views of the projection's output (no split/transpose copies), write the output directly
in ``(B, S, H, D)`` order, and in the backward pass write dq, dk and dv straight into one
``(B, S, (H + 2*H_kv)*D)`` buffer, so the input gradient is again a single GEMM
(``dqkv @ w_qkv``) and no concatenation of gradients is needed.
"""
from __future__ import annotations

import math

import torch

from . import _utils
from ._dispatch import use_triton
from .flash_attention import MAX_HEAD_DIM, attention_bwd, attention_fwd, torch_attention_bwd, torch_attention_fwd
from .matmul import mm

# ----------------------------------------------------------------------------------------------
# Launchers (the kernels are matmul's and flash_attention's)
# ----------------------------------------------------------------------------------------------


def _views(buf, B, S, H, H_KV, D):
    """(B, H, S, D)-shaped strided views of q, k, v inside a (B, S, (H + 2 H_kv) D) buffer."""
    heads = buf.view(B, S, H + 2 * H_KV, D)
    q = heads[:, :, :H].transpose(1, 2)
    k = heads[:, :, H:H + H_KV].transpose(1, 2)
    v = heads[:, :, H + H_KV:].transpose(1, 2)
    return q, k, v


def _fwd(x, w, b, H, H_KV, causal):
    B, S, E = x.shape
    T = w.shape[0]
    D = T // (H + 2 * H_KV)
    qkv = mm(x.reshape(B * S, E), w.t(), b)[0].view(B, S, T)
    q, k, v = _views(qkv, B, S, H, H_KV, D)
    out = torch.empty((B, S, H * D), dtype=x.dtype, device=x.device)
    lse = attention_fwd(q, k, v, out.view(B, S, H, D).transpose(1, 2), causal, 1.0 / math.sqrt(D))
    return out, qkv, lse


def _bwd(g, x, w, has_bias, qkv, out, lse, H, H_KV, causal):
    B, S, E = x.shape
    T = w.shape[0]
    D = T // (H + 2 * H_KV)
    q, k, v = _views(qkv, B, S, H, H_KV, D)
    dqkv = torch.empty((B, S, T), dtype=x.dtype, device=x.device)
    dq, dk, dv = _views(dqkv, B, S, H, H_KV, D)
    o = out.view(B, S, H, D).transpose(1, 2)
    do = g.contiguous().view(B, S, H, D).transpose(1, 2)
    attention_bwd(q, k, v, o, lse, do, dq, dk, dv, causal, 1.0 / math.sqrt(D))
    d2 = dqkv.view(B * S, T)
    dx = mm(d2, w)[0].view(B, S, E)
    dw = mm(d2.t(), x.reshape(B * S, E))[0]
    db = d2.float().sum(0).to(x.dtype) if has_bias else x.new_empty(0)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# PyTorch fallback
# ----------------------------------------------------------------------------------------------


def _torch_fwd(x, w, b, H, H_KV, causal):
    B, S, E = x.shape
    T = w.shape[0]
    D = T // (H + 2 * H_KV)
    qkv = torch.nn.functional.linear(x, w, b).contiguous()
    q, k, v = _views(qkv, B, S, H, H_KV, D)
    o, lse = torch_attention_fwd(q, k, v, causal, 1.0 / math.sqrt(D))
    return o.transpose(1, 2).reshape(B, S, H * D).contiguous(), qkv, lse


def _torch_bwd(g, x, w, has_bias, qkv, out, lse, H, H_KV, causal):
    B, S, E = x.shape
    T = w.shape[0]
    D = T // (H + 2 * H_KV)
    q, k, v = _views(qkv, B, S, H, H_KV, D)
    o = out.view(B, S, H, D).transpose(1, 2)
    do = g.reshape(B, S, H, D).transpose(1, 2)
    dq, dk, dv = torch_attention_bwd(do, q, k, v, o, lse, causal, 1.0 / math.sqrt(D))
    dqkv = torch.cat([t.transpose(1, 2).reshape(B, S, -1) for t in (dq, dk, dv)], dim=-1)
    d2 = dqkv.reshape(B * S, T)
    dx = (d2 @ w).view(B, S, E)
    dw = d2.t() @ x.reshape(B * S, E)
    db = d2.float().sum(0).to(x.dtype) if has_bias else x.new_empty(0)
    return dx.contiguous(), dw.contiguous(), db


# ----------------------------------------------------------------------------------------------
# Custom op registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("pycomm_kernels::qkv_attention", mutates_args=())
def _qkv_attention_op(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, num_heads: int, num_kv_heads: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = _fwd if use_triton(x) else _torch_fwd
    return fn(x, w, b, num_heads, num_kv_heads, causal)


@_qkv_attention_op.register_fake
def _(x, w, b, num_heads, num_kv_heads, causal):
    B, S, _ = x.shape
    T = w.shape[0]
    D = T // (num_heads + 2 * num_kv_heads)
    return (x.new_empty((B, S, num_heads * D)), x.new_empty((B, S, T)),
            x.new_empty((B, num_heads, S), dtype=torch.float32))


@torch.library.custom_op("pycomm_kernels::qkv_attention_bwd", mutates_args=())
def _qkv_attention_bwd_op(
    g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, has_bias: bool, qkv: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, num_heads: int, num_kv_heads: int, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = _bwd if use_triton(x) else _torch_bwd
    return fn(g, x, w, has_bias, qkv, out, lse, num_heads, num_kv_heads, causal)


@_qkv_attention_bwd_op.register_fake
def _(g, x, w, has_bias, qkv, out, lse, num_heads, num_kv_heads, causal):
    return x.new_empty(x.shape), w.new_empty(w.shape), w.new_empty((w.shape[0],) if has_bias else (0,))


def _setup_context(ctx, inputs, output):
    x, w, b, num_heads, num_kv_heads, causal = inputs
    out, qkv, lse = output
    ctx.save_for_backward(x, w, qkv, out, lse)
    ctx.mark_non_differentiable(qkv, lse)
    ctx.has_bias = b is not None
    ctx.args = (num_heads, num_kv_heads, causal)


def _backward(ctx, g, _gqkv, _glse):
    x, w, qkv, out, lse = ctx.saved_tensors
    dx, dw, db = _qkv_attention_bwd_op(g, x, w, ctx.has_bias, qkv, out, lse, *ctx.args)
    return dx, dw, (db if ctx.has_bias else None), None, None, None


_qkv_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def qkv_attention(
    x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None = None, *,
    num_heads: int, num_kv_heads: int | None = None, causal: bool = True,
) -> torch.Tensor:
    """Merged QKV projection + flash attention, ``(B, S, E) -> (B, S, H*D)`` (see module docstring)."""
    _utils.check_tensor("x", x)
    _utils.check_tensor("w_qkv", w_qkv)
    if b_qkv is not None:
        _utils.check_tensor("b_qkv", b_qkv)
    _utils.check_same(("x", "w_qkv", "b_qkv"), (x, w_qkv, b_qkv))
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, seq, embed_dim), got shape {tuple(x.shape)}")
    H = int(num_heads)
    H_KV = H if num_kv_heads is None else int(num_kv_heads)
    if H <= 0 or H_KV <= 0 or H % H_KV != 0:
        raise ValueError(f"num_heads={H} must be a positive multiple of num_kv_heads={H_KV}")
    if w_qkv.dim() != 2 or w_qkv.shape[1] != x.shape[2] or w_qkv.shape[0] % (H + 2 * H_KV) != 0:
        raise ValueError(
            f"w_qkv {tuple(w_qkv.shape)} must be ((num_heads + 2*num_kv_heads) * head_dim, embed_dim) = "
            f"({H + 2 * H_KV} * head_dim, {x.shape[2]}): the rows of Wq, Wk and Wv stacked"
        )
    D = w_qkv.shape[0] // (H + 2 * H_KV)
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {D} is not supported; use 1..{MAX_HEAD_DIM}")
    if b_qkv is not None and b_qkv.shape != (w_qkv.shape[0],):
        raise ValueError(f"b_qkv must have shape ({w_qkv.shape[0]},), got {tuple(b_qkv.shape)}")
    return _qkv_attention_op(x, w_qkv, b_qkv, H, H_KV, bool(causal))[0]
