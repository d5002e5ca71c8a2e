"""rms_norm, add_rms_norm, layer_norm, softmax_cross_entropy against PyTorch."""
import pytest
import torch
import torch.nn.functional as F
from kernel_numerics import DEVICE, DTYPES, check, randn

from pycomm import kernels

SHAPES = [(4, 33, 257), (3, 1000), (0, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(dtype, shape):
    x, w = randn(*shape, scale=2.0), randn(shape[-1], seed=1)
    check(lambda x, w: kernels.rms_norm(x, w, 1e-6), lambda x, w: F.rms_norm(x, (shape[-1],), w, 1e-6), [x, w], dtype)


def test_rms_norm_no_weight_non_contiguous():
    x = randn(24, 10, 3)
    check(lambda x: kernels.rms_norm(x.transpose(0, 1), None, 1e-5),
          lambda x: F.rms_norm(x.transpose(0, 1), (3,), None, 1e-5), [x], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_add_rms_norm(dtype, shape):
    x, r, w = randn(*shape), randn(*shape, seed=1), randn(shape[-1], seed=2)

    def ref(x, r, w):
        h = x + r
        return F.rms_norm(h, (shape[-1],), w, 1e-6), h

    check(lambda x, r, w: kernels.add_rms_norm(x, r, w, 1e-6), ref, [x, r, w], dtype)


def test_add_rms_norm_normalises_the_returned_sum():
    # The contract: y == rms_norm(h) exactly, with h the rounded sum that is returned.
    x, r = torch.randn(7, 50, device=DEVICE).bfloat16(), torch.randn(7, 50, device=DEVICE).bfloat16()
    w = torch.randn(50, device=DEVICE).bfloat16()
    y, h = kernels.add_rms_norm(x, r, w)
    assert torch.equal(h, x + r)
    assert torch.equal(y, kernels.rms_norm(h, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm(dtype, shape):
    N = shape[-1]
    x, w, b = randn(*shape, scale=3.0) + 1.5, randn(N, seed=1), randn(N, seed=2)
    check(lambda x, w, b: kernels.layer_norm(x, w, b), lambda x, w, b: F.layer_norm(x, (N,), w, b, 1e-5), [x, w, b], dtype)


def test_layer_norm_without_affine():
    x = randn(6, 45)
    check(lambda x: kernels.layer_norm(x, None, None), lambda x: F.layer_norm(x, (45,)), [x], torch.float32)


def test_norm_errors():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        kernels.rms_norm(x, torch.ones(9, device=DEVICE))
    with pytest.raises(TypeError, match="dtype"):
        kernels.layer_norm(x, torch.ones(8, device=DEVICE).half(), None)
    with pytest.raises(ValueError, match="residual"):
        kernels.add_rms_norm(x, x[:2], torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="PYCOMM_KERNELS_BACKEND=torch"):
        kernels.rms_norm(torch.empty(1, 70000, device=DEVICE), None)


# ---------------------------------------------------------------- softmax_cross_entropy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(37, 129), (5, 5000)])
def test_softmax_cross_entropy(dtype, rows, vocab):
    logits = randn(rows, vocab, scale=4.0)
    gen = torch.Generator().manual_seed(3)
    target = torch.randint(0, vocab, (rows,), generator=gen).to(DEVICE)
    target[::4] = -100  # some ignored rows
    check(lambda x: kernels.softmax_cross_entropy(x, target), lambda x: F.cross_entropy(x, target), [logits], dtype)


def test_softmax_cross_entropy_leading_dims_and_ignore_index():
    logits = randn(3, 5, 11)
    target = torch.tensor([[1, 2, 7, 7, 0], [10, 7, 3, 4, 5], [7, 7, 7, 1, 2]], device=DEVICE)
    check(lambda x: kernels.softmax_cross_entropy(x, target, ignore_index=7),
          lambda x: F.cross_entropy(x.reshape(-1, 11), target.reshape(-1), ignore_index=7), [logits], torch.float32)


def test_softmax_cross_entropy_all_ignored_is_nan_like_torch():
    logits = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    target = torch.full((4,), -100, device=DEVICE)
    loss = kernels.softmax_cross_entropy(logits, target)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits, target))


def test_softmax_cross_entropy_errors():
    logits = torch.randn(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
        kernels.softmax_cross_entropy(logits, torch.tensor([0, 1, 6, 2], device=DEVICE))
    with pytest.raises(TypeError, match="integer tensor"):
        kernels.softmax_cross_entropy(logits, torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="target has shape"):
        kernels.softmax_cross_entropy(logits, torch.zeros(5, dtype=torch.long, device=DEVICE))
