"""The Hopper-native attention variant: flash_attention.py's forward and backward, reading and
writing every Q, K, V, O, dO, dQ, dK, dV tile through TMA tensor descriptors, with the causal
diagonal handled in its own stage (Triton tutorial 06).

Contract: as ``flash_attention.attention_fwd`` / ``attention_bwd`` for the plain masks -- full or
causal (top-left or bottom-right aligned), grouped-query attention, head dims 1 to 256 -- on
operands TMA can address (``tma_ok``: unit stride along the head dim, 16-byte aligned pointers
and strides).  Varlen, sliding windows, key-padding masks and softcapping stay with the portable
kernels, which also take every other layout.

What differs from the portable kernels:
* **Descriptors.**  The copy engine moves whole tiles into shared memory (``cp.async.bulk.tensor``
  on sm_90) instead of every thread computing addresses and masks.  A descriptor clips at the
  tensor's edges: rows past the sequence and columns past the head dim load as zeros and are
  dropped on store, so the loads carry no masks.
* **Two stages.**  The key blocks a query block sees entirely (below the causal diagonal, inside
  the sequence) run without any mask; only the few blocks on the diagonal or at the ragged end
  build one.  The portable kernel masks every block.  The backward splits the same way: in dK/dV
  the query blocks on a key block's diagonal are masked and those below it are not; a query row
  past the sequence needs no mask there, its log-sum-exp is +inf and its probabilities 0.
* **Fewer spills in dK/dV**: with no mask variants there is no per-element index math to keep
  live beside the two fp32 accumulators.
* **Longest first**: with a causal mask the forward and dQ grids start from the last query block
  (the one that sees the most keys), so the short blocks fill the tail instead of the long ones.

Chosen by ``flash_attention`` per autotune bucket: on an sm_90+ GPU both families are timed on the
first call of a bucket and the faster one is kept (``_dispatch.VariantTuner``;
``PYCOMM_KERNEL_VARIANT`` forces one).  The log-sum-exp it saves is the portable kernels' (natural
log, +inf for a row that sees no key), so either backward follows either forward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _interpreter, _utils

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


def _fwd_configs():
    # (BLOCK_M, BLOCK_N, num_stages, num_warps): tutorial 06's Hopper set.
    shapes = [(128, 64, 3, 8), (128, 128, 3, 8), (128, 64, 4, 8), (128, 32, 3, 4), (64, 64, 3, 4), (64, 128, 2, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s, num_warps=w) for m, n, s, w in shapes]


def _dkdv_configs():
    # BLOCK_M: query rows streamed, BLOCK_N: the key rows a program owns (tutorial 06: 32 x 128).
    shapes = [(32, 128, 2, 8), (32, 64, 3, 4), (32, 64, 2, 4), (64, 64, 2, 4), (16, 64, 2, 4), (32, 32, 2, 4),
              (32, 64, 2, 8), (64, 64, 2, 8)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s, num_warps=w) for m, n, s, w in shapes]


def _dq_configs():
    # BLOCK_M: the query rows a program owns, BLOCK_N: key rows streamed (tutorial 06: 128 x 32).
    shapes = [(128, 32, 2, 8), (64, 32, 3, 4), (64, 64, 2, 4), (128, 64, 2, 8), (32, 32, 3, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s, num_warps=w) for m, n, s, w in shapes]


# Shared-memory upper bounds (checked against the compiler by bench/compile_check.py): the
# streamed tiles times num_stages, the tiles a program keeps, and the tile staged for a TMA store.
def _fwd_shared_memory(config, dtype_bytes, args):
    kw, d = config.kwargs, args["BLOCK_D"]
    return (config.num_stages * 2 * kw["BLOCK_N"] + 2 * kw["BLOCK_M"]) * d * dtype_bytes + 1024


def _dkdv_shared_memory(config, dtype_bytes, args):
    kw, d, s = config.kwargs, args["BLOCK_D"], config.num_stages
    return (4 * kw["BLOCK_N"] + s * 2 * kw["BLOCK_M"]) * d * dtype_bytes + s * 2 * kw["BLOCK_M"] * 4 + 2048


def _dq_shared_memory(config, dtype_bytes, args):
    kw, d = config.kwargs, args["BLOCK_D"]
    return (3 * kw["BLOCK_M"] + config.num_stages * 2 * kw["BLOCK_N"]) * d * dtype_bytes + 1024


def _fwd_fits_registers(config, args, arch=None):
    # the output accumulator, BLOCK_M x BLOCK_D fp32, over the program's threads
    kw = config.kwargs
    return kw["BLOCK_M"] * args["BLOCK_D"] // (32 * config.num_warps) < 128


# Register rules, from the sm_90 float16 compile reports (bench/compile_reports): the configs they
# keep compile without spills; the compile check fails if a kept one spills.
def _dkdv_fits_registers(config, args, arch=None):
    # Two BLOCK_N x BLOCK_D fp32 accumulators (dK, dV) beside the K and V tiles: at most 64 values
    # a thread, and 8 warps at head dim 128 (32x32 tiles with 4 warps spill 148 B there).
    kw, d = config.kwargs, args["BLOCK_D"]
    return 2 * kw["BLOCK_N"] * d // (32 * config.num_warps) <= 64 and (d < 128 or config.num_warps >= 8)


def _dq_fits_registers(config, args, arch=None):
    # the dQ accumulator, BLOCK_M x BLOCK_D fp32, over the program's threads
    kw = config.kwargs
    return kw["BLOCK_M"] * args["BLOCK_D"] // (32 * config.num_warps) <= 64


_KEY = ["S_Q", "S_K", "HEAD_DIM", "CAUSAL", "BOTTOM_RIGHT", "GROUP"]
_BUCKETED = ["S_Q", "S_K"]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64})


@triton.jit
def _desc(ptr, rows, HEAD_DIM: tl.constexpr, stride_row, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (rows, HEAD_DIM) descriptor at ``ptr`` read in (BLOCK_ROWS, BLOCK_D) tiles (zeros past the edges)."""
    return tl.make_tensor_descriptor(ptr, shape=[rows, HEAD_DIM], strides=[stride_row, 1],
                                     block_shape=[BLOCK_ROWS, BLOCK_D])


@triton.jit
def _longest_first(CAUSAL: tl.constexpr):
    """The query block of this program: with a causal mask the last blocks see the most keys, so
    they are launched first and the short ones fill the tail of the grid."""
    if CAUSAL:
        return tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        return tl.program_id(0)


@triton.jit
def _kv_tiles(k_desc, v_desc, start_n, DOT_F32: tl.constexpr):
    """The K and V tiles of the key block at start_n (fp32 when the interpreter needs it)."""
    k = k_desc.load([start_n, 0])
    v = v_desc.load([start_n, 0])
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _visible_keys(start_n, offs_m, offset, S_K, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """(queries x keys) mask of a masked-stage block: inside the sequence and, if causal, at or
    before the query's position."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    valid = (offs_n < S_K)[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + offset)
    return valid


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_desc, v_desc, lo, hi, offs_m, offset, S_K, qk_scale,
                CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The online softmax over key blocks [lo, hi); MASKED builds the bound/causal mask."""
    for start_n in range(lo, hi, BLOCK_N):
        k, v = _kv_tiles(k_desc, v_desc, start_n, DOT_F32)
        s = tl.dot(q, k.T, input_precision=PRECISION) * qk_scale
        if MASKED:
            s = tl.where(_visible_keys(start_n, offs_m, offset, S_K, CAUSAL, BLOCK_N), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row with no key yet: no -inf - -inf
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _diagonal_split(start_m, S_K, offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For query block start_m: (end of the key blocks every row sees whole, end of the visible keys)."""
    full_k = (S_K // BLOCK_N) * BLOCK_N  # key blocks inside the sequence
    if CAUSAL:
        # block [n, n + BLOCK_N) is whole for every row when n + BLOCK_N - 1 <= first row's position
        full = tl.minimum((tl.maximum(start_m * BLOCK_M + offset + 1, 0) // BLOCK_N) * BLOCK_N, full_k)
        hi = tl.minimum(S_K, tl.maximum((start_m + 1) * BLOCK_M + offset, 0))
    else:
        full = full_k
        hi = S_K
    return full, tl.maximum(hi, full)


@_interpreter.autotune(_fwd_configs(), key=_KEY, interpreter_config=_INTERPRETER_CONFIG, bucketed=_BUCKETED,
                       shared_memory=_fwd_shared_memory, keep=_fwd_fits_registers)
@triton.jit
def _attn_fwd_tma_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om,
    s_lb, s_lh, H, GROUP, S_Q, S_K, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = _longest_first(CAUSAL)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    offset = S_K - S_Q if BOTTOM_RIGHT else S_K * 0  # query i sits at key position i + offset
    q_desc = _desc(q_ptr + b * s_qb + h * s_qh, S_Q, HEAD_DIM, s_qm, BLOCK_M, BLOCK_D)
    k_desc = _desc(k_ptr + b * s_kb + kvh * s_kh, S_K, HEAD_DIM, s_kn, BLOCK_N, BLOCK_D)
    v_desc = _desc(v_ptr + b * s_vb + kvh * s_vh, S_K, HEAD_DIM, s_vn, BLOCK_N, BLOCK_D)
    o_desc = _desc(o_ptr + b * s_ob + h * s_oh, S_Q, HEAD_DIM, s_om, BLOCK_M, BLOCK_D)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = q_desc.load([start_m * BLOCK_M, 0])
    if DOT_F32:
        q = q.to(tl.float32)
    qk_scale = sm_scale * _LOG2E  # base-2 scores: exp2 replaces exp
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    full, hi = _diagonal_split(start_m, S_K, offset, BLOCK_M, BLOCK_N, CAUSAL)
    # stage 1: whole key blocks, no mask; stage 2: the diagonal and the ragged end, masked
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_desc, v_desc, 0, full, offs_m, offset, S_K, qk_scale,
                                CAUSAL, False, PRECISION, DOT_F32, BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_desc, v_desc, full, hi, offs_m, offset, S_K, qk_scale,
                                CAUSAL, True, PRECISION, DOT_F32, BLOCK_N)
    seen = l_i > 0.0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_desc.store([start_m * BLOCK_M, 0], acc.to(o_ptr.dtype.element_ty))
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("inf"))
    tl.store(lse_ptr + b * s_lb + h * s_lh + offs_m, lse, mask=offs_m < S_Q)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_desc, do_desc, lse_ptr, delta_ptr, lo, hi, offs_n, offset, S_Q, qk_scale,
                 CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """dK, dV of one key block from query blocks [lo, hi) of one head (transposed tiles: keys x queries)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = q_desc.load([start_m, 0])
        do = do_desc.load([start_m, 0])
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # rows past the sequence: lse = +inf, so their probabilities are 0 without a mask
        lse = tl.load(lse_ptr + offs_m, mask=offs_m < S_Q, other=float("inf")) * _LOG2E
        delta = tl.load(delta_ptr + offs_m, mask=offs_m < S_Q, other=0.0)
        pT = tl.exp2(tl.dot(k, q.T, input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            pT = tl.where(offs_n[:, None] <= offs_m[None, :] + offset, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dsT = pT * (tl.dot(v, do.T, input_precision=PRECISION) - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@_interpreter.autotune(_dkdv_configs(), key=_KEY, interpreter_config=_INTERPRETER_CONFIG, bucketed=_BUCKETED,
                       shared_memory=_dkdv_shared_memory, keep=_dkdv_fits_registers)
@triton.jit
def _attn_bwd_dkdv_tma_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dm, s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn,
    s_lb, s_lh, H_KV, GROUP, S_Q, S_K, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (key block, batch, kv head), visiting every query head of its group: each
    # dK, dV row is written once, without atomics.  Key rows past the sequence compute rows that
    # the clipped store drops.
    start_n = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // H_KV
    kvh = bkv % H_KV
    offset = S_K - S_Q if BOTTOM_RIGHT else S_K * 0
    n0 = start_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _desc(k_ptr + b * s_kb + kvh * s_kh, S_K, HEAD_DIM, s_kn, BLOCK_N, BLOCK_D).load([n0, 0])
    v = _desc(v_ptr + b * s_vb + kvh * s_vh, S_K, HEAD_DIM, s_vn, BLOCK_N, BLOCK_D).load([n0, 0])
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk_scale = sm_scale * _LOG2E
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if CAUSAL:
        # queries before n0 - offset see none of these keys; from the first row that sees the
        # block's last key on, every query block sees all of them
        lo = (tl.maximum(n0 - offset, 0) // BLOCK_M) * BLOCK_M
        full = tl.maximum(((tl.maximum(n0 + BLOCK_N - 1 - offset, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
    else:
        lo = n0 * 0
        full = lo
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        q_desc = _desc(q_ptr + b * s_qb + h * s_qh, S_Q, HEAD_DIM, s_qm, BLOCK_M, BLOCK_D)
        do_desc = _desc(do_ptr + b * s_db + h * s_dh, S_Q, HEAD_DIM, s_dm, BLOCK_M, BLOCK_D)
        row = b * s_lb + h * s_lh
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_desc, do_desc, lse_ptr + row, delta_ptr + row, lo,
                              tl.minimum(full, S_Q), offs_n, offset, S_Q, qk_scale, CAUSAL, True, PRECISION,
                              DOT_F32, BLOCK_M)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_desc, do_desc, lse_ptr + row, delta_ptr + row, full, S_Q, offs_n,
                              offset, S_Q, qk_scale, CAUSAL, False, PRECISION, DOT_F32, BLOCK_M)
    _desc(dk_ptr + b * s_dkb + kvh * s_dkh, S_K, HEAD_DIM, s_dkn, BLOCK_N, BLOCK_D).store(
        [n0, 0], (dk * sm_scale).to(dk_ptr.dtype.element_ty))
    _desc(dv_ptr + b * s_dvb + kvh * s_dvh, S_K, HEAD_DIM, s_dvn, BLOCK_N, BLOCK_D).store(
        [n0, 0], dv.to(dv_ptr.dtype.element_ty))


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_desc, v_desc, lo, hi, offs_m, offset, S_K, qk_scale,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
               BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k, v = _kv_tiles(k_desc, v_desc, start_n, DOT_F32)
        p = tl.exp2(tl.dot(q, k.T, input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible_keys(start_n, offs_m, offset, S_K, CAUSAL, BLOCK_N), p, 0.0)
        ds = p * (tl.dot(do, v.T, input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@_interpreter.autotune(_dq_configs(), key=_KEY, interpreter_config=_INTERPRETER_CONFIG, bucketed=_BUCKETED,
                       shared_memory=_dq_shared_memory, keep=_dq_fits_registers)
@triton.jit
def _attn_bwd_dq_tma_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dm, s_dqb, s_dqh, s_dqm,
    s_lb, s_lh, H, GROUP, S_Q, S_K, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (query block, batch, head), streaming key blocks in the forward's two stages.
    start_m = _longest_first(CAUSAL)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    offset = S_K - S_Q if BOTTOM_RIGHT else S_K * 0
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = _desc(q_ptr + b * s_qb + h * s_qh, S_Q, HEAD_DIM, s_qm, BLOCK_M, BLOCK_D).load([m0, 0])
    do = _desc(do_ptr + b * s_db + h * s_dh, S_Q, HEAD_DIM, s_dm, BLOCK_M, BLOCK_D).load([m0, 0])
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row = b * s_lb + h * s_lh
    lse = tl.load(lse_ptr + row + offs_m, mask=offs_m < S_Q, other=float("inf")) * _LOG2E
    delta = tl.load(delta_ptr + row + offs_m, mask=offs_m < S_Q, other=0.0)
    k_desc = _desc(k_ptr + b * s_kb + kvh * s_kh, S_K, HEAD_DIM, s_kn, BLOCK_N, BLOCK_D)
    v_desc = _desc(v_ptr + b * s_vb + kvh * s_vh, S_K, HEAD_DIM, s_vn, BLOCK_N, BLOCK_D)
    qk_scale = sm_scale * _LOG2E
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    full, hi = _diagonal_split(start_m, S_K, offset, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_blocks(dq, q, do, lse, delta, k_desc, v_desc, 0, full, offs_m, offset, S_K, qk_scale, CAUSAL, False,
                    PRECISION, DOT_F32, BLOCK_N)
    dq = _dq_blocks(dq, q, do, lse, delta, k_desc, v_desc, full, hi, offs_m, offset, S_K, qk_scale, CAUSAL, True,
                    PRECISION, DOT_F32, BLOCK_N)
    _desc(dq_ptr + b * s_dqb + h * s_dqh, S_Q, HEAD_DIM, s_dqm, BLOCK_M, BLOCK_D).store(
        [m0, 0], (dq * sm_scale).to(dq_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# Launchers (flash_attention.attention_fwd / attention_bwd call these when the variant is chosen)
# ----------------------------------------------------------------------------------------------


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether descriptors can address these (B, H, S, D) views: unit stride along D, the other
    strides and the base pointers 16-byte aligned."""
    for t in tensors:
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * es % 16 for s in t.stride()[:-1]):
            return False
    return True


def _strides3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def attention_fwd_tma(q, k, v, o, lse, causal: bool, scale: float, bottom_right: bool, flags: dict) -> None:
    """Forward into ``o`` and ``lse`` (B, H, S_q); ``flags`` carries HEAD_DIM, BLOCK_D, PRECISION, DOT_F32."""
    _utils.descriptor_scratch(q)
    B, H, S_Q, _ = q.shape
    H_KV, S_K = k.shape[1], k.shape[2]
    grid = lambda meta: (triton.cdiv(S_Q, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd_tma_kernel[grid](
        q, k, v, o, lse, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), lse.stride(0), lse.stride(1),
        H, H // H_KV, S_Q, S_K, scale, CAUSAL=causal, BOTTOM_RIGHT=bottom_right, **flags,
    )


def attention_bwd_tma(q, k, v, do, lse, delta, dq, dk, dv, causal: bool, scale: float, bottom_right: bool,
                      flags: dict) -> None:
    """dQ, dK, dV into the views ``dq``, ``dk``, ``dv`` from the forward's ``lse`` and ``delta`` (B, H, S_q)."""
    _utils.descriptor_scratch(q)
    B, H, S_Q, _ = q.shape
    H_KV, S_K = k.shape[1], k.shape[2]
    common = dict(CAUSAL=causal, BOTTOM_RIGHT=bottom_right, **flags)
    grid_kv = lambda meta: (triton.cdiv(S_K, meta["BLOCK_N"]), B * H_KV)  # noqa: E731
    _attn_bwd_dkdv_tma_kernel[grid_kv](
        q, k, v, do, lse, delta, dk, dv, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do),
        *_strides3(dk), *_strides3(dv), lse.stride(0), lse.stride(1), H_KV, H // H_KV, S_Q, S_K, scale, **common,
    )
    grid_q = lambda meta: (triton.cdiv(S_Q, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq_tma_kernel[grid_q](
        q, k, v, do, lse, delta, dq, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq),
        lse.stride(0), lse.stride(1), H, H // H_KV, S_Q, S_K, scale, **common,
    )
