"""flash_attention and qkv_attention against F.scaled_dot_product_attention."""
import pytest
import torch
import torch.nn.functional as F
from kernel_numerics import DEVICE, check, dot_dtypes, randn

from pycomm import kernels


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


# (B, H, H_kv, S_q, S_k, D): sequence lengths that are not multiples of the block (64 in the
# interpreter), head dims 16..128 including 80 and 96, grouped-query attention, S_q != S_k.
CASES = [
    (2, 4, 2, 100, 100, 64),
    (1, 2, 2, 70, 70, 16),
    (1, 2, 1, 65, 65, 80),
    (1, 3, 1, 33, 33, 96),
    (1, 2, 2, 40, 90, 128),
    (1, 4, 4, 1, 1, 32),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}kv{}q{}k{}D{}".format(*c))
def test_flash_attention_fp32(case, causal):
    B, H, H_KV, S_Q, S_K, D = case
    q, k, v = randn(B, H, S_Q, D), randn(B, H_KV, S_K, D, seed=1), randn(B, H_KV, S_K, D, seed=2)
    check(lambda q, k, v: kernels.flash_attention(q, k, v, causal), lambda q, k, v: sdpa(q, k, v, causal),
          [q, k, v], torch.float32)


@pytest.mark.parametrize("dtype", [d for d in dot_dtypes()][1:])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attention_low_precision(dtype, causal):
    q, k, v = randn(2, 4, 100, 64, scale=1.5), randn(2, 2, 100, 64, seed=1), randn(2, 2, 100, 64, seed=2)
    check(lambda q, k, v: kernels.flash_attention(q, k, v, causal), lambda q, k, v: sdpa(q, k, v, causal),
          [q, k, v], dtype)


def test_flash_attention_strided_inputs_and_scale():
    # q/k/v as views of one (B, S, 3, H, D) buffer, as a packed QKV projection produces them.
    qkv = randn(2, 50, 3, 2, 32)

    def split(t):
        return [t[:, :, i].transpose(1, 2) for i in range(3)]

    check(lambda t: kernels.flash_attention(*split(t), causal=True, scale=0.3),
          lambda t: F.scaled_dot_product_attention(*split(t), is_causal=True, scale=0.3), [qkv], torch.float32)


def test_flash_attention_empty_batch():
    q = torch.randn(0, 2, 5, 16, device=DEVICE)
    assert kernels.flash_attention(q, q, q).shape == (0, 2, 5, 16)


def test_flash_attention_errors():
    q = torch.randn(1, 4, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        kernels.flash_attention(q, q[:, :3], q[:, :3])
    with pytest.raises(ValueError, match="4-D"):
        kernels.flash_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="head_dim"):
        kernels.flash_attention(q, q[..., :8], q[..., :8])
    with pytest.raises(TypeError, match="dtype"):
        kernels.flash_attention(q, q.half(), q)


# ---------------------------------------------------------------- qkv_attention


def qkv_reference(x, w, b, H, H_KV, causal):
    B, S, _ = x.shape
    D = w.shape[0] // (H + 2 * H_KV)
    q, k, v = F.linear(x, w, b).split([H * D, H_KV * D, H_KV * D], dim=-1)
    q, k, v = (t.reshape(B, S, -1, D).transpose(1, 2) for t in (q, k, v))
    return sdpa(q, k, v, causal).transpose(1, 2).reshape(B, S, H * D)


@pytest.mark.parametrize("dtype", dot_dtypes())
@pytest.mark.parametrize("H,H_KV,D,causal,bias", [(4, 2, 16, True, True), (2, 2, 32, False, False)])
def test_qkv_attention(dtype, H, H_KV, D, causal, bias):
    E = 48
    x = randn(2, 50, E)
    w = randn((H + 2 * H_KV) * D, E, scale=E ** -0.5, seed=1)
    inputs = [x, w] + ([randn(w.shape[0], seed=2)] if bias else [])

    def ours(x, w, b=None):
        return kernels.qkv_attention(x, w, b, num_heads=H, num_kv_heads=H_KV, causal=causal)

    check(ours, lambda x, w, b=None: qkv_reference(x, w, b, H, H_KV, causal), inputs, dtype)


def test_qkv_attention_errors():
    x = torch.randn(1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="embed_dim"):
        kernels.qkv_attention(x, torch.randn(24, 7, device=DEVICE), num_heads=2)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        kernels.qkv_attention(x, torch.randn(24, 8, device=DEVICE), num_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="b_qkv"):
        kernels.qkv_attention(x, torch.randn(24, 8, device=DEVICE), torch.randn(5, device=DEVICE), num_heads=2)
