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

from . import _dispatch, _interpreter, _tuning, _utils, flash_attention_tma
from ._activations import _tanh
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
    shapes = [(64, 64, 2, 4), (64, 64, 3, 4), (32, 64, 3, 4), (64, 128, 2, 8), (128, 64, 2, 8), (32, 128, 2, 4),
              (32, 64, 2, 4), (32, 32, 2, 4), (32, 32, 3, 4), (16, 64, 2, 4)]
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


# Register rules, from the sm_90 and sm_80 float16 compile reports (bench/compile_reports):
# configs outside them spill (8 B to 1.5 KB of spill stores).  The compile check fails if a kept
# one spills.  Ampere (arch < 90: no wgmma, every dot accumulates in the threads' registers)
# spills in a few tiles that Hopper keeps clean: _PRE_HOPPER_SPILLS, (head dim, config) pairs.
_PRE_HOPPER_SPILLS = {
    "fwd": {(64, (128, 64, 3, 4))},  # 8 B on sm_80
    "dkdv": {(64, (64, 128, 2, 8))},  # 60 B
    "dq": {(64, (64, 128, 2, 8)), (128, (128, 64, 2, 8))},  # 152 B, 24 B
}


def _shape(config):
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], config.num_stages, config.num_warps


def _pre_hopper_spill(kernel, config, args, arch):
    return arch is not None and arch < 90 and (args["BLOCK_D"], _shape(config)) in _PRE_HOPPER_SPILLS[kernel]


def _fwd_fits_registers(config, args, arch=None):
    # the output accumulator: BLOCK_M x BLOCK_D fp32 over the program's threads
    kw = config.kwargs
    if args["BLOCK_D"] >= 128 and kw["BLOCK_M"] * kw["BLOCK_N"] >= 128 * 128:
        return False  # with the mask variants' index math, the 128x128 score tile spills 60 B at d=128
    if _pre_hopper_spill("fwd", config, args, arch):
        return False
    return kw["BLOCK_M"] * args["BLOCK_D"] // (32 * config.num_warps) < 128


# dK/dV holds two BLOCK_N x BLOCK_D fp32 accumulators plus the K and V tiles, and recomputes
# transposed score tiles: at head dim 128 only the smallest tile stays in registers.
# 64x64 tiles at d=64 and every 32x64 or larger tile at d=128 spill (20-856 B) since the mask
# variants' index math came in; 32x32 tiles at d=128 compile clean (16x64 too on triton 3.9, but
# it spills 12 B on 3.6, the GPU image's).  flash_attention_tma's dK/dV kernel keeps more.
_DKDV_NO_SPILL = {64: {(32, 64, 3, 4), (64, 128, 2, 8)}, 128: {(32, 32, 2, 4), (32, 32, 3, 4)}}


def _dkdv_fits_registers(config, args, arch=None):
    d = args["BLOCK_D"]
    allowed = _DKDV_NO_SPILL.get(d, {(32, 64, 3, 4)}) if d >= 64 else None
    return (allowed is None or _shape(config) in allowed) and not _pre_hopper_spill("dkdv", config, args, arch)


def _dq_fits_registers(config, args, arch=None):
    # K and V tiles of 128 keys at head dim >= 128 spill
    fits = config.kwargs["BLOCK_N"] < 128 or args["BLOCK_D"] < 128
    return fits and not _pre_hopper_spill("dq", config, args, arch)


# Sequence lengths in power-of-two buckets (a new prompt length reuses a tuned config); head dim exact.
_BUCKETED = ["S_Q", "S_K"]

# Interpreted programs cost ~1 ms each, so one big tile covers a whole short test sequence.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64})


# Every mask variant is a tl.constexpr flag (flash-attn's rotary style): the plain causal/full
# kernels compile without a single extra instruction, and each variant gets straight-line code
# instead of runtime branches in the innermost loop.
#   VARLEN:       sequence b's rows start at cu_q[b] / cu_k[b] of a packed (total, H, D) tensor and
#                 its lengths come from the same arrays (the batch strides are then 0).
#   BOTTOM_RIGHT: query i sits at key position i + (S_k - S_q) instead of i.
#   HAS_WINDOW:   query at position p sees keys j with p - j < WINDOW (and j - p < WINDOW if not
#                 causal).
#   HAS_KPM:      a (B, S_k) uint8 key-padding mask, nonzero = attend.
#   SOFTCAP:      scores -> softcap * tanh(scores / softcap).
# A row that sees no key keeps m = -inf; the rescaling uses a shift of 0 there (no -inf - -inf),
# its output is 0 and its log-sum-exp is stored as +inf so the backward's exp(s - lse) is 0 too.
_KEY_FWD = ["S_Q", "S_K", "HEAD_DIM", "CAUSAL", "VARLEN", "HAS_WINDOW"]
_KEY_BWD = _KEY_FWD + ["GROUP"]


@triton.jit
def _seq_bounds(cu_q_ptr, cu_k_ptr, b, S_Q, S_K, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr):
    """(first q row, q length, first k row, k length, offset of query positions) of sequence b."""
    if VARLEN:
        q_start = tl.load(cu_q_ptr + b).to(tl.int64)
        seq_q = tl.load(cu_q_ptr + b + 1).to(tl.int64) - q_start
        k_start = tl.load(cu_k_ptr + b).to(tl.int64)
        seq_k = tl.load(cu_k_ptr + b + 1).to(tl.int64) - k_start
    else:
        q_start = b * 0
        seq_q = q_start + S_Q
        k_start = b * 0
        seq_k = k_start + S_K
    if BOTTOM_RIGHT:
        offset = seq_k - seq_q
    else:
        offset = b * 0
    return q_start, seq_q, k_start, seq_k, offset


@triton.jit
def _visible(offs_q, offs_k, offset, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Which (query, key) pairs of the broadcast index tensors the causal/window rules allow."""
    pos = offs_q + offset
    ok = offs_k >= 0
    if CAUSAL:
        ok = ok & (offs_k <= pos)
    if HAS_WINDOW:
        ok = ok & (pos - offs_k < window)
        if not CAUSAL:
            ok = ok & (offs_k - pos < window)
    return ok


@triton.jit
def _key_range(start_m, seq_k, offset, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[lo, hi) of the key blocks that queries start_m*BLOCK_M .. +BLOCK_M can see: blocks
    entirely outside the causal/window band are skipped, not just masked."""
    lo = seq_k * 0
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, (start_m + 1) * BLOCK_M + offset)
    if HAS_WINDOW:
        lo = tl.maximum(start_m * BLOCK_M + offset - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        if not CAUSAL:
            hi = tl.minimum(seq_k, (start_m + 1) * BLOCK_M + offset + window - 1)
    return lo, hi


@triton.jit
def _query_range(start_n, seq_q, offset, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[lo, hi) of the query rows that can see keys start_n*BLOCK_N .. +BLOCK_N."""
    lo = seq_q * 0
    hi = seq_q
    if CAUSAL:
        lo = tl.maximum(start_n * BLOCK_N - offset, 0)
    if HAS_WINDOW:
        hi = tl.minimum(seq_q, (start_n + 1) * BLOCK_N + window - 1 - offset)
        if not CAUSAL:
            lo = tl.maximum(start_n * BLOCK_N - offset - window + 1, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    return lo, hi


@_interpreter.autotune(_fwd_configs(), key=_KEY_FWD, interpreter_config=_INTERPRETER_CONFIG,
                       bucketed=_BUCKETED, shared_memory=_fwd_shared_memory, keep=_fwd_fits_registers)
@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, kpm_ptr, cu_q_ptr, cu_k_ptr,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_om, s_od,
    s_lb, s_lh, s_pb, H, GROUP, S_Q, S_K, sm_scale, window, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    kvh = h // GROUP  # grouped-query attention: GROUP query heads share one K/V head
    q_start, seq_q, k_start, seq_k, offset = _seq_bounds(cu_q_ptr, cu_k_ptr, b, S_Q, S_K, VARLEN, BOTTOM_RIGHT)
    offs_m = start_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM  # head dims like 80 or 96 are padded to BLOCK_D and masked
    m_mask = offs_m < seq_q

    q = tl.load(
        q_ptr + b * s_qb + h * s_qh + (q_start + offs_m)[:, None] * s_qm + offs_d[None, :] * s_qd,
        mask=m_mask[:, None] & d_mask[None, :], other=0.0,
    )
    k_base = k_ptr + b * s_kb + kvh * s_kh + k_start * s_kn
    v_base = v_ptr + b * s_vb + kvh * s_vh + k_start * s_vn
    if DOT_F32:
        q = q.to(tl.float32)
    qk_scale = sm_scale * _LOG2E  # scores in base-2 units, so exp2 replaces exp

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, hi = _key_range(start_m, seq_k, offset, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < seq_k
        kT = tl.load(
            k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd, mask=n_mask[None, :] & d_mask[:, None], other=0.0
        )
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=n_mask[:, None] & d_mask[None, :],
                    other=0.0)
        if DOT_F32:
            kT = kT.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kT, input_precision=PRECISION)
        if SOFTCAP:
            s = _tanh(s * (sm_scale / softcap)) * (softcap * _LOG2E)
        else:
            s = s * qk_scale
        valid = n_mask[None, :] & _visible(offs_m[:, None], offs_n[None, :], offset, window, CAUSAL, HAS_WINDOW)
        if HAS_KPM:
            keep = tl.load(kpm_ptr + b * s_pb + offs_n, mask=n_mask, other=0)
            valid = valid & (keep != 0)[None, :]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(
        o_ptr + b * s_ob + h * s_oh + (q_start + offs_m)[:, None] * s_om + offs_d[None, :] * s_od, acc,
        mask=m_mask[:, None] & d_mask[None, :],
    )
    # Natural-log log-sum-exp of each row's scaled scores, for the backward pass.
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("inf"))
    tl.store(lse_ptr + b * s_lb + h * s_lh + q_start + offs_m, lse, mask=m_mask)


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


@_interpreter.autotune(_bwd_configs(), key=_KEY_BWD,
                       interpreter_config=_INTERPRETER_CONFIG, bucketed=_BUCKETED, shared_memory=_dkdv_shared_memory,
                       keep=_dkdv_fits_registers)
@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, kpm_ptr, cu_q_ptr, cu_k_ptr,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dm, s_dd, s_dkb, s_dkh, s_dkn, s_dkd, s_dvb, s_dvh, s_dvn, s_dvd,
    s_lb, s_lh, s_pb, H_KV, GROUP, S_Q, S_K, sm_scale, window, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (key block, batch, kv head): dK and dV of these keys are complete after
    # visiting every query of every head in the group, so each is written once, without atomics.
    start_n = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // H_KV
    kvh = bkv % H_KV
    q_start, seq_q, k_start, seq_k, offset = _seq_bounds(cu_q_ptr, cu_k_ptr, b, S_Q, S_K, VARLEN, BOTTOM_RIGHT)
    offs_n = start_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    n_mask = offs_n < seq_k
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + b * s_kb + kvh * s_kh + (k_start + offs_n)[:, None] * s_kn + offs_d[None, :] * s_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * s_vb + kvh * s_vh + (k_start + offs_n)[:, None] * s_vn + offs_d[None, :] * s_vd,
                mask=kv_mask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    key_ok = n_mask
    if HAS_KPM:
        key_ok = key_ok & (tl.load(kpm_ptr + b * s_pb + offs_n, mask=n_mask, other=0) != 0)
    qk_scale = sm_scale * _LOG2E
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    lo, hi = _query_range(start_n, seq_q, offset, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        q_base = q_ptr + b * s_qb + h * s_qh + q_start * s_qm
        do_base = do_ptr + b * s_db + h * s_dh + q_start * s_dm
        row_base = b * s_lb + h * s_lh + q_start
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_mask = offs_m < seq_q
            q_mask = m_mask[:, None] & d_mask[None, :]
            q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd, mask=q_mask, other=0.0)
            if DOT_F32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            # Padded and fully masked query rows have lse = +inf, so their probabilities are 0.
            lse = tl.load(lse_ptr + row_base + offs_m, mask=m_mask, other=float("inf")) * _LOG2E
            delta = tl.load(delta_ptr + row_base + offs_m, mask=m_mask, other=0.0)
            # Work on transposed tiles (keys x queries) so dK and dV come out of plain dots.
            sT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
            if SOFTCAP:
                tT = _tanh(sT * (sm_scale / softcap))
                sT = tT * (softcap * _LOG2E)
            else:
                sT = sT * qk_scale
            pT = tl.exp2(sT - lse[None, :])
            valid = m_mask[None, :] & key_ok[:, None]
            valid = valid & _visible(offs_m[None, :], offs_n[:, None], offset, window, CAUSAL, HAS_WINDOW)
            pT = tl.where(valid, pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dsT = pT * (dpT - delta[None, :])
            if SOFTCAP:
                dsT = dsT * (1.0 - tT * tT)  # through softcap * tanh(x / softcap)
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(dk_ptr + b * s_dkb + kvh * s_dkh + (k_start + offs_n)[:, None] * s_dkn + offs_d[None, :] * s_dkd, dk,
             mask=kv_mask)
    tl.store(dv_ptr + b * s_dvb + kvh * s_dvh + (k_start + offs_n)[:, None] * s_dvn + offs_d[None, :] * s_dvd, dv,
             mask=kv_mask)


@_interpreter.autotune(_bwd_configs(), key=_KEY_BWD,
                       interpreter_config=_INTERPRETER_CONFIG, bucketed=_BUCKETED, shared_memory=_dq_shared_memory,
                       keep=_dq_fits_registers)
@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, kpm_ptr, cu_q_ptr, cu_k_ptr,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dm, s_dd, s_dqb, s_dqh, s_dqm, s_dqd,
    s_lb, s_lh, s_pb, H, GROUP, S_Q, S_K, sm_scale, window, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (query block, batch, head), streaming key blocks like the forward.
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    q_start, seq_q, k_start, seq_k, offset = _seq_bounds(cu_q_ptr, cu_k_ptr, b, S_Q, S_K, VARLEN, BOTTOM_RIGHT)
    offs_m = start_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < seq_q
    q_mask = m_mask[:, None] & d_mask[None, :]
    rows = q_start + offs_m
    q = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_qm + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + b * s_db + h * s_dh + rows[:, None] * s_dm + offs_d[None, :] * s_dd, mask=q_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + b * s_lb + h * s_lh + rows, mask=m_mask, other=float("inf")) * _LOG2E
    delta = tl.load(delta_ptr + b * s_lb + h * s_lh + rows, mask=m_mask, other=0.0)
    k_base = k_ptr + b * s_kb + kvh * s_kh + k_start * s_kn
    v_base = v_ptr + b * s_vb + kvh * s_vh + k_start * s_vn
    qk_scale = sm_scale * _LOG2E
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, hi = _key_range(start_m, seq_k, offset, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < seq_k
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if SOFTCAP:
            t = _tanh(s * (sm_scale / softcap))
            s = t * (softcap * _LOG2E)
        else:
            s = s * qk_scale
        p = tl.exp2(s - lse[:, None])
        valid = n_mask[None, :] & _visible(offs_m[:, None], offs_n[None, :], offset, window, CAUSAL, HAS_WINDOW)
        if HAS_KPM:
            keep = tl.load(kpm_ptr + b * s_pb + offs_n, mask=n_mask, other=0)
            valid = valid & (keep != 0)[None, :]
        p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(dq_ptr + b * s_dqb + h * s_dqh + rows[:, None] * s_dqm + offs_d[None, :] * s_dqd, dq, mask=q_mask)


# ----------------------------------------------------------------------------------------------
# Launchers (shared with qkv_attention, which passes strided views of its merged buffers)
# ----------------------------------------------------------------------------------------------


def _block_d(D):
    return max(16, triton.next_power_of_2(D))  # tl.dot needs an inner dimension of at least 16


class _Masks:
    """The mask arguments of one call, as the kernels take them.

    Dense: q/k/v/o are (B, H, S, D) views and lse is (B, H, S_q).  Varlen: they are (1, H, total, D)
    views of the packed tensors, ``B`` is the number of sequences, batch strides are 0 and lse is
    (H, total_q)."""

    def __init__(self, q, kpm=None, window=0, bottom_right=False, softcap=0.0, varlen=None):
        self.varlen = varlen
        self.kpm = kpm.contiguous().view(torch.uint8) if kpm is not None else None
        dummy = q  # stands in for absent pointers; the constexpr flags keep the kernels off them
        cu_q, cu_k = (varlen[0], varlen[1]) if varlen is not None else (dummy, dummy)
        self.ptrs = (self.kpm if self.kpm is not None else dummy, cu_q, cu_k)
        self.flags = dict(VARLEN=varlen is not None, BOTTOM_RIGHT=bool(bottom_right) or varlen is not None,
                          HAS_WINDOW=bool(window), HAS_KPM=kpm is not None, SOFTCAP=bool(softcap))
        self.window, self.softcap = int(window or 0), float(softcap or 1.0)
        self.s_pb = self.kpm.stride(0) if self.kpm is not None else 0
        # Only causal/full masks, bottom-right or not: what the Hopper family (flash_attention_tma) takes.
        self.plain = varlen is None and not window and kpm is None and not softcap

    def strides(self, t):
        st = list(t.stride())
        if self.varlen is not None:
            st[0] = 0
        return st

    def lse_strides(self, lse):
        return (0, lse.stride(0)) if self.varlen is not None else (lse.stride(0), lse.stride(1))


def _flags(D, dtype):
    """The constexprs every attention kernel of both families takes."""
    return dict(HEAD_DIM=D, BLOCK_D=_block_d(D), PRECISION=_utils.dot_precision(dtype),
                DOT_F32=_interpreter.dot_in_fp32(dtype))


# Which kernel family runs each bucket of attention shapes: the portable kernels above, or
# flash_attention_tma's where the masks and layouts allow (see _dispatch.VariantTuner).
_FWD_VARIANTS = _dispatch.VariantTuner("flash_attention_fwd")
_BWD_VARIANTS = _dispatch.VariantTuner("flash_attention_bwd")


def _variant_key(q, k, causal, masks):
    B, H, S_Q, D = q.shape
    return (_tuning.bucket(S_Q), _tuning.bucket(k.shape[2]), D, H // k.shape[1], causal, q.dtype,
            tuple(sorted(masks.flags.items())))


def attention_fwd(q, k, v, o, causal: bool, scale: float, masks: _Masks | None = None, lse=None) -> torch.Tensor:
    """Write attention of (B, H, S, D) views q, k, v into the view ``o``; return lse (B, H, S_q)."""
    masks = masks or _Masks(q)
    B, H, S_Q, D = q.shape
    H_KV, S_K = k.shape[1], k.shape[2]
    if masks.varlen is not None:
        B, S_Q, S_K = masks.varlen[0].numel() - 1, masks.varlen[2], masks.varlen[3]
    if lse is None:
        lse = torch.empty((B, H, S_Q), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return lse
    flags = _flags(D, q.dtype)

    def portable():
        grid = lambda meta: (triton.cdiv(S_Q, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attn_fwd_kernel[grid](
            q, k, v, o, lse, *masks.ptrs, *masks.strides(q), *masks.strides(k), *masks.strides(v), *masks.strides(o),
            *masks.lse_strides(lse), masks.s_pb, H, H // H_KV, S_Q, S_K, scale, masks.window, masks.softcap,
            CAUSAL=causal, **masks.flags, **flags,
        )

    candidates = {_dispatch.PORTABLE: portable}
    if masks.plain and _dispatch.hopper_capable(q) and flash_attention_tma.tma_ok(q, k, v, o):
        candidates[_dispatch.HOPPER] = lambda: flash_attention_tma.attention_fwd_tma(
            q, k, v, o, lse, causal, scale, masks.flags["BOTTOM_RIGHT"], flags)
    _FWD_VARIANTS.run(_variant_key(q, k, causal, masks), candidates)
    return lse


def attention_bwd(q, k, v, o, lse, do, dq, dk, dv, causal: bool, scale: float, masks: _Masks | None = None) -> None:
    """Write the gradients of attention into the (possibly strided) views dq, dk, dv."""
    masks = masks or _Masks(q)
    B, H, S_Q, D = q.shape
    H_KV, S_K = k.shape[1], k.shape[2]
    if q.numel() == 0 or k.numel() == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return
    block_d = _block_d(D)
    if masks.varlen is not None:
        B, S_Q, S_K = masks.varlen[0].numel() - 1, masks.varlen[2], masks.varlen[3]
        # (1, H, total, D) views: the row term for every packed row at once, laid out like lse.
        delta = (o[0].float() * do[0].float()).sum(-1)
    else:
        delta = torch.empty((B, H, S_Q), dtype=torch.float32, device=q.device)
        pre_block = 64
        _attn_bwd_preprocess_kernel[(triton.cdiv(S_Q, pre_block), B * H)](
            o, do, delta, *o.stride(), *do.stride(), H, S_Q, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_block,
        )
    flags = _flags(D, q.dtype)
    common = dict(CAUSAL=causal, **masks.flags, **flags)
    group = H // H_KV
    st = masks.strides
    tail = (*masks.lse_strides(lse), masks.s_pb)

    def portable():
        grid_kv = lambda meta: (triton.cdiv(S_K, meta["BLOCK_N"]), B * H_KV)  # noqa: E731
        _attn_bwd_dkdv_kernel[grid_kv](
            q, k, v, do, lse, delta, dk, dv, *masks.ptrs, *st(q), *st(k), *st(v), *st(do), *st(dk), *st(dv),
            *tail, H_KV, group, S_Q, S_K, scale, masks.window, masks.softcap, **common,
        )
        grid_q = lambda meta: (triton.cdiv(S_Q, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attn_bwd_dq_kernel[grid_q](
            q, k, v, do, lse, delta, dq, *masks.ptrs, *st(q), *st(k), *st(v), *st(do), *st(dq),
            *tail, H, group, S_Q, S_K, scale, masks.window, masks.softcap, **common,
        )

    candidates = {_dispatch.PORTABLE: portable}
    if (masks.plain and lse.is_contiguous() and _dispatch.hopper_capable(q)
            and flash_attention_tma.tma_ok(q, k, v, do, dq, dk, dv)):
        candidates[_dispatch.HOPPER] = lambda: flash_attention_tma.attention_bwd_tma(
            q, k, v, do, lse, delta, dq, dk, dv, causal, scale, masks.flags["BOTTOM_RIGHT"], flags)
    _BWD_VARIANTS.run(_variant_key(q, k, causal, masks), candidates)


def _fwd(q, k, v, causal, scale, kpm=None, window=0, bottom_right=False, softcap=0.0):
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = attention_fwd(q, k, v, o, causal, scale, _Masks(q, kpm, window, bottom_right, softcap))
    return o, lse


def _bwd(do, q, k, v, o, lse, causal, scale, kpm=None, window=0, bottom_right=False, softcap=0.0):
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    attention_bwd(q, k, v, o, lse, do, dq, dk, dv, causal, scale, _Masks(q, kpm, window, bottom_right, softcap))
    return dq, dk, dv


def _packed(t):
    return t.transpose(0, 1).unsqueeze(0)  # (total, H, D) -> (1, H, total, D) view


def _varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap):
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    masks = _Masks(q, None, window, True, softcap, varlen=(cu_q, cu_k, max_q, max_k))
    attention_fwd(_packed(q), _packed(k), _packed(v), _packed(o), causal, scale, masks, lse=lse)
    return o, lse


def _varlen_bwd(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap):
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    masks = _Masks(q, None, window, True, softcap, varlen=(cu_q, cu_k, max_q, max_k))
    attention_bwd(_packed(q), _packed(k), _packed(v), _packed(o), lse, _packed(do), _packed(dq), _packed(dk),
                  _packed(dv), causal, scale, masks)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# PyTorch fallback (materialises the S x S scores: for CPU use without Triton, not for scale)
# ----------------------------------------------------------------------------------------------


def _keep(S_Q, S_K, causal, window, bottom_right, device):
    """(S_q, S_k) bool: which keys each query may see, or None when all of them."""
    if not causal and not window:
        return None
    offset = S_K - S_Q if bottom_right else 0
    i = torch.arange(S_Q, device=device)[:, None] + offset  # query position aligned to key positions
    j = torch.arange(S_K, device=device)[None, :]
    keep = torch.ones(S_Q, S_K, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= i
    if window:
        keep &= i - j < window
        if not causal:
            keep &= j - i < window
    return keep


def _scores(q, k, causal, scale, dtype=torch.float32, kpm=None, window=0, bottom_right=False, softcap=0.0):
    """Masked (and softcapped) scores, and tanh(raw / softcap) for the softcap derivative."""
    group = q.shape[1] // k.shape[1]
    kf = k.to(dtype).repeat_interleave(group, dim=1)
    s = (q.to(dtype) @ kf.transpose(-1, -2)) * scale
    t = None
    if softcap:
        t = torch.tanh(s / softcap)
        s = t * softcap
    keep = _keep(q.shape[2], k.shape[2], causal, window, bottom_right, q.device)
    if kpm is not None:
        pad = kpm[:, None, None, :]
        keep = pad if keep is None else keep & pad
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s, t


def _softmax(s):
    """softmax and log-sum-exp of masked scores; a fully masked row gets p = 0 and lse = +inf
    (so a recomputed exp(s - lse) is 0 there too), instead of NaN."""
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)
    lse = torch.where(empty, float("inf"), lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])
    return p, lse


def torch_attention_fwd(q, k, v, causal, scale, kpm=None, window=0, bottom_right=False, softcap=0.0):
    s, _ = _scores(q, k, causal, scale, kpm=kpm, window=window, bottom_right=bottom_right, softcap=softcap)
    p, lse = _softmax(s)
    vf = v.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (p @ vf).to(q.dtype).contiguous(), lse


def torch_attention_bwd(do, q, k, v, o, lse, causal, scale, kpm=None, window=0, bottom_right=False, softcap=0.0):
    # The CPU fallback recomputes attention in float64 and rounds each gradient once: when
    # the softmax is peaked, a float32 backward loses digits (PyTorch's own included), and
    # a fallback that materialises S x S anyway has no reason to accept that.  ``o`` and
    # ``lse`` are not needed.
    group = q.shape[1] // k.shape[1]
    f64 = torch.float64
    s, t = _scores(q, k, causal, scale, f64, kpm=kpm, window=window, bottom_right=bottom_right, softcap=softcap)
    p, _ = _softmax(s)
    dof = do.to(f64)
    vf = v.to(f64).repeat_interleave(group, dim=1)
    kf = k.to(f64).repeat_interleave(group, dim=1)
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    if t is not None:
        ds = ds * (1.0 - t * t)  # through softcap(x) = c tanh(x / c)
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ q.to(f64)) * scale

    def fold(x):  # sum the gradients of the query heads that share one K/V head
        B, _, S, D = x.shape
        return x.reshape(B, k.shape[1], group, S, D).sum(2)

    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


def _varlen_seqs(cu_q, cu_k):
    return list(zip(cu_q.tolist()[:-1], cu_q.tolist()[1:], cu_k.tolist()[:-1], cu_k.tolist()[1:]))


def _seq(t, lo, hi):
    return t[lo:hi].transpose(0, 1).unsqueeze(0)  # (total, H, D) rows -> (1, H, S, D)


def torch_varlen_fwd(q, k, v, cu_q, cu_k, causal, scale, window, softcap):
    o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)
    for ql, qh, kl, kh in _varlen_seqs(cu_q, cu_k):
        if qh == ql:
            continue
        if kh == kl:  # no keys: output 0, like a fully masked row
            continue
        os_, ls = torch_attention_fwd(_seq(q, ql, qh), _seq(k, kl, kh), _seq(v, kl, kh), causal, scale,
                                      window=window, bottom_right=True, softcap=softcap)
        o[ql:qh] = os_[0].transpose(0, 1)
        lse[:, ql:qh] = ls[0]
    return o, lse


def torch_varlen_bwd(do, q, k, v, cu_q, cu_k, causal, scale, window, softcap):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for ql, qh, kl, kh in _varlen_seqs(cu_q, cu_k):
        if qh == ql or kh == kl:
            continue
        a, b, c = torch_attention_bwd(_seq(do, ql, qh), _seq(q, ql, qh), _seq(k, kl, kh), _seq(v, kl, kh), None,
                                      None, causal, scale, window=window, bottom_right=True, softcap=softcap)
        dq[ql:qh], dk[kl:kh], dv[kl:kh] = a[0].transpose(0, 1), b[0].transpose(0, 1), c[0].transpose(0, 1)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Custom op registration
# ----------------------------------------------------------------------------------------------
# Mask arguments travel as plain values: window 0 = no sliding window, softcap 0.0 = none.


@torch.library.custom_op("pycomm_kernels::flash_attention", mutates_args=())
def _flash_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None, causal: bool, scale: float,
    window: int, bottom_right: bool, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return _fwd(q, k, v, causal, scale, kpm, window, bottom_right, softcap)
    return torch_attention_fwd(q, k, v, causal, scale, kpm, window, bottom_right, softcap)


@_flash_attention_op.register_fake
def _(q, k, v, kpm, causal, scale, window, bottom_right, softcap):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("pycomm_kernels::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    kpm: torch.Tensor | None, causal: bool, scale: float, window: int, bottom_right: bool, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return _bwd(do, q, k, v, o, lse, causal, scale, kpm, window, bottom_right, softcap)
    return torch_attention_bwd(do, q, k, v, o, lse, causal, scale, kpm, window, bottom_right, softcap)


@_flash_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, kpm, causal, scale, window, bottom_right, softcap):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, causal, scale, window, bottom_right, softcap = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kpm)
    ctx.mark_non_differentiable(lse)
    ctx.args = (causal, scale, window, bottom_right, softcap)


def _backward(ctx, do, _glse):
    q, k, v, o, lse, kpm = ctx.saved_tensors
    dq, dk, dv = _flash_attention_bwd_op(do, q, k, v, o, lse, kpm, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("pycomm_kernels::flash_attention_varlen", mutates_args=())
def _varlen_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
    max_k: int, causal: bool, scale: float, window: int, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return _varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap)
    return torch_varlen_fwd(q, k, v, cu_q, cu_k, causal, scale, window, softcap)


@_varlen_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("pycomm_kernels::flash_attention_varlen_bwd", mutates_args=())
def _varlen_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, causal: bool, scale: float, window: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return _varlen_bwd(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap)
    return torch_varlen_bwd(do, q, k, v, cu_q, cu_k, causal, scale, window, softcap)


@_varlen_bwd_op.register_fake
def _(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
    ctx.mark_non_differentiable(lse)
    ctx.args = (max_q, max_k, causal, scale, window, softcap)


def _varlen_backward(ctx, do, _glse):
    q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _varlen_bwd_op(do, q, k, v, o, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_varlen_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

MAX_HEAD_DIM = 256
ALIGNMENTS = ("top_left", "bottom_right")


def _check_heads(q, k, v, layout):
    _utils.check_same(("q", "k", "v"), (q, k, v))
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    H, H_KV, D = q.shape[-2 if layout == "packed" else 1], k.shape[-2 if layout == "packed" else 1], q.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in head_dim")
    if H_KV == 0 or H % H_KV != 0:
        raise ValueError(
            f"q has {H} heads and k/v have {H_KV}: the query heads must be a multiple of the key/value heads"
        )
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {D} is not supported; use 1..{MAX_HEAD_DIM}")


def _check_options(causal, scale, sliding_window, softcap, D):
    if sliding_window is not None and (isinstance(sliding_window, bool) or int(sliding_window) != sliding_window
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window={sliding_window!r} must be a positive int W (query i sees key j "
                         "when i - j < W) or None for no window")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"softcap={softcap!r} must be a positive number (scores -> c*tanh(scores/c)) or None")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return bool(causal), scale, int(sliding_window or 0), float(softcap or 0.0)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale=None, *,
                    key_padding_mask: torch.Tensor | None = None, sliding_window: int | None = None,
                    causal_alignment: str = "top_left", softcap: float | None = None) -> torch.Tensor:
    """Exact attention like ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
    enable_gqa=True)`` (see the module docstring), plus what Hugging Face models need:

    * ``key_padding_mask``: ``(B, S_k)`` bool, True = attend (HF's ``attention_mask`` as bool);
    * ``sliding_window``: int ``W``: query ``i`` sees key ``j`` only when ``i - j < W`` (Mistral /
      HF semantics, positions aligned as below); without ``causal`` the window is two-sided
      (``|i - j| < W``);
    * ``causal_alignment``: ``"top_left"`` (SDPA's ``is_causal``: query ``i`` is key position ``i``)
      or ``"bottom_right"`` (flash-attn >= 2.1: the last query is the last key, for chunked
      prefill and decoding against a cache when ``S_q != S_k``);
    * ``softcap``: scores become ``c * tanh(scores / c)`` before the softmax (Gemma-2).

    A query row that can see no key gets a zero output (and zero gradients), not NaN.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _utils.check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    _check_heads(q, k, v, "bhsd")
    B, H, S_Q, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch")
    if k.shape[2] == 0 and S_Q > 0:
        raise ValueError("k and v have 0 keys: attention over an empty sequence is undefined")
    if causal_alignment not in ALIGNMENTS:
        raise ValueError(f"causal_alignment={causal_alignment!r} is not one of {ALIGNMENTS}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.shape != (B, k.shape[2]):
            raise ValueError(f"key_padding_mask must be a (batch, S_k) = ({B}, {k.shape[2]}) tensor with True = "
                             f"attend, got {getattr(key_padding_mask, 'shape', type(key_padding_mask).__name__)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q on {q.device}")
        key_padding_mask = key_padding_mask.to(torch.bool)
    causal, scale, window, cap = _check_options(causal, scale, sliding_window, softcap, D)
    return _flash_attention_op(q, k, v, key_padding_mask, causal, scale, window,
                               causal_alignment == "bottom_right", cap)[0]


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                           scale=None, *, sliding_window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """Attention over packed variable-length sequences, like ``flash_attn_varlen_func``.

    ``q`` is ``(total_q, H, D)``, ``k``/``v`` ``(total_k, H_kv, D)``; sequence ``b`` is rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k/v
    (int32 or int64, starting at 0, non-decreasing, ending at total).  ``max_seqlen_*`` bound the
    sequence lengths.  ``causal`` is bottom-right aligned per sequence (as flash-attn);
    ``sliding_window`` and ``softcap`` as in :func:`flash_attention`.  Returns ``(total_q, H, D)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _utils.check_tensor(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total_tokens, heads, head_dim), got shape {tuple(t.shape)}")
    _check_heads(q, k, v, "packed")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be a 1-D int32/int64 tensor of cumulative sequence lengths")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q on {q.device}; move it to q's device")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel() or cu_seqlens_q.numel() < 2:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number (>= 1) of sequences")
    # Every data-dependent check in one tensor, so a valid call costs one device sync, not six.
    lens_q, lens_k = cu_seqlens_q.diff(), cu_seqlens_k.diff()
    bad = torch.stack([
        (cu_seqlens_q[0] != 0) | (cu_seqlens_q[-1] != q.shape[0]) | (lens_q < 0).any(),
        (cu_seqlens_k[0] != 0) | (cu_seqlens_k[-1] != k.shape[0]) | (lens_k < 0).any(),
        (lens_q > max_seqlen_q).any() | (lens_k > max_seqlen_k).any(),
        ((lens_k == 0) & (lens_q > 0)).any(),
    ]).tolist()
    if bad[0] or bad[1]:
        name, total = ("cu_seqlens_q", q.shape[0]) if bad[0] else ("cu_seqlens_k", k.shape[0])
        raise ValueError(f"{name} must start at 0, never decrease and end at {total} (the packed length)")
    if bad[2]:
        raise ValueError(f"max_seqlen_q={max_seqlen_q} / max_seqlen_k={max_seqlen_k} are below the longest sequence "
                         f"({int(lens_q.max())} / {int(lens_k.max())}); pass the true maxima")
    if bad[3]:
        raise ValueError("a sequence has queries but 0 keys: attention over an empty sequence is undefined")
    causal, scale, window, cap = _check_options(causal, scale, sliding_window, softcap, q.shape[-1])
    cu_q, cu_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
    return _varlen_op(q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), causal, scale, window, cap)[0]
