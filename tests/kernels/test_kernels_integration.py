"""torch.compile(fullgraph=True), torch.library.opcheck, the dispatch rule, nn modules and patch()."""
import pytest
import torch
import torch.nn.functional as F
from kernel_numerics import DEVICE, interpreting
from torch import nn

from pycomm import kernels
from pycomm.kernels import _dispatch

# ---------------------------------------------------------------- torch.compile


def _compiled_matches(fn, ref, inputs, backend):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    ours_in = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    ref_in = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out, expected = compiled(*ours_in), ref(*ref_in)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    for a, b in zip(ours_in, ref_in):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_mlp_block(backend):
    # rms_norm -> matmul(+gelu) -> matmul -> swiglu -> cross-entropy in one graph, fwd + bwd.
    x = torch.randn(6, 32, device=DEVICE)
    w_norm, w1, b1 = torch.randn(32, device=DEVICE), torch.randn(32, 64, device=DEVICE) / 6, torch.randn(64, device=DEVICE)
    w2 = torch.randn(32, 40, device=DEVICE) / 6
    target = torch.randint(0, 20, (6,), device=DEVICE)

    def ours(x, w_norm, w1, b1, w2):
        h = kernels.matmul(kernels.rms_norm(x, w_norm), w1, b1, activation="gelu")
        gate, up = kernels.matmul(h[:, :32], w2).chunk(2, dim=-1)
        return kernels.softmax_cross_entropy(kernels.swiglu(gate, up), target)

    def ref(x, w_norm, w1, b1, w2):
        h = F.gelu(F.rms_norm(x, (32,), w_norm, 1e-6) @ w1 + b1)
        gate, up = (h[:, :32] @ w2).chunk(2, dim=-1)
        return F.cross_entropy(F.silu(gate) * up, target)

    _compiled_matches(ours, ref, [x, w_norm, w1, b1, w2], backend)


def test_compile_fullgraph_attention():
    q, k, v = (torch.randn(1, 2, 20, 16, device=DEVICE) for _ in range(3))
    _compiled_matches(lambda q, k, v: kernels.flash_attention(q, k, v, causal=True),
                      lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], "aot_eager")


def test_compile_fullgraph_hf_decoder_ops():
    # rope -> masked GQA attention -> swiglu_mlp -> fused LM-head loss, one graph, fwd + bwd.
    B, S, H, H_KV, D, E, V = 2, 7, 2, 1, 8, 16, 23
    x = torch.randn(B, S, E, device=DEVICE)
    wq, wk = torch.randn(H * D, E, device=DEVICE) / 4, torch.randn(H_KV * D, E, device=DEVICE) / 4
    wg, wu, wd = (torch.randn(24, E, device=DEVICE) / 4, torch.randn(24, E, device=DEVICE) / 4,
                  torch.randn(E, 24, device=DEVICE) / 5)
    head = torch.randn(V, E, device=DEVICE) / 4
    pos = torch.arange(S, device=DEVICE).float()[:, None] / 10 ** (torch.arange(0, D, 2, device=DEVICE) / D)
    cos, sin = pos.repeat(1, 2).cos(), pos.repeat(1, 2).sin()
    kpm = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    kpm[1, :2] = False
    target = torch.randint(0, V, (B, S), device=DEVICE)

    def project(x, wq, wk):
        q = F.linear(x, wq).view(B, S, H, D).transpose(1, 2)
        k = F.linear(x, wk).view(B, S, H_KV, D).transpose(1, 2)
        return q, k

    def ours(x, wq, wk, wg, wu, wd, head):
        q, k = kernels.rope(*project(x, wq, wk), cos, sin)
        a = kernels.flash_attention(q, k, k, True, key_padding_mask=kpm, sliding_window=4)
        h = kernels.swiglu_mlp(a.transpose(1, 2).reshape(B, S, E) + x, wg, wu, wd)
        return kernels.fused_linear_cross_entropy(h, head, target)

    def ref(x, wq, wk, wg, wu, wd, head):
        q, k = project(x, wq, wk)
        rot = lambda t: torch.cat((-t[..., D // 2:], t[..., : D // 2]), -1)  # noqa: E731
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        i, j = torch.arange(S, device=DEVICE)[:, None], torch.arange(S, device=DEVICE)[None, :]
        mask = ((j <= i) & (i - j < 4))[None, None] & kpm[:, None, None, :]
        p = torch.softmax((q @ k.repeat_interleave(H, 1).transpose(-1, -2) / D ** 0.5).masked_fill(~mask, -torch.inf), -1)
        a = torch.nan_to_num(p) @ k.repeat_interleave(H, 1)
        h = a.transpose(1, 2).reshape(B, S, E) + x
        h = F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)
        return F.cross_entropy(F.linear(h, head).flatten(0, 1), target.flatten())

    _compiled_matches(ours, ref, [x, wq, wk, wg, wu, wd, head], "aot_eager")


# ---------------------------------------------------------------- opcheck (fake impls, autograd registration)

OPCHECK = [
    ("fused_add_mul", lambda: (torch.randn(3, 1), torch.randn(4), torch.randn(3, 4), torch.randn(1, 4))),
    ("bias_gelu", lambda: (torch.randn(3, 5), torch.randn(5), "gelu_tanh")),
    ("gated_act", lambda: (torch.randn(3, 5), torch.randn(3, 5), "silu")),
    ("gated_act", lambda: (torch.randn(3, 5), torch.randn(3, 5), "gelu_tanh")),
    ("rms_norm", lambda: (torch.randn(3, 5), torch.randn(5), 1e-6)),
    ("add_rms_norm", lambda: (torch.randn(3, 5), torch.randn(3, 5), torch.randn(5), 1e-6)),
    ("layer_norm", lambda: (torch.randn(3, 5), torch.randn(5), torch.randn(5), 1e-5)),
    ("cross_entropy_rows", lambda: (torch.randn(4, 7), torch.tensor([1, -100, 6, 0]), -100)),
    ("matmul", lambda: (torch.randn(5, 6), torch.randn(7, 6).t(), torch.randn(7), "silu", True)),
    ("flash_attention", lambda: (torch.randn(1, 2, 9, 16), torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 16), None,
                                 True, 0.25, 0, False, 0.0)),
    ("flash_attention", lambda: (torch.randn(2, 2, 5, 16), torch.randn(2, 1, 9, 16), torch.randn(2, 1, 9, 16),
                                 torch.tensor([[True] * 9, [False] * 3 + [True] * 6]), True, 0.25, 4, True, 2.0)),
    ("flash_attention_varlen", lambda: (torch.randn(7, 2, 16), torch.randn(9, 1, 16), torch.randn(9, 1, 16),
                                        torch.tensor([0, 3, 7], dtype=torch.int32),
                                        torch.tensor([0, 4, 9], dtype=torch.int32), 4, 5, True, 0.25, 3, 0.0)),
    ("rope", lambda: (torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8), torch.randn(5, 6), torch.randn(5, 6), 1,
                      False, False)),
    ("fused_linear_cross_entropy", lambda: (torch.randn(6, 8), torch.randn(11, 8), torch.tensor([1, -100, 10, 0, 3, 3]),
                                            torch.randn(11), -100, 0.1, 3.0, "mean", True, True, True)),
    ("fused_linear_cross_entropy", lambda: (torch.randn(6, 8), torch.randn(11, 8), torch.tensor([1, -100, 10, 0, 3, 3]),
                                            None, -100, 0.0, 0.0, "none", True, True, False)),
    ("gated_mlp", lambda: (torch.randn(4, 8), torch.randn(6, 8), torch.randn(6, 8), torch.randn(5, 6), None,
                           torch.randn(6), torch.randn(5), "silu")),
    ("gated_mlp", lambda: (torch.randn(4, 8), torch.randn(6, 8), torch.randn(6, 8), torch.randn(5, 6), None,
                           None, None, "gelu")),
    ("qkv_attention", lambda: (torch.randn(1, 9, 8), torch.randn(64, 8) / 3, torch.randn(64), 2, 1, True)),
]


@pytest.mark.parametrize("name,make", OPCHECK, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPCHECK)])
def test_opcheck(name, make):
    args = [a.to(DEVICE).requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a for a in make()]
    torch.library.opcheck(getattr(torch.ops.pycomm_kernels, name).default, args)


# ---------------------------------------------------------------- dispatch rule


def test_backend_env_var(monkeypatch):
    x = torch.randn(4, 9, device=DEVICE)
    w = torch.randn(9, device=DEVICE)
    triton_result = kernels.rms_norm(x, w)
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    assert kernels.backend() == "torch" and not _dispatch.use_triton(x)
    torch.testing.assert_close(kernels.rms_norm(x, w), triton_result, atol=1e-6, rtol=1e-6)
    monkeypatch.setenv(_dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="PYCOMM_KERNELS_BACKEND"):
        kernels.rms_norm(x, w)


def test_auto_uses_triton_under_interpreter_or_cuda(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    x = torch.randn(2, device=DEVICE)
    assert _dispatch.use_triton(x) == (x.is_cuda or interpreting())


# The CPU fallback is what a laptop user gets: check it on every op, fwd + bwd, in float32.
FALLBACK_CASES = [
    (lambda a, b: kernels.fused_add_mul(a, b, b, a), lambda a, b: a + (a + b) * b),
    (lambda a, b: kernels.bias_gelu(a, b[0]), lambda a, b: F.gelu(a + b[0])),
    (lambda a, b: kernels.swiglu(a, b), lambda a, b: F.silu(a) * b),
    (lambda a, b: kernels.rms_norm(a, b[0]), lambda a, b: F.rms_norm(a, (6,), b[0], 1e-6)),
    (lambda a, b: kernels.add_rms_norm(a, b, b[0])[0], lambda a, b: F.rms_norm(a + b, (6,), b[0], 1e-6)),
    (lambda a, b: kernels.layer_norm(a, b[0], b[1]), lambda a, b: F.layer_norm(a, (6,), b[0], b[1])),
    (lambda a, b: kernels.softmax_cross_entropy(a, torch.tensor([1, 5, -100, 0, 2])),
     lambda a, b: F.cross_entropy(a, torch.tensor([1, 5, -100, 0, 2]))),
    (lambda a, b: kernels.matmul(a, b.t(), b[0, :5], "gelu_tanh"), lambda a, b: F.gelu(a @ b.t() + b[0, :5], approximate="tanh")),
    (lambda a, b: kernels.flash_attention(a.view(1, 1, 5, 6), b.view(1, 1, 5, 6), b.view(1, 1, 5, 6), causal=True),
     lambda a, b: F.scaled_dot_product_attention(a.view(1, 1, 5, 6), b.view(1, 1, 5, 6), b.view(1, 1, 5, 6), is_causal=True)),
    (lambda a, b: kernels.qkv_attention(a[None], b.repeat(3, 1)[:12], num_heads=2, num_kv_heads=1),
     lambda a, b: _qkv_ref(a[None], b.repeat(3, 1)[:12])),
]


def _qkv_ref(x, w):
    q, k, v = F.linear(x, w).split([6, 3, 3], dim=-1)
    q = q.view(1, 5, 2, 3).transpose(1, 2)
    k, v = (t.view(1, 5, 1, 3).transpose(1, 2) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(1, 5, 6)


@pytest.mark.parametrize("i", range(len(FALLBACK_CASES)))
def test_torch_fallback(monkeypatch, i):
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    ours, ref = FALLBACK_CASES[i]
    gen = torch.Generator().manual_seed(i)
    a0, b0 = torch.randn(5, 6, generator=gen), torch.randn(5, 6, generator=gen)
    a, b, a2, b2 = (t.clone().requires_grad_() for t in (a0, b0, a0, b0))
    out, expected = ours(a, b), ref(a2, b2)

    def close(x, y):
        # 1e-5 relative to the tensor's largest value: two float32 implementations of an
        # ill-conditioned gradient (qkv_attention's repeated weight rows give gradients of
        # ~50) both err by ~4e-5 absolute against float64, each within PyTorch's own error.
        if y is None:  # an input the op does not use gets no gradient from either
            assert x is None
            return
        torch.testing.assert_close(x, y, atol=1e-5 * max(1.0, y.abs().max().item()), rtol=1e-5)

    close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    close(a.grad, a2.grad)
    close(b.grad, b2.grad)


# ---------------------------------------------------------------- nn modules and patch


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 32), nn.ReLU())
        self.norm = nn.RMSNorm(32)
        self.seq_first = nn.MultiheadAttention(32, 4)  # not swapped: not batch-first

    def forward(self, x):
        h = self.ln(x)
        a, _ = self.attn(h, h, h, need_weights=False, is_causal=True, attn_mask=nn.Transformer.generate_square_subsequent_mask(x.shape[1]))
        x = x + a
        return self.norm(x + self.mlp(x))


def test_patch_swaps_and_keeps_results():
    torch.manual_seed(0)
    model = Block().to(DEVICE)
    x = torch.randn(2, 10, 32, device=DEVICE)
    params_before = {n: p for n, p in model.named_parameters()}
    expected = model(x)
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    assert kernels.patch(model, verbose=False) is model
    # norms keep their class (a subclass of it, same name) with a kernel forward
    assert isinstance(model.ln, nn.LayerNorm) and "pycomm=layer_norm" in repr(model.ln)
    assert isinstance(model.norm, nn.RMSNorm) and "pycomm=rms_norm" in repr(model.norm)
    assert isinstance(model.attn, kernels.nn.MultiheadAttention)
    assert isinstance(model.mlp[0], kernels.nn.Linear) and model.mlp[0].activation == "gelu_tanh"
    assert isinstance(model.mlp[1], nn.Identity) and model.mlp[2].activation == "relu"
    assert isinstance(model.seq_first, nn.MultiheadAttention)
    assert any(line.startswith("seq_first: batch_first=False") for line in model.kernels_patch_report.left["attention"])
    # Same parameter objects: an optimiser built before patching keeps working.
    for n, p in model.named_parameters():
        assert p is params_before[n], n

    out = model(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-4, rtol=1e-4, msg=n)


def test_patched_mha_falls_back_for_weights_and_cross_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).to(DEVICE)
    wrapped = nn.Sequential(mha)
    q, kv = torch.randn(2, 5, 16, device=DEVICE), torch.randn(2, 7, 16, device=DEVICE)
    out_ref, w_ref = mha(q, kv, kv)
    kernels.patch(wrapped, verbose=False)
    out, w = wrapped[0](q, kv, kv)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-5)


def test_merged_qkv_attention_from_separate():
    torch.manual_seed(0)
    E, H, H_KV = 32, 4, 2
    D = E // H
    q_p, k_p, v_p, o_p = nn.Linear(E, E), nn.Linear(E, H_KV * D), nn.Linear(E, H_KV * D), nn.Linear(E, E)
    for m in (q_p, k_p, v_p, o_p):
        m.to(DEVICE)
    attn = kernels.nn.MergedQKVAttention.from_separate(q_p, k_p, v_p, o_p, num_heads=H, num_kv_heads=H_KV)
    x = torch.randn(2, 9, E, device=DEVICE)
    q, k, v = (p(x).view(2, 9, -1, D).transpose(1, 2) for p in (q_p, k_p, v_p))
    ref = o_p(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(2, 9, E))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)
    fresh = kernels.nn.MergedQKVAttention(E, H, H_KV, bias=False).to(DEVICE)
    assert fresh(x).shape == (2, 9, E) and fresh.qkv_bias is None


def test_nn_module_errors():
    with pytest.raises(ValueError, match="unknown activation"):
        kernels.nn.Linear(3, 4, activation="tanh")
    with pytest.raises(ValueError, match="divisible"):
        kernels.nn.MergedQKVAttention(30, 4)
    with pytest.raises(TypeError, match="nn.Module"):
        kernels.patch(object())
