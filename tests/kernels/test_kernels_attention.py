"""flash_attention and qkv_attention against F.scaled_dot_product_attention; the core cases run
on both kernel families (the portable kernels and flash_attention_tma's Hopper variant)."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from kernel_numerics import DEVICE, check, dot_dtypes, randn

from pycomm import kernels
from pycomm.kernels import _dispatch

tma = importlib.import_module("pycomm.kernels.flash_attention_tma")


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
def test_flash_attention_fp32(case, causal, variant):
    B, H, H_KV, S_Q, S_K, D = case
    q, k, v = randn(B, H, S_Q, D), randn(B, H_KV, S_K, D, seed=1), randn(B, H_KV, S_K, D, seed=2)
    check(lambda q, k, v: kernels.flash_attention(q, k, v, causal), lambda q, k, v: sdpa(q, k, v, causal),
          [q, k, v], torch.float32)


@pytest.mark.parametrize("dtype", [d for d in dot_dtypes()][1:])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attention_low_precision(dtype, causal, variant):
    q, k, v = randn(2, 4, 100, 64, scale=1.5), randn(2, 2, 100, 64, seed=1), randn(2, 2, 100, 64, seed=2)
    check(lambda q, k, v: kernels.flash_attention(q, k, v, causal), lambda q, k, v: sdpa(q, k, v, causal),
          [q, k, v], dtype)


def test_flash_attention_strided_inputs_and_scale(variant):
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
def test_qkv_attention(dtype, H, H_KV, D, causal, bias, variant):
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


# ---------------------------------------------------------------- masks for Hugging Face models


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "auto" if request.param == "triton" else "torch")
    return request.param


def masked_reference(q, k, v, causal=False, kpm=None, window=None, bottom_right=False, softcap=None, scale=None):
    """Attention with an explicit (B, 1, S_q, S_k) boolean mask built the way HF's mask functions
    do (``kv_idx <= q_idx`` and ``kv_idx > q_idx - window``, positions shifted for bottom-right);
    fully masked rows give 0."""
    S_Q, S_K, D = q.shape[2], k.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * (D ** -0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    q_idx = torch.arange(S_Q, device=q.device)[:, None] + (S_K - S_Q if bottom_right else 0)
    kv_idx = torch.arange(S_K, device=q.device)[None, :]
    allowed = torch.ones(S_Q, S_K, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & (kv_idx <= q_idx)
    if window is not None:
        allowed = allowed & (kv_idx > q_idx - window)
        if not causal:
            allowed = allowed & (kv_idx < q_idx + window)
    allowed = allowed[None, None]
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.nan_to_num(p, nan=0.0) @ v


# (B, H, H_kv, S_q, S_k, D) and the options: padding with a fully padded batch row (all-zero
# output), sliding windows shorter than the sequence, chunked prefill (S_q < S_k, bottom-right),
# softcapping, all together.
MASK_CASES = [
    ((2, 2, 1, 37, 37, 16), dict(causal=True, pad=True)),
    ((1, 2, 2, 40, 40, 32), dict(causal=True, window=7)),
    ((1, 2, 1, 13, 45, 16), dict(causal=True, bottom_right=True, window=20)),
    ((2, 2, 2, 19, 19, 16), dict(window=5, softcap=2.0)),
    ((2, 4, 2, 9, 70, 16), dict(causal=True, bottom_right=True, pad=True, window=33, softcap=5.0)),
]


def _kpm(B, S_K):
    kpm = torch.ones(B, S_K, dtype=torch.bool, device=DEVICE)
    kpm[0, : S_K // 3] = False  # left padding, as HF batches prompts for generation
    if B > 1:
        kpm[1, S_K - 4:] = False  # right padding
    return kpm


@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: "-".join(c[1]))
def test_flash_attention_masks(backend, case):
    (B, H, H_KV, S_Q, S_K, D), opts = case
    kpm = _kpm(B, S_K) if opts.get("pad") else None
    causal, window, softcap = opts.get("causal", False), opts.get("window"), opts.get("softcap")
    br = opts.get("bottom_right", False)
    q, k, v = randn(B, H, S_Q, D, scale=2.0), randn(B, H_KV, S_K, D, seed=1), randn(B, H_KV, S_K, D, seed=2)

    def ours(q, k, v):
        return kernels.flash_attention(q, k, v, causal, key_padding_mask=kpm, sliding_window=window,
                                       causal_alignment="bottom_right" if br else "top_left", softcap=softcap)

    check(ours, lambda q, k, v: masked_reference(q, k, v, causal, kpm, window, br, softcap), [q, k, v],
          torch.float32)


@pytest.mark.parametrize("shape", [(1, 4, 2, 45, 130, 32), (2, 2, 1, 70, 20, 16)], ids=["prefill", "more-queries"])
def test_flash_attention_bottom_right_causal(shape, variant):
    # Chunked prefill (queries are the last S_q of S_k positions), and more queries than keys:
    # the first S_q - S_k rows see no key (zero output, zero gradient), the rest straddle the
    # diagonal, which the Hopper family handles in its own stage.
    B, H, H_KV, S_Q, S_K, D = shape
    q, k, v = randn(B, H, S_Q, D), randn(B, H_KV, S_K, D, seed=1), randn(B, H_KV, S_K, D, seed=2)
    check(lambda q, k, v: kernels.flash_attention(q, k, v, True, causal_alignment="bottom_right"),
          lambda q, k, v: masked_reference(q, k, v, True, None, None, True), [q, k, v], torch.float32)


def test_the_hopper_family_takes_only_the_plain_masks(monkeypatch):
    # A sliding window (or padding mask, softcap, varlen) stays on the portable kernels even when
    # the Hopper family is forced; plain causal attention goes to the Hopper family.
    monkeypatch.setenv(_dispatch.VARIANT_ENV_VAR, _dispatch.HOPPER)
    ran = []
    monkeypatch.setattr(tma, "attention_fwd_tma", lambda *a, **kw: ran.append(a))
    q = randn(1, 2, 20, 16).float()
    kernels.flash_attention(q, q, q, causal=True, sliding_window=4)
    assert not ran
    if _dispatch.use_triton(q) and _dispatch.hopper_capable(q):
        kernels.flash_attention(q, q, q, causal=True)
        assert len(ran) == 1


def test_flash_attention_fully_masked_rows_are_zero(backend):
    q = torch.randn(2, 2, 6, 16, device=DEVICE, requires_grad=True)
    kpm = torch.zeros(2, 6, dtype=torch.bool, device=DEVICE)
    kpm[1, 3] = True
    # Batch 0 sees no key at all; in batch 1 causal queries 0..2 come before the only real key.
    out = kernels.flash_attention(q, q, q, causal=True, key_padding_mask=kpm)
    assert not out[0].any() and not out[1, :, :3].any() and out[1, :, 3:].abs().sum() > 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("opts", [dict(causal=True), dict(causal=True, sliding_window=4, softcap=3.0), dict()],
                         ids=["causal", "window-softcap", "full"])
def test_flash_attention_varlen(backend, opts):
    # Three packed sequences, one of them with more keys than queries (bottom-right causal) and
    # one with no queries at all.
    lens_q, lens_k = [5, 0, 12], [7, 3, 12]
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    q, k, v = randn(sum(lens_q), 4, 16), randn(sum(lens_k), 2, 16, seed=1), randn(sum(lens_k), 2, 16, seed=2)

    def ours(q, k, v):
        return kernels.flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **opts)

    def ref(q, k, v):
        outs = []
        for b in range(3):
            qs, ks, vs = (t[c[b]:c[b + 1]].transpose(0, 1)[None] for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
            o = masked_reference(qs, ks, vs, opts.get("causal", False), None, opts.get("sliding_window"), True,
                                 opts.get("softcap"))
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    check(ours, ref, [q, k, v], torch.float32)


def test_flash_attention_mask_errors():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="key_padding_mask"):
        kernels.flash_attention(q, q, q, key_padding_mask=torch.ones(1, 7, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="sliding_window"):
        kernels.flash_attention(q, q, q, sliding_window=0)
    with pytest.raises(ValueError, match="causal_alignment"):
        kernels.flash_attention(q, q, q, causal_alignment="bottom")
    with pytest.raises(ValueError, match="softcap"):
        kernels.flash_attention(q, q, q, softcap=-1.0)
    p = torch.randn(8, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="end at"):
        kernels.flash_attention_varlen(p, p, p, cu, torch.tensor([0, 3, 7], device=DEVICE), 5, 5)
    with pytest.raises(ValueError, match="max_seqlen"):
        kernels.flash_attention_varlen(p, p, p, cu, cu, 4, 5)
