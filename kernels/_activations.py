"""Activation functions and their derivatives as ``@triton.jit`` helpers, shared by the ops that
fuse an activation (``bias_gelu``, ``matmul``'s epilogue, ``swiglu``).

The activation is a ``tl.constexpr`` string so each variant compiles to straight-line code with
no runtime branch.  All math is on fp32 values: callers upcast before calling.
"""
import triton
import triton.language as tl

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu")

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2) for the erf form of GELU
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2/pi) for the tanh form
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi), the normal density's constant
_GELU_C = tl.constexpr(0.044715)
# Globals used inside @triton.jit code must be tl.constexpr (the torch helpers read .value).
# Keep them on the right of `*`: in the interpreter `constexpr * tensor` wraps the tensor in a
# constexpr and the next tl call fails.


@triton.jit
def _sigmoid(x):
    # exp(-|x|) <= 1 never overflows (tl.exp(-x) would for very negative x).
    e = tl.exp(-tl.abs(x))
    s = 1.0 / (1.0 + e)
    return tl.where(x >= 0.0, s, e * s)


@triton.jit
def _tanh(x):
    # tl.tanh does not exist in every Triton release we support.  With e = exp(-2|x|) <= 1 nothing
    # overflows, and (1 - e) / (1 + e) keeps full relative precision near 0 as well as at +-1.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def apply(x, ACTIVATION: tl.constexpr):
    """act(x) for fp32 ``x``; ``ACTIVATION`` is one of "none", "relu", "gelu", "gelu_tanh", "silu"."""
    if ACTIVATION == "relu":
        return tl.maximum(x, 0.0)
    elif ACTIVATION == "gelu":
        return 0.5 * x * (1.0 + tl.erf(x * _SQRT1_2))
    elif ACTIVATION == "gelu_tanh":
        return 0.5 * x * (1.0 + _tanh((x + x * x * x * _GELU_C) * _SQRT_2_OVER_PI))
    elif ACTIVATION == "silu":
        return x * _sigmoid(x)
    else:
        return x


@triton.jit
def derivative(x, ACTIVATION: tl.constexpr):
    """d act(x) / dx for fp32 ``x`` (the pre-activation value)."""
    if ACTIVATION == "relu":
        return tl.where(x > 0.0, 1.0, 0.0)
    elif ACTIVATION == "gelu":
        # d/dx [x * Phi(x)] = Phi(x) + x * phi(x)
        return 0.5 * (1.0 + tl.erf(x * _SQRT1_2)) + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    elif ACTIVATION == "gelu_tanh":
        t = _tanh((x + x * x * x * _GELU_C) * _SQRT_2_OVER_PI)
        du = (1.0 + x * x * _GELU_C * 3.0) * _SQRT_2_OVER_PI
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    elif ACTIVATION == "silu":
        s = _sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    else:
        return tl.full(x.shape, 1.0, tl.float32)


def constexpr_name(activation) -> str:
    """Map the public ``activation`` argument (None or a name) to the constexpr string."""
    return "none" if activation is None else activation


def torch_apply(x, activation):
    """The PyTorch equivalent of ``apply`` (for the fallback path)."""
    import torch.nn.functional as F

    if activation is None or activation == "none":
        return x
    if activation == "relu":
        return F.relu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {activation!r}")


def torch_derivative(x, activation):
    """The PyTorch equivalent of ``derivative``, computed in the dtype of ``x``."""
    import torch

    c, k, inv = _GELU_C.value, _SQRT_2_OVER_PI.value, _INV_SQRT_2PI.value

    if activation is None or activation == "none":
        return torch.ones_like(x)
    if activation == "relu":
        return (x > 0).to(x.dtype)
    if activation == "gelu":
        return 0.5 * (1.0 + torch.erf(x * _SQRT1_2.value)) + x * inv * torch.exp(-0.5 * x * x)
    if activation == "gelu_tanh":
        t = torch.tanh(k * (x + c * x ** 3))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * c * x * x)
    if activation == "silu":
        s = torch.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    raise ValueError(f"unknown activation {activation!r}")
