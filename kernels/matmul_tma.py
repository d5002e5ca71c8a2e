"""The Hopper-native matmul variant: ``act(a @ b + bias)`` as a persistent kernel reading and
writing through TMA tensor descriptors (Triton tutorial 09), with matmul.py's fused epilogue.

Contract: as ``matmul.mm`` for the layouts TMA can address (``tma_ok``): ``a`` (M, K) with unit
stride along K or along M (``x.t()``, as the weight gradient ``x.T @ dy`` reads it), ``b`` (K, N)
with unit stride along N or along K (a transposed ``nn.Linear`` weight), 16-byte-aligned base
pointers and row strides, an output with unit stride along N.  So all three GEMMs of a linear
layer's forward and backward can run here.
Other layouts stay with the portable kernel (``matmul.mm``).

Why a separate kernel: descriptors let the copy engine move whole tiles into shared memory
(``cp.async.bulk.tensor`` on sm_90) instead of every thread computing addresses, and one
program per SM walking the tiles (grouped ordering as in matmul.py) overlaps one tile's
epilogue with the next one's loads.  No ``warp_specialize``: triton 3.9 documents it as
Blackwell-only and both 3.6 and 3.9 ignore it on sm_90.

Chosen by ``matmul.mm`` per autotune bucket: on an sm_90+ GPU both families are timed on the first
call of a bucket and the faster one is kept (``_dispatch.VariantTuner``; ``PYCOMM_KERNEL_VARIANT``
forces one).  Compiled for sm_90 by the compile check and tested in the interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _activations, _interpreter, _tuning, _utils

# Feature detection: a Triton without device-side descriptors keeps the portable kernel.
HAS_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")


def _configs():
    # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps): tutorial 09's Hopper set,
    # without 128x256x64 at 4 stages (262 KB: over the limit).
    shapes = [(128, 256, 64, 8, 3, 8), (128, 128, 64, 8, 4, 8), (128, 128, 64, 8, 3, 4), (64, 128, 64, 8, 4, 4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g}, num_stages=s, num_warps=w)
        for m, n, k, g, s, w in shapes
    ]


def _shared_memory(config, dtype_bytes, args):
    # num_stages buffers of the A and B tiles plus the output tile staged for the TMA store
    # (and the pre-activation tile when it is saved too).
    kw = config.kwargs
    tiles = (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * dtype_bytes
    out = kw["BLOCK_M"] * kw["BLOCK_N"] * dtype_bytes * (2 if args.get("SAVE_PREACT") else 1)
    return config.num_stages * tiles + out + 1024  # + barriers and alignment


@triton.jit
def _tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@_interpreter.autotune(
    configs=_configs(),
    key=["M", "N", "K", "ACTIVATION", "HAS_BIAS", "A_MMAJOR", "B_KMAJOR"], bucketed=["M"],
    shared_memory=_shared_memory,
    keep=_tuning.epilogue_fits_registers,
    interpreter_config=triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}),
)
@triton.jit
def _matmul_tma_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, z_ptr, M, N, K, stride_a, stride_b, stride_cm, NUM_PROGRAMS,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_PREACT: tl.constexpr, A_MMAJOR: tl.constexpr,
    B_KMAJOR: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Descriptors clip at the tensor's edges: ragged M, N and K need no masks (loads past
    # the edge read zeros, stores past it are dropped).
    if A_MMAJOR:  # a is a transposed (K, M) tensor: read (BLOCK_K, BLOCK_M) tiles and transpose
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[K, M], strides=[stride_a, 1], block_shape=[BLOCK_K, BLOCK_M])
    else:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_a, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_KMAJOR:  # b is a transposed (N, K) weight: read (BLOCK_N, BLOCK_K) tiles and transpose
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1], block_shape=[BLOCK_K, BLOCK_N])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, BLOCK_N])
    z_desc = tl.make_tensor_descriptor(z_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, BLOCK_N])

    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            if A_MMAJOR:
                a = a_desc.load([ki * BLOCK_K, off_m]).T
            else:
                a = a_desc.load([off_m, ki * BLOCK_K])
            if B_KMAJOR:
                b = b_desc.load([off_n, ki * BLOCK_K]).T
            else:
                b = b_desc.load([ki * BLOCK_K, off_n])
            if DOT_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        # The epilogue of matmul.py: bias and activation on the fp32 accumulator, one rounding.
        if HAS_BIAS:
            cols = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if SAVE_PREACT:
            z_desc.store([off_m, off_n], acc.to(z_ptr.dtype.element_ty))
        c_desc.store([off_m, off_n], _activations.apply(acc, ACTIVATION).to(c_ptr.dtype.element_ty))


def tma_ok(a2: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether TMA descriptors can address these operands (see the module docstring)."""
    if not HAS_DESCRIPTORS:
        return False
    es = a2.element_size()
    a_rows = a2.stride(0) == 1 or a2.stride(1) == 1
    b_rows = b.stride(0) == 1 or b.stride(1) == 1
    lead = [_lead(a2), _lead(b), out.stride(0)]
    ptrs = [a2.data_ptr(), b.data_ptr(), out.data_ptr()]
    return (a_rows and b_rows and out.stride(1) == 1 and all(s * es % 16 == 0 for s in lead)
            and all(p % 16 == 0 for p in ptrs) and a2.shape[0] > 0 and b.shape[1] > 0)


def _lead(t: torch.Tensor) -> int:
    """The row stride a descriptor uses: along dim 0 when dim 1 is contiguous, else along dim 1."""
    return t.stride(0) if t.stride(1) == 1 else t.stride(1)


def _transposed(t: torch.Tensor) -> bool:
    """Whether the descriptor reads ``t`` as its transpose (unit stride along dim 0 only)."""
    return t.stride(1) != 1


def mm_tma(a2, b, bias=None, activation="none", save_preact=False, out=None, z=None):
    """``matmul.mm`` through the persistent TMA kernel; (out, z or None).  Check ``tma_ok`` first.

    ``out`` and ``z`` may be preallocated (M, N) tensors (``matmul.mm`` passes its own)."""
    M, K = a2.shape
    N = b.shape[1]
    if out is None:
        out = torch.empty((M, N), dtype=a2.dtype, device=a2.device)
    if z is None and save_preact:
        z = torch.empty((M, N), dtype=a2.dtype, device=a2.device)
    if not tma_ok(a2, b, out):
        raise ValueError("mm_tma: these operands are not TMA-addressable (unit inner strides, 16-byte aligned "
                         "rows and pointers); use kernels.matmul.mm")
    _utils.descriptor_scratch(a2)
    num_sms = _interpreter.num_sms(a2.device)
    # One program per SM at most (persistent), each taking every num_sms-th tile (with fewer
    # tiles than SMs each program takes one).  A run-time argument: one compiled kernel serves
    # every GPU model.
    grid = lambda meta: (min(num_sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)  # noqa: E731
    _matmul_tma_kernel[grid](
        a2, b, out, bias if bias is not None else out, z if z is not None else out,
        M, N, K, _lead(a2), _lead(b), out.stride(0), num_sms,
        ACTIVATION=activation, HAS_BIAS=bias is not None, SAVE_PREACT=save_preact, A_MMAJOR=_transposed(a2),
        B_KMAJOR=_transposed(b),
        PRECISION=_utils.dot_precision(a2.dtype), DOT_F32=_interpreter.dot_in_fp32(a2.dtype),
    )
    return out, z
