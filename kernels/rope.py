"""``rope(q, k, cos, sin, *, unsqueeze_dim=1, interleaved=False)``: rotary position embedding
applied to queries and keys, with Hugging Face's ``apply_rotary_pos_emb`` semantics.

Contract: with ``unsqueeze_dim=1`` (HF's default) ``q`` is ``(B, H, S, D)`` and ``k`` is
``(B, H_kv, S, D)``; with ``unsqueeze_dim=2`` they are ``(B, S, H, D)`` / ``(B, S, H_kv, D)``.
``cos`` and ``sin`` are ``(B, S, R)``, ``(1, S, R)`` or ``(S, R)`` exactly as an HF rotary
embedding returns them (already gathered by ``position_ids``), with ``R`` even and ``R <= D``:

* rotate-half layout (default, Llama/Mistral/Qwen/GPT-NeoX): dims ``i`` and ``i + R/2`` form a pair,
  ``out = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[R/2:], x[:R/2])``;
* ``interleaved=True`` (GPT-J): dims ``2i`` and ``2i+1`` form a pair and ``cos``/``sin`` are
  repeat-interleaved (``rotate_every_two``);
* ``R < D`` (partial rotary, Phi/GPT-NeoX ``partial_rotary_factor``): only the first ``R`` dims
  rotate, the others pass through unchanged.

q, k: float32/float16/bfloat16, one dtype and device; cos/sin: any floating dtype on that device.
The math is fp32 with one rounding to q's dtype.  Returns new tensors ``(q_rot, k_rot)`` of the
input shapes; the caller's tensors are never written (always out of place: the rotation reads
each element once and writes it once, so in place would only save the allocation, and it would
be unsafe whenever q or k is needed by autograd).

Backward is the transpose of the per-pair linear map, i.e. the rotation by ``-theta`` (the same
kernel with ``BACKWARD`` set).  ``cos``/``sin`` get no gradient from the kernel; when either
requires grad the op runs as plain differentiable torch code instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._dispatch import use_triton

# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rope_kernel(
    x_ptr, o_ptr, cos_ptr, sin_ptr,
    s_xb, s_xh, s_xs, s_xd, s_ob, s_oh, s_os, s_od, s_cb, s_cs, s_cr,
    H, S, HALF,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr,
):
    # One program per (batch, position): cos/sin of that position are loaded once and reused by
    # every head (the reason heads are the tile's first axis rather than separate programs).
    # INTERLEAVED and BACKWARD are compile-time: they only change the pair indexing and a sign,
    # and a runtime branch in the inner loop would cost more than the extra compiled variant.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    s = pid % S
    offs_h = tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    i_mask = offs_i < HALF
    if INTERLEAVED:
        d1 = offs_i * 2
        d2 = d1 + 1
    else:
        d1 = offs_i
        d2 = offs_i + HALF
    c_base = cos_ptr + b * s_cb + s * s_cs
    sn_base = sin_ptr + b * s_cb + s * s_cs
    c1 = tl.load(c_base + d1 * s_cr, mask=i_mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_base + d2 * s_cr, mask=i_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sn_base + d1 * s_cr, mask=i_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sn_base + d2 * s_cr, mask=i_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # The transpose of [[c1, -s1], [s2, c2]]: a rotation by -theta when c1 == c2, s1 == s2.
        a12 = s2
        a21 = -s1
    else:
        a12 = -s1
        a21 = s2
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + offs_h
        mask = (hh < H)[:, None] & i_mask[None, :]
        x_base = x_ptr + b * s_xb + s * s_xs + hh[:, None] * s_xh
        o_base = o_ptr + b * s_ob + s * s_os + hh[:, None] * s_oh
        x1 = tl.load(x_base + d1[None, :] * s_xd, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + d2[None, :] * s_xd, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1[None, :] + x2 * a12[None, :]
        y2 = x2 * c2[None, :] + x1 * a21[None, :]
        tl.store(o_base + d1[None, :] * s_od, y1.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(o_base + d2[None, :] * s_od, y2.to(o_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _as_bhsd(t: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """A (B, H, S, D) view of ``t`` whatever its layout (no copy)."""
    return t if unsqueeze_dim == 1 else t.transpose(1, 2)


def _cos_bsr(c: torch.Tensor, B: int) -> torch.Tensor:
    """cos/sin as a (B, S, R) view (stride 0 over a broadcast batch)."""
    if c.dim() == 2:
        c = c.unsqueeze(0)
    return c.expand(B, c.shape[1], c.shape[2])


def _rotate(x, cos, sin, unsqueeze_dim, interleaved, backward):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    xv, ov = _as_bhsd(x, unsqueeze_dim), _as_bhsd(out, unsqueeze_dim)
    B, H, S, D = xv.shape
    c, s = _cos_bsr(cos, B), _cos_bsr(sin, B)
    R = c.shape[-1]
    if R < D:
        ov[..., R:] = xv[..., R:]  # pass-through dims of a partial rotary embedding
    if xv.numel() == 0 or R == 0:
        return out
    if c.stride() != s.stride():  # the kernel indexes both with one set of strides
        c, s = c.contiguous(), s.contiguous()
    half = R // 2
    block_h = min(triton.next_power_of_2(H), 16)
    _rope_kernel[(B * S,)](
        xv, ov, c, s, *xv.stride(), *ov.stride(), *c.stride(), H, S, half,
        BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half), INTERLEAVED=interleaved, BACKWARD=backward,
    )
    return out


# ----------------------------------------------------------------------------------------------
# PyTorch fallback (the same pair map, fp32 math)
# ----------------------------------------------------------------------------------------------


def _torch_rotate(x, cos, sin, unsqueeze_dim, interleaved, backward):
    c = cos.float().unsqueeze(unsqueeze_dim) if cos.dim() == 3 else cos.float()
    s = sin.float().unsqueeze(unsqueeze_dim) if sin.dim() == 3 else sin.float()
    if cos.dim() == 2 and unsqueeze_dim == 2:  # (S, R) against (B, S, H, D): broadcast over heads
        c, s = c[:, None, :], s[:, None, :]
    R = cos.shape[-1]
    xf = x.float()
    xr = xf[..., :R]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        c1, c2, s1, s2 = c[..., 0::2], c[..., 1::2], s[..., 0::2], s[..., 1::2]
    else:
        x1, x2 = xr[..., : R // 2], xr[..., R // 2:]
        c1, c2, s1, s2 = c[..., : R // 2], c[..., R // 2:], s[..., : R // 2], s[..., R // 2:]
    a12, a21 = (s2, -s1) if backward else (-s1, s2)
    y1 = x1 * c1 + x2 * a12
    y2 = x2 * c2 + x1 * a21
    y = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
    return torch.cat((y, xf[..., R:]), dim=-1).to(x.dtype)


def _apply(q, k, cos, sin, unsqueeze_dim, interleaved, backward):
    fn = _rotate if use_triton(q) else _torch_rotate
    return (fn(q, cos, sin, unsqueeze_dim, interleaved, backward),
            fn(k, cos, sin, unsqueeze_dim, interleaved, backward))


# ----------------------------------------------------------------------------------------------
# Custom op registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("pycomm_kernels::rope", mutates_args=())
def _rope_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int,
    interleaved: bool, backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _apply(q, k, cos, sin, unsqueeze_dim, interleaved, backward)


@_rope_op.register_fake
def _(q, k, cos, sin, unsqueeze_dim, interleaved, backward):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, unsqueeze_dim, interleaved, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.args = (unsqueeze_dim, interleaved, not backward)


def _backward(ctx, gq, gk):
    cos, sin = ctx.saved_tensors
    dq, dk = _rope_op(gq, gk, cos, sin, *ctx.args)
    return dq, dk, None, None, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def _check(q, k, cos, sin, unsqueeze_dim):
    for name, t in (("q", q), ("k", k)):
        _utils.check_tensor(name, t)
        if t.dim() != 4:
            layout = "(batch, heads, seq, head_dim)" if unsqueeze_dim == 1 else "(batch, seq, heads, head_dim)"
            raise ValueError(f"{name} must be 4-D {layout} for unsqueeze_dim={unsqueeze_dim}, "
                             f"got shape {tuple(t.shape)}")
    _utils.check_same(("q", "k"), (q, k))
    seq_dim = 2 if unsqueeze_dim == 1 else 1
    B, S, D = q.shape[0], q.shape[seq_dim], q.shape[3]
    if k.shape[0] != B or k.shape[seq_dim] != S or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, sequence and head_dim "
                         f"(unsqueeze_dim={unsqueeze_dim})")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(t, 'dtype', type(t))}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q on {q.device}; move them to one device")
        if t.dim() not in (2, 3) or t.shape[-2] != S or (t.dim() == 3 and t.shape[0] not in (1, B)):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected (batch, seq, rotary_dim) = ({B} or 1, {S}, R) or "
                f"({S}, R) as a Hugging Face rotary embedding returns it for these q/k"
            )
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    R = cos.shape[-1]
    if R % 2 or not 0 < R <= D:
        raise ValueError(f"rotary_dim (last dim of cos/sin) is {R}; it must be even and in 2..head_dim={D}")


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, unsqueeze_dim: int = 1,
         interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` of Hugging Face, fused (see the module
    docstring for layouts, partial rotary and the interleaved variant)."""
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim={unsqueeze_dim!r}: use 1 for (B, H, S, D) q/k or 2 for (B, S, H, D)")
    _check(q, k, cos, sin, unsqueeze_dim)
    if cos.requires_grad or sin.requires_grad:
        # The kernel gives no gradient to cos/sin; learned frequencies take differentiable torch code.
        return (_torch_rotate(q, cos, sin, unsqueeze_dim, bool(interleaved), False),
                _torch_rotate(k, cos, sin, unsqueeze_dim, bool(interleaved), False))
    return _rope_op(q, k, cos.detach(), sin.detach(), unsqueeze_dim, bool(interleaved), False)
