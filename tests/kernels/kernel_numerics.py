"""The numeric rule for every kernel test, in one place.

* float32: our result against PyTorch's float32 result, ``atol``/``rtol`` from ``FP32_TOL``.
* float16 / bfloat16 (FlashAttention's rule): with a float64 reference computed from the same
  low-precision inputs (upcast, as FlashAttention's tests do), ``max|ours - ref64| <= FACTOR *
  max(max|torch_lowp - ref64|, rounding)``, where ``torch_lowp`` is PyTorch's own result in that
  dtype and ``rounding = max|round_to_dtype(ref64) - ref64|`` is the error of the correctly
  rounded answer, which no implementation can beat.  It only matters for tiny tensors, where
  PyTorch's maximum error over a handful of elements can happen to be below one rounding.

``check`` runs forward and backward for ours, the reference in float64 and the reference in the
test dtype, with the same random upstream gradient, and applies the rule to every output and to
the gradient of every floating input.
"""
from __future__ import annotations

import os

import pytest
import torch

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
FACTOR = 2.0

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# tl.dot on bfloat16 is wrong in Triton's interpreter (triton-lang/triton#11584); dot-based ops in
# bfloat16 are therefore only tested on a GPU.
needs_cuda_for_bf16_dot = pytest.mark.skip(
    reason="bfloat16 tl.dot is unsupported by Triton's interpreter (triton#11584); runs on CUDA only"
)


def dot_dtypes():
    """The dtypes for ops built on tl.dot: bfloat16 only where a real GPU runs the kernels."""
    marks = [] if ON_CUDA else [needs_cuda_for_bf16_dot]
    return [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=marks)]


def _run(fn, inputs, dtype, grads_out, input_dtype=None):
    leaves = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            # input_dtype: round the inputs to the test dtype first (for the float64 reference)
            src = x.detach().to(input_dtype) if input_dtype is not None else x.detach()
            leaf = src.to(dtype).requires_grad_(True)
        else:
            leaf = x
        leaves.append(leaf)
    out = fn(*leaves)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    diff = [o for o in outs if o.requires_grad]
    if grads_out is None:
        gen = torch.Generator(device="cpu").manual_seed(1234)
        grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in outs]
    float_leaves = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = []
    if diff and float_leaves:
        gs = [g.to(input_dtype or o.dtype).to(o.dtype) for g, o in zip(grads_out, outs) if o.requires_grad]
        grads = list(torch.autograd.grad(diff, float_leaves, gs, allow_unused=True))
    return [o.detach() for o in outs], grads, grads_out


def _compare(what, ours, lowp, ref64, dtype):
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert ours.dtype == lowp.dtype, f"{what}: dtype {ours.dtype} != {lowp.dtype}"
    if dtype == torch.float32:
        torch.testing.assert_close(ours, lowp, **FP32_TOL, msg=lambda m: f"{what} (float32): {m}")
        return
    if ours.numel() == 0:
        return
    err = (ours.double() - ref64).abs().max().item()
    base = (lowp.double() - ref64).abs().max().item()
    rounding = (ref64.to(dtype).double() - ref64).abs().max().item()
    assert err <= FACTOR * max(base, rounding), (
        f"{what} ({dtype}): max error {err:.3g} against float64 exceeds {FACTOR} x PyTorch's own "
        f"{dtype} error {base:.3g} (correct rounding alone: {rounding:.3g})"
    )


def check(ours_fn, ref_fn, inputs, dtype, backward=True):
    """Compare ``ours_fn`` with ``ref_fn`` on ``inputs`` (float64 tensors, cast per run)."""
    ours, ours_g, grads_out = _run(ours_fn, inputs, dtype, None)
    lowp, lowp_g, _ = _run(ref_fn, inputs, dtype, grads_out)
    ref, ref_g, _ = _run(ref_fn, inputs, torch.float64, grads_out, input_dtype=dtype)
    assert len(ours) == len(ref)
    for i, (a, b, c) in enumerate(zip(ours, lowp, ref)):
        _compare(f"output {i}", a, b, c, dtype)
    if backward:
        assert len(ours_g) == len(ref_g)
        for i, (a, b, c) in enumerate(zip(ours_g, lowp_g, ref_g)):
            if c is None:
                assert a is None or not a.any(), f"grad {i}: expected no gradient"
                continue
            assert a is not None, f"grad of input {i} is missing"
            _compare(f"grad of input {i}", a, b, c, dtype)


def randn(*shape, scale=1.0, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale).to(DEVICE)


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
