"""The Hopper-native matmul variant (kernels/matmul_tma.py: persistent, TMA tensor descriptors)
against PyTorch, with the same numeric rule as the portable kernel's tests; fp16 and fp32 in the
interpreter (bf16 tl.dot is wrong there), bf16 too on a GPU."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from kernel_numerics import check, dot_dtypes, randn

tma = importlib.import_module("pycomm.kernels.matmul_tma")
pytestmark = pytest.mark.skipif(not tma.HAS_DESCRIPTORS, reason="this Triton has no tl.make_tensor_descriptor")


def _mm(*args):
    out, z = tma.mm_tma(*args)
    return (out, z) if z is not None else out


@pytest.mark.parametrize("dtype", dot_dtypes())
def test_tma_matmul_fused_epilogue_transposed_weight(dtype):
    # Ragged M and N (tiles are 64 in the interpreter), the weight read K-major (w.t()), bias,
    # GELU and the saved pre-activation.
    a, w, bias = randn(70, 96, scale=0.3), randn(80, 96, scale=0.3, seed=1), randn(80, seed=2)
    check(lambda a, w, b: _mm(a, w.t(), b, "gelu", True),
          lambda a, w, b: (F.gelu(a @ w.t() + b), a @ w.t() + b), [a, w, bias], dtype, backward=False)


@pytest.mark.parametrize("dtype", dot_dtypes())
def test_tma_matmul_row_major_b_several_tiles(dtype):
    # More tiles than programs (4 stand-in SMs): the persistent loop walks several tiles each.
    a, b = randn(130, 64, scale=0.3), randn(64, 200, seed=1)
    check(lambda a, b: _mm(a, b), lambda a, b: a @ b, [a, b], dtype, backward=False)


@pytest.mark.parametrize("dtype", dot_dtypes())
def test_tma_matmul_transposed_a_as_the_weight_gradient_reads_it(dtype):
    # dW = x.T @ dy: A is a (K, M) view with unit stride along M, read as transposed tiles.
    x, dy = randn(70, 48, scale=0.3), randn(70, 80, seed=1)
    check(lambda x, dy: _mm(x.t(), dy), lambda x, dy: x.t() @ dy, [x, dy], dtype, backward=False)


def test_tma_layouts_it_cannot_address_are_refused():
    a, b = randn(8, 10).float(), randn(10, 16, seed=1).float()
    assert not tma.tma_ok(a, b, torch.empty(8, 16))  # a's 40-byte rows are not 16-byte aligned
    a2 = randn(16, 12).float()
    assert tma.tma_ok(a2.t(), randn(16, 16).float(), torch.empty(12, 16))  # a M-major: read transposed
    assert not tma.tma_ok(a2[:, ::2], randn(6, 16).float(), torch.empty(16, 16))  # no unit stride at all
    with pytest.raises(ValueError, match="not TMA-addressable"):
        tma.mm_tma(a, b)
