"""``kernels.patch`` on tiny Hugging Face models built from configs (random weights, nothing
downloaded): patched against unpatched logits, loss, gradients and one SGD step at float32
tolerance, on the torch fallback and with the Triton kernels in the interpreter; padded batches,
generate(), torch.compile, a bf16-autocast training step, and the report.

Every model runs on both paths; the interpreter takes 1-7 s per one-layer model here, and the
whole module under a minute (`make test-hf` runs just these).
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the test extra; pycomm itself never needs it

from pycomm import kernels  # noqa: E402

V, S, B = 64, 8, 2
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)


def _configs():
    t = transformers
    return {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**SMALL)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**SMALL, sliding_window=3)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**SMALL)),
        "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**SMALL, head_dim=16)),
        "gemma": lambda: t.GemmaForCausalLM(t.GemmaConfig(**SMALL, head_dim=16)),
        # attention and final-logit softcapping, a sliding window, four norms per layer
        "gemma2": lambda: t.Gemma2ForCausalLM(t.Gemma2Config(**SMALL, head_dim=16, sliding_window=3,
                                                             attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
        # merged gate_up_proj, partial rotary (half of each head)
        "phi3": lambda: t.Phi3ForCausalLM(t.Phi3Config(**SMALL, partial_rotary_factor=0.5)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                       pad_token_id=0)),
        "bert": lambda: t.BertForMaskedLM(t.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=48,
                                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                                       max_position_embeddings=64, pad_token_id=0)),
    }


# What each (one-layer) model must have swapped, kind -> count: recognised by structure, not assumed.
EXPECTED = {
    "llama": dict(rms_norm=3, swiglu=1, rope=1, attention=1, fused_linear_cross_entropy=1, linear=0),
    "mistral": dict(rms_norm=3, swiglu=1, rope=1, attention=1, fused_linear_cross_entropy=1),
    "qwen2": dict(rms_norm=3, swiglu=1, rope=1, attention=1, fused_linear_cross_entropy=1),
    "qwen3": dict(rms_norm=5, swiglu=1, rope=1, attention=1, fused_linear_cross_entropy=1),  # + q_norm, k_norm
    "gemma": dict(rms_norm=3, swiglu=0, geglu=1, rope=1, attention=1, fused_linear_cross_entropy=1),  # (1 + w)
    "gemma2": dict(rms_norm=5, geglu=1, rope=1, attention=1, fused_linear_cross_entropy=1),
    "phi3": dict(rms_norm=3, swiglu=1, rope=1, attention=1, fused_linear_cross_entropy=1),
    "gpt2": dict(layer_norm=3, attention=1, fused_linear_cross_entropy=1),
    "bert": dict(layer_norm=4, attention=1, fused_linear_cross_entropy=0),  # masked LM: its own loss
}
CAUSAL = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2"}
EAGER = {"gemma2"}  # transformers refuses sdpa for it


def _pair(name, **patch_kw):
    torch.manual_seed(0)
    ref = _configs()[name]()
    ref.set_attn_implementation("eager" if name in EAGER else "sdpa")
    got = kernels.patch(copy.deepcopy(ref), verbose=False, **patch_kw)
    return ref, got


def _batch(name):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if name in CAUSAL:
        mask[1, :3] = 0  # left padding, as for generation
    else:
        mask[1, -3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    if name in CAUSAL:
        # The first real token's label is predicted from a padded position, whose output each
        # attention implementation fills differently (garbage either way): leave it out.
        labels[1, 3] = -100
    return ids, mask, labels


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls: with two OpenMP threads on a busy 2-core machine each one waits on the other
    # (50 ms per 32-wide linear measured here, 10x the whole test's useful work).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    # This module's torch.compile leaves dynamo's frame hooks and caches behind; the interpreter
    # tests that follow in the same process must not run under them (one CI run segfaulted in
    # the next module's first custom-op call after this one, not reproduced in isolation).
    torch._dynamo.reset()


def _use(backend, monkeypatch):
    monkeypatch.setenv("PYCOMM_KERNELS_BACKEND", backend)
    if backend == "triton":
        from pycomm.kernels import _dispatch
        assert _dispatch.use_triton(torch.empty(1)), "the Triton kernels need TRITON_INTERPRET=1 on CPU"


def _cases(names):
    return [(n, backend) for backend in ("torch", "triton") for n in names]


def _check_close(a, b, what):
    torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name, backend", _cases(sorted(EXPECTED)))
def test_patched_model_matches(name, backend, monkeypatch):
    _use(backend, monkeypatch)
    ref, got = _pair(name)
    report = got.kernels_patch_report
    for kind, n in EXPECTED[name].items():
        assert len(report.swapped[kind]) == n, f"{kind}: {report}"
    ids, mask, labels = _batch(name)
    keep = mask.bool()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt_got = torch.optim.SGD(got.parameters(), lr=0.5)
    for step in range(2):
        ref.eval(), got.eval()
        with torch.no_grad():
            want, have = ref(ids, attention_mask=mask).logits, got(ids, attention_mask=mask).logits
        _check_close(have[keep], want[keep], f"logits after {step} step(s)")
        if step:
            break
        ref.train(), got.train()
        loss_ref = ref(ids, attention_mask=mask, labels=labels).loss
        out = got(ids, attention_mask=mask, labels=labels)
        if name in CAUSAL:
            assert out.logits is None  # the fused loss never built them
        _check_close(out.loss, loss_ref, "loss")
        loss_ref.backward()
        out.loss.backward()
        for (n, p), q in zip(ref.named_parameters(), got.parameters()):
            _check_close(q.grad, p.grad, f"grad of {n}")
        opt_ref.step(), opt_got.step()


@pytest.mark.parametrize("name, backend", _cases(["llama", "mistral"]))
def test_generate_same_tokens(name, backend, monkeypatch):
    _use(backend, monkeypatch)
    ref, got = _pair(name)
    ids, mask, _ = _batch(name)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got.generate(ids, **kw), ref.generate(ids, **kw), atol=0, rtol=0)


def test_torch_compile_patched_model(monkeypatch):
    _use("torch", monkeypatch)
    ref, got = _pair("mistral")
    ids, mask, labels = _batch("mistral")
    compiled = torch.compile(got, backend="aot_eager")  # dynamo + fake tensors + AOT autograd, no C++ build
    got.eval(), ref.eval()
    with torch.no_grad():
        _check_close(compiled(ids, attention_mask=mask).logits[mask.bool()],
                     ref(ids, attention_mask=mask).logits[mask.bool()], "compiled logits")
    got.train(), ref.train()
    loss = compiled(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    _check_close(loss, ref(ids, attention_mask=mask, labels=labels).loss, "compiled loss")
    assert all(p.grad is not None for p in got.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_bf16_autocast_training_step(name, monkeypatch):
    # What the HF Trainer does with bf16=True; the patched model used to raise a dtype error here.
    _use("torch", monkeypatch)
    ref, got = _pair(name, linear=True)  # linear=True: kernels.nn.Linear / Conv1D under autocast too
    ids, mask, labels = _batch(name)
    losses = []
    for model in (ref, got):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        losses.append(loss.float())
    torch.testing.assert_close(losses[1], losses[0], atol=3e-2, rtol=3e-2)


def test_float64_takes_the_torch_path(monkeypatch):
    _use("triton", monkeypatch)  # even with Triton forced: float64 never reaches a kernel
    ref, got = _pair("qwen3")
    ref.double(), got.double()
    ids, mask, labels = _batch("qwen3")
    ref.train(), got.train()
    want, have = ref(ids, attention_mask=mask, labels=labels), got(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(have.loss, want.loss, atol=1e-10, rtol=1e-10)


def test_report_idempotent_print_and_resize(monkeypatch):
    _use("torch", monkeypatch)
    ref, got = _pair("llama")
    first = str(got.kernels_patch_report)
    assert "linear: 0 swapped, 5 left" in first and "nn.Linear stays on torch" in first
    classes = [type(m) for m in got.modules()]
    kernels.patch(got, verbose=False)
    again = got.kernels_patch_report
    assert [type(m) for m in got.modules()] == classes
    for kind in ("rms_norm", "swiglu", "rope", "attention", "fused_linear_cross_entropy"):
        assert len(again.swapped[kind]) == EXPECTED["llama"][kind]
        assert all("already patched" in line for line in again.swapped[kind]), again
    text = str(got)
    for kind in ("rms_norm", "swiglu", "rope", "fused_linear_cross_entropy"):
        assert f"pycomm={kind}" in text
    # resize_token_embeddings replaces lm_head: the fused loss reads it at every call
    ref.resize_token_embeddings(V + 8), got.resize_token_embeddings(V + 8)
    got.lm_head.weight.data.copy_(ref.lm_head.weight.data)
    got.model.embed_tokens.weight.data.copy_(ref.model.embed_tokens.weight.data)
    ids, mask, labels = _batch("llama")
    labels[0, -1] = V + 5  # a token only the resized head has
    ref.train(), got.train()
    out = got(ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    _check_close(out.loss, ref(ids, attention_mask=mask, labels=labels).loss, "loss after resize")


class _Norm(torch.nn.Module):  # a user's own RMSNorm: recognised by what it computes
    def __init__(self, n, offset):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(n))
        self.eps, self.offset = 1e-5, offset

    def forward(self, x):
        w = 1 + self.weight if self.offset else self.weight
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w


class _MLP(torch.nn.Module):
    def __init__(self, act):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(16, 24), torch.nn.Linear(16, 24),
                                                        torch.nn.Linear(24, 16))
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_own_model_by_structure(monkeypatch):
    _use("torch", monkeypatch)
    torch.manual_seed(0)
    ref = torch.nn.Sequential(_Norm(16, False), _MLP(torch.nn.SiLU()), _Norm(16, True), _MLP(torch.nn.GELU()),
                              _MLP(torch.nn.GELU(approximate="tanh")), _MLP(torch.nn.ReLU()),
                              torch.nn.LayerNorm(16), torch.nn.Linear(16, 16), torch.nn.ReLU())
    got = kernels.patch(copy.deepcopy(ref), verbose=False)
    r = got.kernels_patch_report
    assert [len(r.swapped[k]) for k in ("rms_norm", "swiglu", "geglu", "layer_norm", "linear")] == [2, 1, 2, 1, 1], r
    assert "(1 + weight)" in r.swapped["rms_norm"][1]
    assert [line.split(" (")[-1] for line in r.swapped["geglu"]] == ["gelu)", "gelu_tanh)"], r
    assert "with act silu or gelu (activation ReLU)" in r.left["swiglu"][0], r
    x = torch.randn(3, 16, requires_grad=True)
    _check_close(got(x), ref(x), "own model")
