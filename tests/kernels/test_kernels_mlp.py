"""swiglu_mlp and geglu_mlp against down(act(gate(x)) * up(x)) with nn.Linear semantics, both backends."""
import pytest
import torch
import torch.nn.functional as F
from kernel_numerics import DEVICE, check, randn

from pycomm import kernels
from pycomm.kernels import _dispatch


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "auto" if request.param == "triton" else "torch")
    return request.param


def reference(x, wg, wu, wd, bg=None, bu=None, bd=None):
    return F.linear(F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_mlp(backend, dtype, bias):
    E, inter, E_out = 24, 37, 20  # odd intermediate size; down projection to another width
    inputs = [randn(2, 9, E), randn(inter, E, scale=E ** -0.5, seed=1), randn(inter, E, scale=E ** -0.5, seed=2),
              randn(E_out, inter, scale=inter ** -0.5, seed=3)]
    if bias:
        inputs += [randn(inter, seed=4), randn(inter, seed=5), randn(E_out, seed=6)]
    check(kernels.swiglu_mlp, reference, inputs, dtype)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_geglu_mlp(backend, approximate):
    E, inter, E_out = 24, 37, 20
    inputs = [randn(2, 9, E, scale=2.0), randn(inter, E, scale=E ** -0.5, seed=1),
              randn(inter, E, scale=E ** -0.5, seed=2), randn(E_out, inter, scale=inter ** -0.5, seed=3),
              randn(inter, seed=4), randn(inter, seed=5), randn(E_out, seed=6)]

    def ref(x, wg, wu, wd, bg, bu, bd):
        return F.linear(F.gelu(F.linear(x, wg, bg), approximate=approximate) * F.linear(x, wu, bu), wd, bd)

    check(lambda *a: kernels.geglu_mlp(*a, approximate=approximate), ref, inputs, torch.float32)


def test_swiglu_mlp_saves_less_than_autograd():
    # Saved for backward: x, the weights, gate and up -- not the product silu(gate) * up.
    x = torch.randn(64, 16, device=DEVICE, requires_grad=True)
    ws = [torch.randn(128, 16, device=DEVICE, requires_grad=True), torch.randn(128, 16, device=DEVICE,
                                                                               requires_grad=True),
          torch.randn(16, 128, device=DEVICE, requires_grad=True)]

    def saved_numel(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn(x, *ws).sum()
        return sum(sizes)

    assert saved_numel(kernels.swiglu_mlp) < saved_numel(reference) - 64 * 128


def test_swiglu_mlp_errors():
    x = torch.randn(3, 8, device=DEVICE)
    w = torch.randn(12, 8, device=DEVICE)
    with pytest.raises(ValueError, match="up_weight"):
        kernels.swiglu_mlp(x, w, w[:11], w.t())
    with pytest.raises(ValueError, match="down_weight"):
        kernels.swiglu_mlp(x, w, w, w)
    with pytest.raises(ValueError, match="gate_bias"):
        kernels.swiglu_mlp(x, w, w, w.t(), gate_bias=torch.zeros(5, device=DEVICE))
    with pytest.raises(ValueError, match="approximate"):
        kernels.geglu_mlp(x, w, w, w.t(), approximate="exact")
