"""rope against Hugging Face's apply_rotary_pos_emb (rotate-half and GPT-J interleaved layouts,
partial rotary, both q/k layouts), on the Triton kernel (interpreter) and the torch fallback."""
import pytest
import torch
from kernel_numerics import DEVICE, DTYPES, check, randn

from pycomm import kernels
from pycomm.kernels import _dispatch


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "auto" if request.param == "triton" else "torch")
    return request.param


def rotate_half(x):  # transformers.models.llama.modeling_llama.rotate_half
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):  # transformers.models.gptj.modeling_gptj.rotate_every_two
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def hf_rope(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    """HF apply_rotary_pos_emb, with the partial-rotary split of Phi/GPT-NeoX."""
    R = cos.shape[-1]
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    elif unsqueeze_dim == 2:
        cos, sin = cos[:, None], sin[:, None]
    rot = rotate_every_two if interleaved else rotate_half

    def apply(x):
        xr, xp = x[..., :R], x[..., R:]
        return torch.cat((xr * cos + rot(xr) * sin, xp), dim=-1)

    return apply(q), apply(k)


def cos_sin(B, S, R, interleaved, batched=True, seed=3):
    # Positions gathered per batch row (like position_ids with left padding), base 10000.
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 64, (B, S), generator=gen).double()
    inv = 1.0 / (10000 ** (torch.arange(0, R, 2, dtype=torch.float64) / R))
    freqs = pos[..., None] * inv
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    return (cos, sin) if batched else (cos[0], sin[0])


# (B, H, H_kv, S, D, R, unsqueeze_dim, interleaved): odd sequence lengths, GQA, partial rotary
# (R < D), head dim 80, both q/k layouts, both pair layouts; B == 1 takes (S, R) cos/sin.
CASES = [(2, 3, 1, 7, 16, 16, 1, False), (1, 4, 2, 5, 80, 32, 2, False), (2, 2, 2, 3, 8, 6, 1, True),
         (1, 3, 1, 5, 24, 16, 2, True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}kv{}S{}D{}R{}-dim{}-il{}".format(*c))
def test_rope_fp32(backend, case):
    B, H, H_KV, S, D, R, unsqueeze_dim, interleaved = case
    shape = (lambda h: (B, h, S, D)) if unsqueeze_dim == 1 else (lambda h: (B, S, h, D))
    q, k = randn(*shape(H)), randn(*shape(H_KV), seed=1)
    cos, sin = cos_sin(B, S, R, interleaved, batched=B == 2)
    check(lambda q, k: kernels.rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, interleaved=interleaved),
          lambda q, k: hf_rope(q, k, cos.to(q.dtype), sin.to(q.dtype), unsqueeze_dim, interleaved), [q, k],
          torch.float32)


@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_rope_low_precision(backend, dtype):
    q, k = randn(2, 4, 5, 32, scale=3.0), randn(2, 2, 5, 32, seed=1)
    cos, sin = cos_sin(2, 5, 32, False)
    # HF computes in the model dtype with cos/sin already cast to it; ours uses fp32 math.
    check(lambda q, k: kernels.rope(q, k, cos.to(dtype), sin.to(dtype)),
          lambda q, k: hf_rope(q, k, cos.to(dtype).to(q.dtype), sin.to(dtype).to(q.dtype)), [q, k], dtype)


def test_rope_leaves_inputs_alone_and_strided_views(backend):
    # q/k as transposed views of a (B, S, H, D) projection, as HF's attention produces them.
    buf = torch.randn(2, 6, 5, 16, device=DEVICE)
    q, k = buf[:, :, :3].transpose(1, 2), buf[:, :, 3:].transpose(1, 2)
    before = buf.clone()
    cos, sin = (t.float() for t in cos_sin(1, 6, 16, False))
    got = kernels.rope(q, k, cos, sin)
    want = hf_rope(q, k, cos[None], sin[None])
    assert torch.equal(buf, before)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_rope_learned_frequencies_get_gradients():
    # cos/sin that require grad take the differentiable torch path instead of dropping the gradient.
    q, k = torch.randn(1, 2, 4, 8, device=DEVICE), torch.randn(1, 1, 4, 8, device=DEVICE)
    cos, sin = (t.float().requires_grad_() for t in cos_sin(1, 4, 8, False))
    sum(o.sum() for o in kernels.rope(q, k, cos, sin)).backward()
    ref_cos = cos.detach().clone().requires_grad_()
    sum(o.sum() for o in hf_rope(q, k, ref_cos, sin.detach())).backward()
    torch.testing.assert_close(cos.grad, ref_cos.grad)


def test_rope_errors():
    q, k = torch.randn(1, 2, 4, 8, device=DEVICE), torch.randn(1, 1, 4, 8, device=DEVICE)
    cos = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        kernels.rope(q, k, cos, cos, unsqueeze_dim=3)
    with pytest.raises(ValueError, match="rotary_dim"):
        kernels.rope(q, k, cos[:, :5], cos[:, :5])
    with pytest.raises(ValueError, match="cos has shape"):
        kernels.rope(q, k, cos[:3], cos[:3])
    with pytest.raises(ValueError, match="k .* must match q"):
        kernels.rope(q, k[..., :4], cos, cos)
    with pytest.raises(TypeError, match="dtype"):
        kernels.rope(q.double(), k.double(), cos, cos)
