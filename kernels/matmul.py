"""``matmul(a, b, bias=None, activation=None) = act(a @ b + bias)`` with the bias and activation
fused into the matmul's epilogue (applied while the tile is still in registers).

Contract: ``a`` is ``(..., K)``, ``b`` is ``(K, N)`` (any strides: a transposed weight
``w.t()`` is read in place), ``bias`` is ``(N,)`` or None; one dtype (float32, float16, bfloat16)
and device.  ``activation`` is None, "relu", "gelu", "gelu_tanh" or "silu".  Returns a contiguous
``(..., N)`` tensor.  Accumulation is fp32.  float32 inputs use IEEE fp32 products, matching
``torch.matmul`` with TF32 off (torch's default); with
``torch.backends.cuda.matmul.allow_tf32 = True`` the kernel uses TF32 as torch would.

Backward: ``dz = g * act'(z)`` (an elementwise kernel; ``z = a @ b + bias`` is saved by the
forward only when an activation is fused and gradients are needed), then the same matmul kernel
computes ``da = dz @ b.T`` and ``db = a.T @ dz`` by passing transposed strides (no copies), and
``dbias = dz.sum(0)`` in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _activations, _dispatch, _interpreter, _tuning, _utils, matmul_tma
from ._dispatch import use_triton

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


def _configs():
    # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps): the Triton tutorial's CUDA set,
    # which covers the large square GEMMs (128x256 tiles) and the skinny ones (64x32).
    shapes = [
        (128, 256, 64, 8, 3, 8), (64, 256, 32, 8, 4, 4), (128, 128, 32, 8, 4, 4), (128, 64, 32, 8, 4, 4),
        (64, 128, 32, 8, 4, 4), (128, 32, 32, 8, 4, 4), (64, 32, 32, 8, 5, 2), (32, 64, 32, 8, 5, 2),
        (128, 128, 64, 8, 4, 8), (128, 256, 64, 8, 4, 8), (256, 128, 64, 8, 3, 8),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g}, num_stages=s, num_warps=w)
        for m, n, k, g, s, w in shapes
    ]


def _shared_memory(config, dtype_bytes, args):
    # Upper bound: num_stages buffers of the A and B tiles (the software pipeline), or the fp32
    # accumulator tile when the epilogue converts its layout through shared memory, whichever is
    # larger (the two are not live at once).  bench/compile_check.py checks it against the compiler.
    kw = config.kwargs
    tiles = (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * dtype_bytes
    return max(config.num_stages * tiles, kw["BLOCK_M"] * kw["BLOCK_N"] * 4)


@_interpreter.autotune(
    configs=_configs(),
    # M (tokens: batch x sequence) in power-of-two buckets so a new prompt length or batch size
    # reuses a tuned config; N and K (weight shapes) exact.
    key=["M", "N", "K", "ACTIVATION", "HAS_BIAS"], bucketed=["M"], shared_memory=_shared_memory,
    keep=_tuning.epilogue_fits_registers,
    # Big tiles in the interpreter: it pays per program, and numpy does the tile dot quickly.
    interpreter_config=triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}),
)
@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, z_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_PREACT: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: consecutive programs walk down GROUP_M row-blocks of one column strip
    # before moving right, so the B tiles they share are still in L2 (tutorial 03: ~10% on A100).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = (first_pid_m + ((pid % num_pid_in_group) % group_size_m)).to(tl.int64)
    pid_n = ((pid % num_pid_in_group) // group_size_m).to(tl.int64)

    # Rows/cols past the edge wrap around (% M, % N) instead of being masked: the loads stay in
    # bounds and unmasked along M and N (cheaper); the wrapped results are never stored.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K  # the K tail is masked to zero so it adds nothing to the dot
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue on the fp32 accumulator: bias, then the activation, one rounding at the store.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = (rows[:, None] < M) & (cols[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out_offs = rows[:, None] * stride_cm + cols[None, :] * stride_cn
    if SAVE_PREACT:
        tl.store(z_ptr + out_offs, acc, mask=c_mask)
    tl.store(c_ptr + out_offs, _activations.apply(acc, ACTIVATION), mask=c_mask)


@triton.jit
def _activation_bwd_kernel(g_ptr, z_ptr, dz_ptr, n_elements, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dz_ptr + offs, g * _activations.derivative(z, ACTIVATION), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


# Which kernel family runs each bucket of matmul shapes: the portable kernel above, or the
# persistent TMA kernel of matmul_tma.py where its operands allow (see _dispatch.VariantTuner).
_VARIANTS = _dispatch.VariantTuner("matmul")


def mm(a2, b, bias=None, activation="none", save_preact=False, out=None):
    """``act(a2 @ b + bias)`` for 2-D ``a2`` (M, K) and ``b`` (K, N) of any strides.

    Returns (out, z or None).  ``out`` may be a preallocated (M, N) tensor or view (e.g. a slice of
    a larger buffer).  Shared by the other ops that need a matmul (qkv_attention).
    """
    M, K = a2.shape
    N = b.shape[1]
    if out is None:
        out = torch.empty((M, N), dtype=a2.dtype, device=a2.device)
    z = torch.empty((M, N), dtype=a2.dtype, device=a2.device) if save_preact else None
    if M == 0 or N == 0:
        return out, z

    def portable():
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _matmul_kernel[grid](
            a2, b, out, bias if bias is not None else out, z if z is not None else out, M, N, K,
            a2.stride(0), a2.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            ACTIVATION=activation, HAS_BIAS=bias is not None, SAVE_PREACT=save_preact,
            PRECISION=_utils.dot_precision(a2.dtype), DOT_F32=_interpreter.dot_in_fp32(a2.dtype),
        )
        return out, z

    candidates = {_dispatch.PORTABLE: portable}
    if _dispatch.hopper_capable(a2) and matmul_tma.tma_ok(a2, b, out):
        candidates[_dispatch.HOPPER] = lambda: matmul_tma.mm_tma(a2, b, bias, activation, save_preact, out, z)
    key = (_tuning.bucket(M), N, K, activation, bias is not None, save_preact, a2.dtype, b.stride(0) == 1)
    return _VARIANTS.run(key, candidates)


def activation_bwd(g, z, activation):
    """``g * act'(z)`` elementwise (g, z contiguous, same shape)."""
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    n = z.numel()
    if n:
        _activation_bwd_kernel[(triton.cdiv(n, 1024),)](g.contiguous(), z, dz, n, ACTIVATION=activation, BLOCK=1024)
    return dz


def _fwd(a2, b, bias, activation, save_preact):
    out, z = mm(a2, b, bias, activation, save_preact)
    return out, (z if z is not None else out.new_empty(0))


def _bwd(g, a2, b, z, activation, has_bias, need_a, need_b):
    dz = activation_bwd(g, z, activation) if activation != "none" else g.contiguous()
    da = mm(dz, b.t())[0] if need_a else g.new_empty(0)
    db = mm(a2.t(), dz)[0] if need_b else g.new_empty(0)
    dbias = dz.float().sum(0).to(g.dtype) if has_bias else g.new_empty(0)
    return da, db, dbias


# ----------------------------------------------------------------------------------------------
# PyTorch fallback
# ----------------------------------------------------------------------------------------------


def _torch_fwd(a2, b, bias, activation, save_preact):
    z = a2 @ b
    if bias is not None:
        z = z + bias
    out = _activations.torch_apply(z, activation).contiguous()
    return out, (z.contiguous() if save_preact else out.new_empty(0))


def _torch_bwd(g, a2, b, z, activation, has_bias, need_a, need_b):
    dz = g if activation == "none" else (g.float() * _activations.torch_derivative(z.float(), activation)).to(g.dtype)
    da = (dz @ b.t()).contiguous() if need_a else g.new_empty(0)
    db = (a2.t() @ dz).contiguous() if need_b else g.new_empty(0)
    dbias = dz.float().sum(0).to(g.dtype) if has_bias else g.new_empty(0)
    return da, db, dbias


# ----------------------------------------------------------------------------------------------
# Custom op registration
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("pycomm_kernels::matmul", mutates_args=())
def _matmul_op(
    a2: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, activation: str, save_preact: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(a2):
        return _fwd(a2, b, bias, activation, save_preact)
    return _torch_fwd(a2, b, bias, activation, save_preact)


@_matmul_op.register_fake
def _(a2, b, bias, activation, save_preact):
    shape = (a2.shape[0], b.shape[1])
    return a2.new_empty(shape), a2.new_empty(shape if save_preact else (0,))


@torch.library.custom_op("pycomm_kernels::matmul_bwd", mutates_args=())
def _matmul_bwd_op(
    g: torch.Tensor, a2: torch.Tensor, b: torch.Tensor, z: torch.Tensor, activation: str,
    has_bias: bool, need_a: bool, need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(g):
        return _bwd(g, a2, b, z, activation, has_bias, need_a, need_b)
    return _torch_bwd(g, a2, b, z, activation, has_bias, need_a, need_b)


@_matmul_bwd_op.register_fake
def _(g, a2, b, z, activation, has_bias, need_a, need_b):
    return (
        g.new_empty(a2.shape if need_a else (0,)),
        g.new_empty(b.shape if need_b else (0,)),
        g.new_empty((b.shape[1],) if has_bias else (0,)),
    )


def _setup_context(ctx, inputs, output):
    a2, b, bias, activation, _ = inputs
    ctx.save_for_backward(a2, b, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.activation = activation
    ctx.has_bias = bias is not None


def _backward(ctx, g, _gz):
    a2, b, z = ctx.saved_tensors
    need_a, need_b, need_bias = ctx.needs_input_grad[:3]
    da, db, dbias = _matmul_bwd_op(g, a2, b, z, ctx.activation, ctx.has_bias and need_bias, need_a, need_b)
    return (da if need_a else None, db if need_b else None,
            dbias if (ctx.has_bias and need_bias) else None, None, None)


_matmul_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def check_activation(activation):
    if activation not in _activations.ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; use one of None, 'relu', 'gelu', 'gelu_tanh', 'silu'"
        )


def matmul(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """``act(a @ b + bias)`` with a fused epilogue (see the module docstring)."""
    _utils.check_tensor("a", a, ndim_min=1)
    _utils.check_tensor("b", b)
    if b.dim() != 2:
        raise ValueError(f"b must be 2-D (K, N), got shape {tuple(b.shape)}; for a weight w of nn.Linear pass w.t()")
    _utils.check_same(("a", "b", "bias"), (a, b, bias))
    K, N = b.shape
    if a.shape[-1] != K:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)}: the last dimension of a must equal b.shape[0]")
    if bias is not None:
        _utils.check_tensor("bias", bias)
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},) (the columns of b), got {tuple(bias.shape)}")
    check_activation(activation)
    a2 = _utils.flatten_rows(a)
    act = _activations.constexpr_name(activation)
    # z is only worth saving when an activation must be differentiated.
    save_preact = act != "none" and torch.is_grad_enabled() and (
        a.requires_grad or b.requires_grad or (bias is not None and bias.requires_grad)
    )
    out, _ = _matmul_op(a2, b, bias, act, save_preact)
    return out.reshape(*a.shape[:-1], N)
