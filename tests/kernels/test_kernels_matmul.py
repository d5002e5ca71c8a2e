"""matmul with fused bias/activation, forward and backward, against PyTorch."""
import pytest
import torch
import torch.nn.functional as F
from kernel_numerics import DEVICE, check, dot_dtypes, randn

from pycomm import kernels

ACT = {None: lambda z: z, "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
       "silu": F.silu}


@pytest.mark.parametrize("dtype", dot_dtypes())
@pytest.mark.parametrize("activation", list(ACT))
def test_matmul_activation_bias(dtype, activation):
    # Odd sizes: 37 rows, K=70 (a partial K tile), N=45; b is a transposed weight (strided view).
    a, w, bias = randn(2, 37, 70), randn(45, 70, scale=0.2, seed=1), randn(45, seed=2)
    check(lambda a, w, b: kernels.matmul(a, w.t(), b, activation),
          lambda a, w, b: ACT[activation](a @ w.t() + b), [a, w, bias], dtype)


@pytest.mark.parametrize("dtype", dot_dtypes())
def test_matmul_plain_multi_tile(dtype):
    # Several tiles in M, N and K (interpreter tiles are 64), no bias.
    a, b = randn(130, 150, scale=0.3), randn(150, 70, seed=1)
    check(lambda a, b: kernels.matmul(a, b), lambda a, b: a @ b, [a, b], dtype)


@pytest.mark.parametrize("dtype", dot_dtypes())
def test_matmul_both_kernel_families(dtype, variant):
    # TMA-addressable sizes (16-byte rows), so the Hopper family takes the forward (a @ w.t(), B
    # read K-major), the input gradient (dz @ w) and the weight gradient (a.T @ dz, A read M-major).
    a, w, bias = randn(2, 37, 96, scale=0.3), randn(80, 96, scale=0.2, seed=1), randn(80, seed=2)
    check(lambda a, w, b: kernels.matmul(a, w.t(), b, "gelu"), lambda a, w, b: F.gelu(a @ w.t() + b),
          [a, w, bias], dtype)


def test_matmul_non_contiguous_and_1d():
    a, b = randn(70, 33), randn(70, 40, seed=1)
    check(lambda a, b: kernels.matmul(a.t(), b[:, ::2]), lambda a, b: a.t() @ b[:, ::2], [a, b], torch.float32)
    v = randn(70)
    check(lambda v, b: kernels.matmul(v, b, None, "silu"), lambda v, b: F.silu(v @ b), [v, b], torch.float32)


def test_matmul_empty():
    a, b, bias = randn(0, 5), randn(5, 7, seed=1), randn(7, seed=2)
    check(lambda a, b, c: kernels.matmul(a, b, c), lambda a, b, c: a @ b + c, [a, b, bias], torch.float32)
    # K == 0: the product is zero, the output is the activated bias
    a0, b0 = randn(3, 0), randn(0, 7)
    check(lambda a, b, c: kernels.matmul(a, b, c, "relu"), lambda a, b, c: F.relu(a @ b + c), [a0, b0, bias],
          torch.float32)


def test_matmul_frozen_weight_has_no_grad():
    a = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    b = torch.randn(8, 3, device=DEVICE)
    out = kernels.matmul(a, b, activation="gelu")
    (ga,) = torch.autograd.grad(out.sum(), a)
    torch.testing.assert_close(ga, torch.autograd.grad(F.gelu(a @ b).sum(), a)[0], atol=1e-5, rtol=1e-5)


def test_matmul_errors():
    a = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="unknown activation"):
        kernels.matmul(a, torch.randn(8, 3, device=DEVICE), activation="tanh")
    with pytest.raises(ValueError, match="last dimension of a must equal"):
        kernels.matmul(a, torch.randn(7, 3, device=DEVICE))
    with pytest.raises(ValueError, match="b must be 2-D"):
        kernels.matmul(a, torch.randn(2, 8, 3, device=DEVICE))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        kernels.matmul(a, torch.randn(8, 3, device=DEVICE), torch.randn(4, device=DEVICE))
    with pytest.raises(TypeError, match="dtype"):
        kernels.matmul(a, torch.randn(8, 3, device=DEVICE).half())
