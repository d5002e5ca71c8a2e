"""fused_linear_cross_entropy against lm_head + F.cross_entropy (every reduction, bias, label
smoothing, softcap, ignored targets), on the Triton row kernel (interpreter) and the torch
fallback, with enough tokens for several chunks."""
import pytest
import torch
import torch.nn.functional as F
from kernel_numerics import DEVICE, check, randn

from pycomm import kernels
from pycomm.kernels import _dispatch
from pycomm.kernels.fused_linear_cross_entropy import _chunk_rows


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "auto" if request.param == "triton" else "torch")
    return request.param


def reference(hidden, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
              softcap=None):
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction).reshape(
        target.shape if reduction == "none" else ())


def targets(shape, V, seed=5):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, V, shape, generator=gen)
    t.view(-1)[::4] = -100  # every fourth token ignored (padding / prompt tokens)
    return t.to(DEVICE)


# (hidden shape, V): 3-D hidden, odd vocabularies; _chunk_rows gives 2..8 chunks for these.
CASES = [((2, 7, 16), 301), ((11, 24), 97)]
OPTIONS = [
    dict(),
    dict(reduction="sum", label_smoothing=0.1),
    dict(reduction="none", softcap=4.0),
    dict(reduction="mean", softcap=2.5, label_smoothing=0.2, bias=True),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}V{c[1]}")
def test_flce_fp32(backend, case, opts):
    shape, V = case
    opts = dict(opts)
    H = shape[-1]
    N = int(torch.tensor(shape[:-1]).prod())
    assert _chunk_rows(N, V, H) * 2 <= N  # several chunks, so the chunk loop itself is tested
    target = targets(shape[:-1], V)
    inputs = [randn(*shape), randn(V, H, scale=H ** -0.5, seed=1)]
    if opts.pop("bias", False):
        inputs.append(randn(V, seed=2))

    def ours(h, w, b=None):
        return kernels.fused_linear_cross_entropy(h, w, target, b, **opts)

    def ref(h, w, b=None):
        return reference(h, w, target, b, **opts)

    check(ours, ref, inputs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flce_low_precision(backend, dtype):
    target = targets((21,), 130)
    inputs = [randn(21, 32, scale=2.0), randn(130, 32, scale=32 ** -0.5, seed=1)]
    check(lambda h, w: kernels.fused_linear_cross_entropy(h, w, target, softcap=3.0),
          lambda h, w: reference(h, w, target, softcap=3.0), inputs, dtype)


def test_flce_frozen_head_and_no_grad(backend):
    # Only hidden requires grad (a frozen or tied-and-detached head): no weight gradient is made.
    h = torch.randn(10, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(50, 8, device=DEVICE)
    t = targets((10,), 50)
    kernels.fused_linear_cross_entropy(h, w, t).backward()
    h_ref = h.detach().clone().requires_grad_()
    reference(h_ref, w, t).backward()
    torch.testing.assert_close(h.grad, h_ref.grad)
    with torch.no_grad():
        torch.testing.assert_close(kernels.fused_linear_cross_entropy(h, w, t), reference(h, w, t))


def test_flce_second_backward_is_refused_not_wrong():
    # The gradients are scaled in place in backward; a second pass must fail loudly.
    h = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    loss = kernels.fused_linear_cross_entropy(h, torch.randn(30, 8, device=DEVICE), targets((6,), 30))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_flce_all_ignored_is_nan_like_torch():
    h, w = torch.randn(4, 8, device=DEVICE), torch.randn(20, 8, device=DEVICE)
    t = torch.full((4,), -100, device=DEVICE)
    assert torch.isnan(kernels.fused_linear_cross_entropy(h, w, t))
    assert kernels.fused_linear_cross_entropy(h, w, t, reduction="sum") == 0


def test_flce_errors():
    h, w = torch.randn(4, 8, device=DEVICE), torch.randn(20, 8, device=DEVICE)
    t = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="weight must be"):
        kernels.fused_linear_cross_entropy(h, w.t(), t)
    with pytest.raises(ValueError, match="target has shape"):
        kernels.fused_linear_cross_entropy(h, w, t[:3])
    with pytest.raises(TypeError, match="integer"):
        kernels.fused_linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match="reduction"):
        kernels.fused_linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="outside"):
        kernels.fused_linear_cross_entropy(h, w, t + 20)
    with pytest.raises(ValueError, match="softcap"):
        kernels.fused_linear_cross_entropy(h, w, t, softcap=0.0)
    with pytest.raises(ValueError, match="bias"):
        kernels.fused_linear_cross_entropy(h, w, t, torch.zeros(19, device=DEVICE))
