"""``flash_attention(q, k, v, causal=False, scale=None)``: exact softmax attention without ever
materialising the S x S score matrix (FlashAttention-2 style tiling with an online softmax).

Contract (like ``F.scaled_dot_product_attention``): ``q`` is ``(B, H, S_q, D)``, ``k`` and ``v``
are ``(B, H_kv, S_k, D)`` with ``H % H_kv == 0`` (grouped-query attention: query head ``h`` uses
key/value head ``h // (H // H_kv)``); one dtype (float32, float16, bfloat16) and device; any
strides (views of a merged QKV buffer are read in place).  ``D`` from 1 to 256 (padded to a power
of two >= 16 inside the kernel and masked).  ``causal`` masks key ``j > i`` for query ``i``
(top-left alignment, as SDPA's ``is_causal``).  ``scale`` defaults to ``1/sqrt(D)``.  Returns a
contiguous ``(B, H, S_q, D)`` tensor.

Forward: each program owns BLOCK_M query rows of one head and streams key/value blocks, keeping
a running max ``m``, running sum ``l`` and an fp32 output accumulator rescaled as ``m`` grows;
exponentials are base 2 (``exp2`` with ``log2(e)`` folded into the scale, one multiply fewer per
score).  The per-row log-sum-exp (natural log, fp32, ``(B, H, S_q)``) is saved for the backward.

Backward: ``delta = rowsum(dO * O)``, then one kernel per key block computes ``dK`` and ``dV``
(looping over the query blocks of every query head in its group, so GQA needs no atomics) and one
kernel per query block computes ``dQ``.  Both recompute ``P = exp(QK^T * scale - lse)`` tile by
tile from the saved log-sum-exp.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _interpreter, _utils
from ._dispatch import use_triton

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


def _fwd_configs():
    # (BLOCK_M, BLOCK_N, num_stages, num_warps): tutorial-06-like; 128-row tiles with 8 warps for
    # long sequences, 64-row tiles for short ones and head_dim 128 under shared-memory pressure.
    shapes = [(128, 64, 3, 8), (128, 64, 4, 8), (128, 128, 3, 8), (128, 32, 4, 4),
              (64, 64, 3, 4), (64, 64, 4, 4), (128, 64, 3, 4), (64, 32, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s, num_warps=w) for m, n, s, w in shapes]


def _bwd_configs():
    shapes = [(64, 64, 2, 4), (64, 64, 3, 4), (32, 64, 3, 4), (64, 128, 2, 8), (128, 64, 2, 8), (32, 128, 2, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s, num_warps=w) for m, n, s, w in shapes]


def _fwd_shared_memory(config, dtype_bytes, args):
    # Upper bound: num_stages buffers of a K and a V tile plus the Q tile, at the padded head dim.
    kw, d = config.kwargs, args["BLOCK_D"]
    return (config.num_stages * 2 * kw["BLOCK_N"] + kw["BLOCK_M"]) * d * dtype_bytes


def _dkdv_shared_memory(config, dtype_bytes, args):
    # The K and V tiles stay; Q and dO tiles (and fp32 lse, delta) stream through num_stages buffers.
    kw, d, s = config.kwargs, args["BLOCK_D"], config.num_stages
    return (2 * kw["BLOCK_N"] + s * 2 * kw["BLOCK_M"]) * d * dtype_bytes + s * 2 * kw["BLOCK_M"] * 4 + 1024


def _dq_shared_memory(config, dtype_bytes, args):
    # The Q and dO tiles stay; K and V tiles stream through num_stages buffers.
    kw, d = config.kwargs, args["BLOCK_D"]
    return (2 * kw["BLOCK_M"] + config.num_stages * 2 * kw["BLOCK_N"]) * d * dtype_bytes


# Register rules, from the sm_90 float16 compile reports (bench/compile_reports): configs outside
# them spill (8 B to 1.5 KB of spill stores).  The compile check fails if a kept one spills.
def _fwd_fits_registers(config, args):
    # the output accumulator: BLOCK_M x BLOCK_D fp32 over the program's threads
    kw = config.kwargs
    return kw["BLOCK_M"] * args["BLOCK_D"] // (32 * config.num_warps) < 128


# dK/dV holds two BLOCK_N x BLOCK_D fp32 accumulators plus the K and V tiles, and recomputes
# transposed score tiles: at head dim 128 only the smallest tile stays in registers.
_DKDV_NO_SPILL = {64: {(32, 64, 3, 4), (64, 128, 2, 8), (64, 64, 2, 4), (64, 64, 3, 4)}}


def _dkdv_fits_registers(config, args):
    kw, d = config.kwargs, args["BLOCK_D"]
    allowed = _DKDV_NO_SPILL.get(d, {(32, 64, 3, 4)}) if d >= 64 else None
    return allowed is None or (kw["BLOCK_M"], kw["BLOCK_N"], config.num_stages, config.num_warps) in allowed


def _dq_fits_registers(config, args):
    # K and V tiles of 128 keys at head dim >= 128 spill
    return config.kwargs["BLOCK_N"] < 128 or args["BLOCK_D"] < 128


# Sequence lengths in power-of-two buckets (a new prompt length reuses a tuned config); head dim exact.
_BUCKETED = ["S_Q", "S_K"]

# Interpreted programs cost ~1 ms each, so one big tile covers a whole short test sequence.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64})


@_interpreter.autotune(_fwd_configs(), key=["S_Q", "S_K", "HEAD_DIM", "CAUSAL"], interpreter_config=_INTERPRETER_CONFIG,
                       bucketed=_BUCKETED, shared_memory=_fwd_shared_memory, keep=_fwd_fits_registers)
@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_om, s_od,
    H, GROUP, S_Q, S_K, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    kvh = h // GROUP  # grouped-query attention: GROUP query heads share one K/V head
    offs_m = start_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM  # head dims like 80 or 96 are padded to BLOCK_D and masked
    m_mask = offs_m < S_Q

    q = tl.load(
        q_ptr + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
        mask=m_mask[:, None] & d_mask[None, :], other=0.0,
    )
    k_base = k_ptr + b * s_kb + kvh * s_kh
    v_base = v_ptr + b * s_vb + kvh * s_vh
    if DOT_F32:
        q = q.to(tl.float32)
    qk_scale = sm_scale * _LOG2E  # scores in base-2 units, so exp2 replaces exp

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = S_K
    if CAUSAL:
        # Key blocks entirely to the right of this query block are fully masked: skip them.
        hi = tl.minimum(S_K, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < S_K
        kT = tl.load(
            k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd, mask=n_mask[None, :] & d_mask[:, None], other=0.0
        )
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=n_mask[:, None] & d_mask[None, :],
                    other=0.0)
        if DOT_F32:
            kT = kT.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        valid = n_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        # Every row sees key 0 in its first block (causal or not), so m_new is finite from the
        # first iteration on and the rescaling never computes exp2(-inf - -inf).
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(
        o_ptr + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od, acc,
        mask=m_mask[:, None] & d_mask[None, :],
    )
    # Natural-log log-sum-exp of each row's scaled scores, for the backward pass.
    tl.store(lse_ptr + bh * S_Q + offs_m, (m_i + tl.log2(l_i)) * _LN2, mask=m_mask)


@triton.jit
def _attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr, s_ob, s_oh, s_om, s_od, s_db, s_dh, s_dm, s_dd, H, S_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the row term of the softmax gradient.
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = start_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < S_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(o_ptr + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od, mask=mask, other=0.0)
    do = tl.load(do_ptr + b * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + bh * S_Q + offs_m, delta, mask=offs_m < S_Q)


@_interpreter.autotune(_bwd_configs(), key=["S_Q", "S_K", "HEAD_DIM", "CAUSAL", "GROUP"],
                       interpreter_config=_INTERPRETER_CONFIG, bucketed=_BUCKETED, shared_memory=_dkdv_shared_memory,
                       keep=_dkdv_fits_registers)
@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dm, s_dd, s_dkb, s_dkh, s_dkn, s_dkd, s_dvb, s_dvh, s_dvn, s_dvd,
    H_KV, GROUP, S_Q, S_K, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (key block, batch, kv head): dK and dV of these keys are complete after
    # visiting every query of every head in the group, so each is written once, without atomics.
    start_n = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // H_KV
    kvh = bkv % H_KV
    H = H_KV * GROUP
    offs_n = start_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    n_mask = offs_n < S_K
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + b * s_kb + kvh * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask,
                other=0.0)
    v = tl.load(v_ptr + b * s_vb + kvh * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask,
                other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk_scale = sm_scale * _LOG2E
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    lo = 0
    if CAUSAL:
        # Query blocks that end before this key block starts cannot see any of its keys.
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        q_base = q_ptr + b * s_qb + h * s_qh
        do_base = do_ptr + b * s_db + h * s_dh
        row_base = (b * H + h) * S_Q
        for start_m in range(lo, S_Q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_mask = offs_m < S_Q
            q_mask = m_mask[:, None] & d_mask[None, :]
            q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd, mask=q_mask, other=0.0)
            if DOT_F32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            # Padded query rows get lse = +inf, so their probabilities are exactly 0.
            lse = tl.load(lse_ptr + row_base + offs_m, mask=m_mask, other=float("inf")) * _LOG2E
            delta = tl.load(delta_ptr + row_base + offs_m, mask=m_mask, other=0.0)
            # Work on transposed tiles (keys x queries) so dK and dV come out of plain dots.
            sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            pT = tl.exp2(sT - lse[None, :])
            valid = m_mask[None, :] & n_mask[:, None]
            if CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :])
            pT = tl.where(valid, pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(dk_ptr + b * s_dkb + kvh * s_dkh + offs_n[:, None] * s_dkn + offs_d[None, :] * s_dkd, dk, mask=kv_mask)
    tl.store(dv_ptr + b * s_dvb + kvh * s_dvh + offs_n[:, None] * s_dvn + offs_d[None, :] * s_dvd, dv, mask=kv_mask)


@_interpreter.autotune(_bwd_configs(), key=["S_Q", "S_K", "HEAD_DIM", "CAUSAL", "GROUP"],
                       interpreter_config=_INTERPRETER_CONFIG, bucketed=_BUCKETED, shared_memory=_dq_shared_memory,
                       keep=_dq_fits_registers)
@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dm, s_dd, s_dqb, s_dqh, s_dqm, s_dqd,
    H, GROUP, S_Q, S_K, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (query block, batch, head), streaming key blocks like the forward.
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    offs_m = start_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < S_Q
    q_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + b * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd, mask=q_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + bh * S_Q + offs_m, mask=m_mask, other=float("inf")) * _LOG2E
    delta = tl.load(delta_ptr + bh * S_Q + offs_m, mask=m_mask, other=0.0)
    k_base = k_ptr + b * s_kb + kvh * s_kh
    v_base = v_ptr + b * s_vb + kvh * s_vh
    qk_scale = sm_scale * _LOG2E
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = S_K
    if CAUSAL:
        hi = tl.minimum(S_K, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < S_K
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        valid = n_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(dq_ptr + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd, dq, mask=q_mask)


# ----------------------------------------------------------------------------------------------
# Launchers (shared with qkv_attention, which passes strided views of its merged buffers)
# ----------------------------------------------------------------------------------------------


def _precision(dtype):
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def _block_d(D):
    return max(16, triton.next_power_of_2(D))  # tl.dot needs an inner dimension of at least 16


def attention_fwd(q, k, v, o, causal: bool, scale: float) -> torch.Tensor:
    """Write attention of (B, H, S, D) views q, k, v into the view ``o``; return lse (B, H, S_q)."""
    B, H, S_Q, D = q.shape
    H_KV, S_K = k.shape[1], k.shape[2]
    lse = torch.empty((B, H, S_Q), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return lse
    common = dict(
        HEAD_DIM=D, BLOCK_D=_block_d(D), CAUSAL=causal, PRECISION=_precision(q.dtype),
        DOT_F32=_interpreter.dot_in_fp32(q.dtype),
    )
    grid = lambda meta: (triton.cdiv(S_Q, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, H // H_KV, S_Q, S_K, scale, **common,
    )
    return lse


def attention_bwd(q, k, v, o, lse, do, dq, dk, dv, causal: bool, scale: float) -> None:
    """Write the gradients of attention into the (possibly strided) views dq, dk, dv."""
    B, H, S_Q, D = q.shape
    H_KV, S_K = k.shape[1], k.shape[2]
    if q.numel() == 0 or k.numel() == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return
    block_d = _block_d(D)
    delta = torch.empty((B, H, S_Q), dtype=torch.float32, device=q.device)
    pre_block = 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(S_Q, pre_block), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, S_Q, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_block,
    )
    common = dict(
        HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=causal, PRECISION=_precision(q.dtype),
        DOT_F32=_interpreter.dot_in_fp32(q.dtype),
    )
    group = H // H_KV
    grid_kv = lambda meta: (triton.cdiv(S_K, meta["BLOCK_N"]), B * H_KV)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, do, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        *dk.stride(), *dv.stride(), H_KV, group, S_Q, S_K, scale, **common,
    )
    grid_q = lambda meta: (triton.cdiv(S_Q, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](
        q, k, v, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, group, S_Q, S_K, scale, **common,
    )


def _fwd(q, k, v, causal, scale):
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = attention_fwd(q, k, v, o, causal, scale)
    return o, lse


def _bwd(do, q, k, v, o, lse, causal, scale):
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    attention_bwd(q, k, v, o, lse, do, dq, dk, dv, causal, scale)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# PyTorch fallback (materialises the S x S scores: for CPU use without Triton, not for scale)
# ----------------------------------------------------------------------------------------------


def _scores(q, k, causal, scale, dtype=torch.float32):
    group = q.shape[1] // k.shape[1]
    kf = k.to(dtype).repeat_interleave(group, dim=1)
    s = (q.to(dtype) @ kf.transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s


def torch_attention_fwd(q, k, v, causal, scale):
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    vf = v.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (p @ vf).to(q.dtype).contiguous(), lse


def torch_attention_bwd(do, q, k, v, o, lse, causal, scale):
    # The CPU fallback recomputes attention in float64 and rounds each gradient once: when
    # the softmax is peaked, a float32 backward loses digits (PyTorch's own included), and
    # a fallback that materialises S x S anyway has no reason to accept that.  ``o`` and
    # ``lse`` are not needed.
    group = q.shape[1] // k.shape[1]
    f64 = torch.float64
    p = torch.softmax(_scores(q, k, causal, scale, f64), dim=-1)
    dof = do.to(f64)
    vf = v.to(f64).repeat_interleave(group, dim=1)
    kf = k.to(f64).repeat_interleave(group, dim=1)
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ q.to(f64)) * scale

    def fold(t):  # sum the gradients of the query heads that share one K/V head
        B, _, S, D = t.shape
        return t.reshape(B, k.shape[1], group, S, D).sum(2)

    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


# ----------------------------------------------------------------------------------------------
# Custom op registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("pycomm_kernels::flash_attention", mutates_args=())
def _flash_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return _fwd(q, k, v, causal, scale)
    return torch_attention_fwd(q, k, v, causal, scale)


@_flash_attention_op.register_fake
def _(q, k, v, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("pycomm_kernels::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return _bwd(do, q, k, v, o, lse, causal, scale)
    return torch_attention_bwd(do, q, k, v, o, lse, causal, scale)


@_flash_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.mark_non_differentiable(lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, do, _glse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attention_bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

MAX_HEAD_DIM = 256


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale=None) -> torch.Tensor:
    """Exact attention like ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
    enable_gqa=True)`` (see the module docstring)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _utils.check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    _utils.check_same(("q", "k", "v"), (q, k, v))
    B, H, S_Q, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head_dim")
    H_KV = k.shape[1]
    if H_KV == 0 or H % H_KV != 0:
        raise ValueError(
            f"q has {H} heads and k/v have {H_KV}: the query heads must be a multiple of the key/value heads"
        )
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {D} is not supported; use 1..{MAX_HEAD_DIM}")
    if k.shape[2] == 0 and S_Q > 0:
        raise ValueError("k and v have 0 keys: attention over an empty sequence is undefined")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return _flash_attention_op(q, k, v, bool(causal), scale)[0]
