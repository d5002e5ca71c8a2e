"""fused_add_mul, bias_gelu, swiglu: forward and backward against PyTorch (rule in kernel_numerics)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_numerics import DEVICE, DTYPES, check, randn

from pycomm import kernels

# ---------------------------------------------------------------- fused_add_mul

BROADCAST_CASES = [
    [(9, 41, 3), (9, 41, 3), (9, 41, 3), (9, 41, 3)],  # same shapes, odd sizes
    [(3, 1, 5), (4, 5), (1,), (3, 4, 5)],  # broadcast every way
    [(2, 1, 3, 1, 5), (1, 4, 1, 6, 1), (5,), (2, 4, 3, 6, 5)],  # 5-D, not mergeable to 4-D
    [(0, 7), (7,), (0, 7), (1, 7)],  # empty
    [(), (6,), (), (2, 6)],  # 0-d
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", BROADCAST_CASES, ids=lambda s: "x".join(str(len(t)) for t in s))
def test_fused_add_mul(dtype, shapes):
    inputs = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    check(kernels.fused_add_mul, lambda a, b, c, d: d + (a + b) * c, inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_mul_non_contiguous(dtype):
    a, b, c, d = (randn(5, 6, 7, seed=i) for i in range(4))

    def views(fn):
        # transposed, strided and permuted views: read in place through strides
        return lambda a, b, c, d: fn(a.transpose(0, 2), b[..., ::1].transpose(0, 2), c.permute(2, 1, 0), d.transpose(0, 2))

    check(views(kernels.fused_add_mul), views(lambda a, b, c, d: d + (a + b) * c), [a, b, c, d], dtype)


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.lists(st.booleans(), min_size=16, max_size=16))
def test_fused_add_mul_random_broadcast(shape, drops):
    # Each input drops (sets to 1) a random subset of the output's dimensions.
    shapes = [tuple(1 if drops[4 * i + j % 4] else s for j, s in enumerate(shape)) for i in range(4)]
    inputs = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    check(kernels.fused_add_mul, lambda a, b, c, d: d + (a + b) * c, inputs, torch.float32)


def test_fused_add_mul_errors():
    x = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="broadcast"):
        kernels.fused_add_mul(x, torch.randn(5, device=DEVICE), x, x)
    with pytest.raises(TypeError, match="dtype"):
        kernels.fused_add_mul(x, x.half(), x, x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        kernels.fused_add_mul(x, 1.0, x, x)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        kernels.fused_add_mul(x.double(), x.double(), x.double(), x.double())


# ---------------------------------------------------------------- bias_gelu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(9, 41, 341), (3, 1000), (0, 17)])
def test_bias_gelu(dtype, approximate, shape):
    x, bias = randn(*shape, scale=3.0), randn(shape[-1], seed=1)
    check(
        lambda x, b: kernels.bias_gelu(x, b, approximate),
        lambda x, b: F.gelu(x + b, approximate=approximate),
        [x, bias], dtype,
    )


def test_bias_gelu_non_contiguous():
    x, bias = randn(40, 9), randn(9, seed=1)
    check(lambda x, b: kernels.bias_gelu(x.t().t()[::2], b), lambda x, b: F.gelu(x[::2] + b), [x, bias], torch.float32)
    x2 = randn(9, 40)
    check(lambda x, b: kernels.bias_gelu(x.t(), b), lambda x, b: F.gelu(x.t() + b), [x2, bias], torch.float32)


def test_bias_gelu_errors():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        kernels.bias_gelu(x, torch.randn(7, device=DEVICE))
    with pytest.raises(ValueError, match="approximate"):
        kernels.bias_gelu(x, torch.randn(8, device=DEVICE), approximate="erf")


# ---------------------------------------------------------------- swiglu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(9, 41, 341), (5, 123), (0, 4)])
def test_swiglu(dtype, shape):
    gate, up = randn(*shape, scale=3.0), randn(*shape, seed=1)
    check(kernels.swiglu, lambda g, u: F.silu(g) * u, [gate, up], dtype)


@settings(max_examples=6, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=3))
def test_swiglu_random_shapes(shape):
    check(kernels.swiglu, lambda g, u: F.silu(g) * u, [randn(*shape), randn(*shape, seed=1)], torch.float16)


def test_swiglu_non_contiguous_chunk():
    # The usual call: gate and up are the two halves of one projection (strided views).
    h = randn(7, 2 * 33, scale=2.0)
    check(lambda h: kernels.swiglu(*h.chunk(2, dim=-1)), lambda h: F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1],
          [h], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape", [(9, 41, 37), (0, 4)])
def test_geglu(dtype, approximate, shape):
    # Gemma's gated activation; gate spans GELU's curved region (and its tails at scale 3).
    gate, up = randn(*shape, scale=3.0), randn(*shape, seed=1)
    check(lambda g, u: kernels.geglu(g, u, approximate=approximate),
          lambda g, u: F.gelu(g, approximate=approximate) * u, [gate, up], dtype)


def test_geglu_errors():
    x = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="approximate must be 'tanh' or 'none'"):
        kernels.geglu(x, x, approximate="erf")
    with pytest.raises(ValueError, match="same shape"):
        kernels.geglu(x, torch.randn(3, 5, device=DEVICE))


def test_swiglu_errors():
    with pytest.raises(ValueError, match="same shape"):
        kernels.swiglu(torch.randn(3, 4, device=DEVICE), torch.randn(3, 5, device=DEVICE))
    with pytest.raises(ValueError, match="one device|on"):
        kernels.swiglu(torch.randn(3, 4), torch.randn(3, 4, device="meta"))
