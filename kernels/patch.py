"""``kernels.patch(model)``: route a model's hot ops through the kernels, recognised by structure.

Modules are recognised by what they hold and what they compute, never by class name, so one
mechanism covers Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-2, BERT and a user's own model built
the same way.  A candidate is *probed*: its own forward runs once on a small random input and is
compared with the kernel's formula; only an exact match is swapped (a ReLU-gated MLP, a LayerNorm
without bias or a rope with another layout are reported as left, with the reason).

Per kind (each a keyword switch of ``patch``):

* ``rms_norm``: a module with a 1-D ``weight``, an epsilon (``variance_epsilon``, ``eps`` or
  ``epsilon``), no bias, no children, computing ``x * rsqrt(mean(x^2) + eps) * w`` or Gemma's
  ``... * (1 + w)``.
* ``layer_norm``: ``nn.LayerNorm`` over the last dimension with weight and bias.
* ``swiglu``: an MLP with ``gate_proj``/``up_proj`` (or a merged ``gate_up_proj``, Phi-3) and
  ``down_proj`` ``nn.Linear`` computing ``down(silu(gate(x)) * up(x))`` -> ``swiglu_mlp``.
* ``geglu``: the same MLP computing ``down(gelu(gate(x)) * up(x))``, tanh or erf GELU (Gemma)
  -> ``geglu_mlp``.
* ``rope``: an attention module whose forward calls its modeling module's
  ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` (rotate-half) -> ``kernels.rope``.
  Only the patched instances change: their forward is the same code with that one global
  rebound, so an unpatched model of the same class keeps the original.
* ``attention``: a transformers model gets the attention implementation ``"pycomm"``
  (kernels/_hf.py: ``flash_attention`` with the padding mask, sliding window and bottom-right
  alignment); a batch-first ``nn.MultiheadAttention`` becomes ``kernels.nn.MultiheadAttention``.
* ``fused_linear_cross_entropy``: a causal LM (``labels`` in its forward, a linear output
  embedding) computes its training loss (``model.train()`` and labels given) with
  ``fused_linear_cross_entropy``; the logits are then not materialised and the output's
  ``logits`` is None, as in Liger-Kernel.  Evaluation and generation keep the logits.
* ``linear``: off by default, ``nn.Linear`` (and GPT-2's ``Conv1D``) stay on torch/cuBLAS, which a
  plain Triton matmul does not beat with nothing fused.  An ``nn.Linear`` followed by GELU, ReLU or
  SiLU inside an ``nn.Sequential`` always becomes one matmul with the activation fused.

A swapped module keeps its parameters, state-dict keys and class name: its class becomes a
subclass whose forward calls the kernel (``print(model)`` shows ``pycomm=<kind>``).  Every patched
forward computes in the dtype the original would (autocast included, kernels/_amp.py) and runs
the original code for inputs the kernels do not take (float64).  Patching twice changes nothing
and reports the same.  ``resize_token_embeddings`` keeps the loss patch: it reads the output
embedding at every call.  The report (``model.kernels_patch_report``, printed when ``verbose``)
lists per kind what was swapped and what was left, and why.
"""
from __future__ import annotations

import inspect
import sys
import types
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from . import _activations, _amp, _hf
from . import nn as knn
from .layer_norm import layer_norm
from .matmul import matmul
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import GATED
from .swiglu_mlp import _gated_mlp

KINDS = ("rms_norm", "layer_norm", "swiglu", "geglu", "rope", "attention", "fused_linear_cross_entropy", "linear")
_FUSABLE = {nn.ReLU: lambda m: "relu", nn.SiLU: lambda m: "silu",
            nn.GELU: lambda m: "gelu_tanh" if m.approximate == "tanh" else "gelu"}
_EPS_NAMES = ("variance_epsilon", "eps", "epsilon")
_LINEAR_LEFT = "stays on torch (cuBLAS beats a plain Triton matmul with nothing fused); linear=True swaps it"


class PatchReport:
    """Per kind: ``swapped[kind]`` and ``left[kind]``, lists of ``"path: what"`` / ``"path: why"``."""

    def __init__(self):
        self.swapped: dict[str, list[str]] = {k: [] for k in KINDS}
        self.left: dict[str, list[str]] = {k: [] for k in KINDS}

    def __str__(self) -> str:
        lines = [f"kernels.patch: {sum(map(len, self.swapped.values()))} swapped, "
                 f"{sum(map(len, self.left.values()))} left"]
        for kind in KINDS:
            if not self.swapped[kind] and not self.left[kind]:
                continue
            lines.append(f"  {kind}: {len(self.swapped[kind])} swapped, {len(self.left[kind])} left")
            for table, verb in ((self.swapped, "swapped"), (self.left, "left")):
                for what, n in sorted(Counter(e.split(": ", 1)[1] for e in table[kind]).items()):
                    lines.append(f"    {n} x {verb}: {what}")
        return "\n".join(lines)


# ---------------------------------------------------------------- class swapping

_SUBCLASSES: dict[tuple, type] = {}


def _patched_class(base: type, kind: str, forward) -> type:
    """``base`` with ``forward`` replaced (same name, so transformers' name-based logic still holds)."""
    key = (base, kind, forward)
    if key not in _SUBCLASSES:
        def extra_repr(self):
            text = base.extra_repr(self)
            return f"{text}, pycomm={kind}" if text else f"pycomm={kind}"

        _SUBCLASSES[key] = type(base.__name__, (base,), {
            "forward": forward, "extra_repr": extra_repr, "_pycomm_kind": kind, "_pycomm_base": base,
            "__module__": base.__module__, "__qualname__": base.__qualname__,
        })
    return _SUBCLASSES[key]


def _swap(module: nn.Module, kind: str, forward, **state) -> None:
    for name, value in state.items():
        object.__setattr__(module, f"_pycomm_{name}", value)
    module.__class__ = _patched_class(type(module), kind, forward)


def _orig_forward(module):
    return type(module)._pycomm_base.forward


def _probe(shape, like: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(shape, generator=g).to(device=like.device, dtype=like.dtype)


def _close(a, b, like: torch.Tensor) -> bool:
    tol = 1e-4 if like.dtype in (torch.float32, torch.float64) else 3e-2
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def _probe_ready(m: nn.Module) -> str | None:
    p = next(m.parameters(), None)
    if p is not None and p.is_meta:
        return "parameters are on the meta device (load the weights first)"
    return None


# ---------------------------------------------------------------- norms

def _rms_forward(self, x):
    w = self.weight
    dt = _amp.promoted_dtype(x, w)
    if dt is None:
        return _orig_forward(self)(self, x)
    eps = getattr(self, self._pycomm_eps)
    eps = torch.finfo(dt).eps if eps is None else eps  # torch.nn.RMSNorm's eps=None
    xx, ww = _amp.cast(dt, x, w)
    if self._pycomm_offset:  # Gemma: computed in float32, returned in x's dtype
        return rms_norm(xx, 1.0 + ww, eps).to(x.dtype)
    return rms_norm(xx, ww, eps)


def _rms_match(m: nn.Module):
    """(eps attribute, offset) when ``m`` is an RMSNorm, else (None, why or None)."""
    w = getattr(m, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 1 or next(m.children(), None) is not None:
        return None, None
    if getattr(m, "bias", None) is not None:
        return None, None
    eps_name = next((n for n in _EPS_NAMES if hasattr(m, n) and (getattr(m, n) is None or
                                                                 isinstance(getattr(m, n), (float, int)))), None)
    if eps_name is None:
        return None, None
    why = _probe_ready(m)
    if why:
        return None, why
    eps = getattr(m, eps_name)
    x = _probe((3, w.shape[0]), w)
    with torch.no_grad():
        try:
            y = m(x)
        except Exception as e:  # a module this probe cannot call is not one we swap
            return None, f"forward could not be probed ({type(e).__name__})"
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + (torch.finfo(x.dtype).eps if eps is None else eps))
        if _close(y, normed * w.float(), w):
            return (eps_name, False), None
        if _close(y, normed * (1.0 + w.float()), w):
            return (eps_name, True), None
    return None, "has a weight and an epsilon but does not compute RMSNorm (x * rsqrt(mean(x^2) + eps) * w)"


def _layer_norm_forward(self, x):
    if len(self.normalized_shape) != 1:
        return _orig_forward(self)(self, x)
    dt = _amp.promoted_dtype(x, self.weight, self.bias)
    if dt is None:
        return _orig_forward(self)(self, x)
    # autocast lists layer_norm as a float32 op on CUDA; on CPU it returns the input's dtype
    autocast32 = x.device.type == "cuda" and torch.is_autocast_enabled("cuda")
    out_dtype = torch.float32 if autocast32 else x.dtype
    xx, w, b = _amp.cast(torch.float32 if autocast32 else dt, x, self.weight, self.bias)
    return layer_norm(xx, w, b, self.eps).to(out_dtype)


# ---------------------------------------------------------------- gated MLP (SwiGLU, GeGLU)

def _mlp_weights(self):
    """(gate_w, up_w, down_w, gate_b, up_b, down_b) of a matched MLP, views of its parameters."""
    down = getattr(self, self._pycomm_down)
    if self._pycomm_merged:
        gu = getattr(self, self._pycomm_gate)
        n = gu.out_features // 2
        gb, ub = (None, None) if gu.bias is None else (gu.bias[:n], gu.bias[n:])
        return gu.weight[:n], gu.weight[n:], down.weight, gb, ub, down.bias
    gate, up = getattr(self, self._pycomm_gate), getattr(self, self._pycomm_up)
    return gate.weight, up.weight, down.weight, gate.bias, up.bias, down.bias


def _gated_forward(self, x):
    wg, wu, wd, bg, bu, bd = _mlp_weights(self)
    dt = _amp.matmul_dtype(x, wg, wu, wd, bg, bu, bd)
    if dt is None:
        return _orig_forward(self)(self, x)
    xx, wg, wu, wd, bg, bu, bd = _amp.cast(dt, x, wg, wu, wd, bg, bu, bd)
    return _gated_mlp(xx, wg, wu, wd, bg, bu, bd, self._pycomm_activation)


def _gated_kind(activation: str) -> str:
    return "swiglu" if activation == "silu" else "geglu"


def _gated_match(m: nn.Module):
    """(state, None) for a gate/up/down MLP whose activation the gated kernel has (state names
    the projections and the activation), (None, why) for one it lacks, (None, None) otherwise."""
    children = dict(m.named_children())
    down = children.get("down_proj")
    if type(down) is not nn.Linear:
        return None, None
    if type(children.get("gate_proj")) is nn.Linear and type(children.get("up_proj")) is nn.Linear:
        state = dict(gate="gate_proj", up="up_proj", down="down_proj", merged=False)
    elif type(children.get("gate_up_proj")) is nn.Linear and children["gate_up_proj"].out_features % 2 == 0:
        state = dict(gate="gate_up_proj", up=None, down="down_proj", merged=True)
    else:
        return None, None
    why = _probe_ready(m)
    if why:
        return None, why
    probe = types.SimpleNamespace(**{f"_pycomm_{k}": v for k, v in state.items()}, **children)
    wg, wu, wd, bg, bu, bd = _mlp_weights(probe)
    x = _probe((2, wg.shape[1]), wg)
    with torch.no_grad():
        try:
            y = m(x)
        except Exception as e:
            return None, f"forward could not be probed ({type(e).__name__})"
        gate, up = F.linear(x, wg, bg), F.linear(x, wu, bu)
        refs = {a: F.linear(_activations.torch_apply(gate, a) * up, wd, bd) for a in GATED}
    # tanh and erf GELU differ by ~1e-4 here: take the closest form, then require a match
    best = min(refs, key=lambda a: (y.float() - refs[a].float()).abs().max().item())
    if not _close(y, refs[best], wg):
        act = next((type(getattr(m, a)).__name__ for a in ("act_fn", "activation_fn", "act") if hasattr(m, a)), "?")
        return None, (f"gate/up/down MLP that is not down(act(gate) * up) with act silu or gelu "
                      f"(activation {act}); kept on torch")
    return dict(state, activation=best), None


# ---------------------------------------------------------------- rope (per instance)

def _rope_function(orig):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        dt = _amp.promoted_dtype(q, k, cos, sin)
        if dt is None or q.dtype != k.dtype or cos.dtype != sin.dtype:
            return orig(q, k, cos, sin, unsqueeze_dim)
        return rope(*_amp.cast(dt, q, k, cos, sin), unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb._pycomm_rope = True
    return apply_rotary_pos_emb


def _rebind(fn, old: dict, new: dict):
    """``fn`` with its globals ``old`` replaced by ``new``, through functools.wraps layers."""
    inner = getattr(fn, "__wrapped__", None)
    closure = fn.__closure__
    new_inner = None
    if inner is not None and closure:
        new_inner = _rebind(inner, old, new)
        cells = []
        for c in closure:
            try:
                cells.append(types.CellType(new_inner) if c.cell_contents is inner else c)
            except ValueError:  # an empty cell
                cells.append(c)
        closure = tuple(cells)
    out = types.FunctionType(fn.__code__, new if fn.__globals__ is old else fn.__globals__, fn.__name__,
                             fn.__defaults__, closure)
    out.__kwdefaults__ = fn.__kwdefaults__
    out.__dict__.update(fn.__dict__)
    out.__qualname__, out.__doc__ = fn.__qualname__, fn.__doc__
    if new_inner is not None:
        out.__wrapped__ = new_inner
    return out


_ROPE_FORWARDS: dict[type, object] = {}


def _rope_match(m: nn.Module):
    """The attention forward with ``apply_rotary_pos_emb`` rebound to ``kernels.rope``, else (None, why)."""
    base = type(m)
    fwd = base.forward
    if "apply_rotary_pos_emb" not in inspect.unwrap(fwd).__code__.co_names:
        return None, None
    if base in _ROPE_FORWARDS:
        return _ROPE_FORWARDS[base], None
    module_globals = inspect.unwrap(fwd).__globals__
    orig = module_globals.get("apply_rotary_pos_emb")
    if not callable(orig):
        return None, "forward names apply_rotary_pos_emb but its module defines none"
    params = list(inspect.signature(orig).parameters)
    if params != ["q", "k", "cos", "sin", "unsqueeze_dim"]:
        return None, f"apply_rotary_pos_emb{tuple(params)} is not (q, k, cos, sin, unsqueeze_dim)"
    D = getattr(m, "head_dim", None)
    p = next(m.parameters(), None)
    if not isinstance(D, int) or D % 2 or p is None or p.is_meta:
        return None, "no even head_dim (or no materialised parameters) to check the rotary layout with"
    q, k = _probe((1, 2, 3, D), p), _probe((1, 1, 3, D), p).flip(-1)
    ang = torch.arange(3, device=p.device, dtype=torch.float32)[:, None] * torch.linspace(0.1, 1.0, D // 2,
                                                                                             device=p.device)
    emb = torch.cat([ang, ang], -1)[None]
    cos, sin = emb.cos().to(p.dtype), emb.sin().to(p.dtype)
    def rotate_half(x):  # the layout kernels.rope computes (its tests hold it to this formula)
        return torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin[:, None] + x * cos[:, None]

    with torch.no_grad():
        want, got = orig(q, k, cos, sin), (rotate_half(q), rotate_half(k))
    if not (_close(want[0], got[0], p) and _close(want[1], got[1], p)):
        return None, "apply_rotary_pos_emb is not the rotate-half rotation kernels.rope computes"
    new_globals = dict(module_globals)
    new_globals["apply_rotary_pos_emb"] = _rope_function(orig)
    _ROPE_FORWARDS[base] = _rebind(fwd, module_globals, new_globals)
    return _ROPE_FORWARDS[base], None


# ---------------------------------------------------------------- Conv1D (GPT-2) with linear=True

def _conv1d_forward(self, x):
    dt = _amp.matmul_dtype(x, self.weight, self.bias)
    if dt is None:
        return _orig_forward(self)(self, x)
    xx, w, b = _amp.cast(dt, x, self.weight, self.bias)
    return matmul(xx.reshape(-1, xx.shape[-1]), w, b).reshape(*x.shape[:-1], w.shape[1])


def _is_conv1d(m: nn.Module) -> bool:
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    return (isinstance(w, nn.Parameter) and w.dim() == 2 and getattr(m, "nf", None) == w.shape[1]
            and getattr(m, "nx", None) == w.shape[0] and isinstance(b, nn.Parameter) and b.shape == (w.shape[1],)
            and next(m.children(), None) is None)


# ---------------------------------------------------------------- the causal-LM loss

def _causal_lm_forward(self, *args, **kwargs):
    orig = _orig_forward(self)
    labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
    if not self.training or (labels is None and shift_labels is None):
        return orig(self, *args, **kwargs)
    head = self.get_output_embeddings()
    if _amp.matmul_dtype(head.weight, head.weight, head.bias) is None:
        return orig(self, *args, **kwargs)
    bound = inspect.signature(orig).bind(self, *args, **kwargs).arguments
    bound.pop("self")
    extra = bound.pop(self._pycomm_var_kw, {}) if self._pycomm_var_kw else {}
    loss_args = {k: extra.pop(k) for k in ("num_items_in_batch", "shift_labels", "ignore_index") if k in extra}
    for k in ("labels", "logits_to_keep", "return_dict"):
        bound.pop(k, None)
    outputs = getattr(self, self.base_model_prefix)(**bound, **extra)
    hidden = outputs[0]
    loss = _hf.causal_lm_loss(hidden, head, labels, softcap=getattr(self.config, "final_logit_softcapping", None),
                              **loss_args)
    return _hf.causal_lm_output(loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
                                hidden_states=getattr(outputs, "hidden_states", None),
                                attentions=getattr(outputs, "attentions", None))


_LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier_scale", "logit_scale_init_value")


def _causal_lm_match(model: nn.Module):
    """(state, None) when ``model`` is a transformers-style causal LM whose loss FLCE can compute."""
    fwd = getattr(type(model), "forward", None)
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if fwd is None or not isinstance(head, nn.Linear):
        return None, None
    params = inspect.signature(fwd).parameters
    if "labels" not in params or "logits_to_keep" not in params:
        return None, None
    prefix = getattr(model, "base_model_prefix", None)
    if not isinstance(getattr(model, prefix or "", None), nn.Module):
        return None, "no base model under base_model_prefix to take the hidden states from"
    if "lm_head" not in inspect.unwrap(fwd).__code__.co_names:
        return None, "forward does not compute its logits with self.lm_head"
    config = getattr(model, "config", None)
    scales = [a for a in _LOGIT_SCALES if getattr(config, a, None) not in (None, 1, 1.0)]
    if scales:
        return None, f"config scales the logits ({', '.join(scales)}), which the fused loss does not"
    var_kw = next((n for n, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    return dict(var_kw=var_kw), None


# ---------------------------------------------------------------- the walk

def _linear_fusions(module: nn.Module, report: PatchReport, prefix: str) -> set[str]:
    """In an nn.Sequential, Linear + GELU/ReLU/SiLU -> one kernels.nn.Linear(activation=...)."""
    fused = set()
    if not isinstance(module, nn.Sequential):
        return fused
    children = list(module.named_children())
    for (name, child), (nxt_name, nxt) in zip(children, children[1:]):
        if type(child) is nn.Linear and type(nxt) in _FUSABLE and name not in fused:
            act = _FUSABLE[type(nxt)](nxt)
            setattr(module, name, knn.Linear.from_torch(child, activation=act))
            setattr(module, nxt_name, nn.Identity())
            report.swapped["linear"].append(f"{prefix}{name}: Linear + {type(nxt).__name__} -> "
                                            f"kernels.nn.Linear(activation={act!r})")
            fused.update((name, nxt_name))
    return fused


def _walk(module: nn.Module, prefix: str, on: dict, report: PatchReport) -> None:
    fused = _linear_fusions(module, report, prefix)
    for name, child in list(module.named_children()):
        if name in fused:
            continue
        path = f"{prefix}{name}"
        if not _visit(module, name, child, path, on, report):
            _walk(child, path + ".", on, report)


def _visit(parent: nn.Module, name: str, m: nn.Module, path: str, on: dict, report: PatchReport) -> bool:
    """Patch ``m`` if it is a kind we know; True when its children need no visit."""
    kind = getattr(type(m), "_pycomm_kind", None)
    cls = type(m).__name__
    if kind is not None:  # patched before: report it again, change nothing
        report.swapped[kind].append(f"{path}: {cls} (already patched)")
        return kind != "rope"
    if isinstance(m, (knn.Linear, knn.LayerNorm, knn.RMSNorm, knn.MultiheadAttention, knn.MergedQKVAttention)):
        report.swapped["linear" if isinstance(m, knn.Linear) else "attention"].append(f"{path}: kernels.nn.{cls}")
        return True
    if type(m) is nn.LayerNorm:
        if not on["layer_norm"]:
            report.left["layer_norm"].append(f"{path}: layer_norm=False")
        elif len(m.normalized_shape) != 1 or m.weight is None or m.bias is None:
            report.left["layer_norm"].append(f"{path}: normalises more than the last dim, or has no weight/bias")
        else:
            _swap(m, "layer_norm", _layer_norm_forward)
            report.swapped["layer_norm"].append(f"{path}: nn.LayerNorm -> kernels.layer_norm")
        return True
    if type(m) is nn.MultiheadAttention:
        if not on["attention"]:
            report.left["attention"].append(f"{path}: attention=False")
        elif not m.batch_first:
            report.left["attention"].append(f"{path}: batch_first=False (the kernels take (batch, seq, embed))")
        elif not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            report.left["attention"].append(f"{path}: kdim/vdim differ from embed_dim, or bias_k/add_zero_attn")
        else:
            setattr(parent, name, knn.MultiheadAttention(m))
            report.swapped["attention"].append(f"{path}: nn.MultiheadAttention -> kernels.nn.MultiheadAttention")
        return True
    if type(m) is nn.Linear:
        if on["linear"]:
            setattr(parent, name, knn.Linear.from_torch(m))
            report.swapped["linear"].append(f"{path}: nn.Linear -> kernels.nn.Linear")
        else:
            report.left["linear"].append(f"{path}: nn.Linear {_LINEAR_LEFT}")
        return True
    if _is_conv1d(m):
        if on["linear"]:
            _swap(m, "linear", _conv1d_forward)
            report.swapped["linear"].append(f"{path}: {cls} -> kernels.matmul")
        else:
            report.left["linear"].append(f"{path}: {cls} (x @ W + b) {_LINEAR_LEFT}")
        return True
    state, why = _rms_match(m)
    if state is not None or why is not None:
        if _wanted(report, on, "rms_norm", path, cls, why):
            eps_name, offset = state
            _swap(m, "rms_norm", _rms_forward, eps=eps_name, offset=offset)
            form = " (1 + weight)" if offset else ""
            report.swapped["rms_norm"].append(f"{path}: {cls} -> kernels.rms_norm{form}")
        return True
    state, why = _gated_match(m)
    if state is not None or why is not None:
        kind = "swiglu" if state is None else _gated_kind(state["activation"])
        if not _wanted(report, on, kind, path, cls, why):
            return False  # its Linears may still be swapped
        _swap(m, kind, _gated_forward, **state)
        fn = "swiglu_mlp" if kind == "swiglu" else f"geglu_mlp ({state['activation']})"
        report.swapped[kind].append(f"{path}: {cls} -> kernels.{fn}")
        return True
    forward, why = _rope_match(m)
    if (forward is not None or why is not None) and _wanted(report, on, "rope", path, cls, why):
        _swap(m, "rope", forward)
        report.swapped["rope"].append(f"{path}: {cls}.apply_rotary_pos_emb -> kernels.rope")
    return False


def _wanted(report, on, kind: str, path: str, cls: str, why: str | None) -> bool:
    """Whether a module that matched `kind` is swapped: not if the match found a reason
    against it (`why`) or the caller turned `kind` off; the report says which."""
    if why is not None:
        report.left[kind].append(f"{path}: {cls} {why}")
        return False
    if not on[kind]:
        report.left[kind].append(f"{path}: {kind}=False")
        return False
    return True


def _hf_attention_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if "ALL_ATTENTION_FUNCTIONS" in inspect.unwrap(type(m).forward).__code__.co_names]


def patch(model: nn.Module, *, rms_norm: bool = True, layer_norm: bool = True, swiglu: bool = True,
          geglu: bool = True, rope: bool = True, attention: bool = True, fused_linear_cross_entropy: bool = True,
          linear: bool = False, verbose: bool = True) -> nn.Module:
    """Route ``model``'s norms, SwiGLU and GeGLU MLPs, rotary embeddings, attention and causal-LM loss through
    the kernels, in place (see the module docstring); return ``model``.  The report is
    ``model.kernels_patch_report`` (a :class:`PatchReport`), printed when ``verbose``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a torch.nn.Module, got {type(model).__name__}")
    on = dict(rms_norm=rms_norm, layer_norm=layer_norm, swiglu=swiglu, geglu=geglu, rope=rope, attention=attention,
              fused_linear_cross_entropy=fused_linear_cross_entropy, linear=linear)
    report = PatchReport()
    if type(model) in (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.MultiheadAttention):
        raise ValueError(
            f"patch swaps submodules in place, but the model itself is a {type(model).__name__}; "
            "wrap it (e.g. nn.Sequential(model)) or use the kernels.nn module directly"
        )
    top = getattr(type(model), "_pycomm_kind", None)
    if top == "fused_linear_cross_entropy":
        report.swapped[top].append(f"<model>: {type(model).__name__} (already patched)")
    else:
        state, why = _causal_lm_match(model)
        if why is not None:
            report.left["fused_linear_cross_entropy"].append(f"<model>: {why}")
        elif state is not None and not fused_linear_cross_entropy:
            report.left["fused_linear_cross_entropy"].append("<model>: fused_linear_cross_entropy=False")
        elif state is not None:
            _swap(model, "fused_linear_cross_entropy", _causal_lm_forward, **state)
            report.swapped["fused_linear_cross_entropy"].append(
                f"<model>: {type(model).__name__} training loss -> kernels.fused_linear_cross_entropy")
    _walk(model, "", on, report)
    config = getattr(model, "config", None)
    hf_attention = _hf_attention_modules(model) if config is not None else []
    if hf_attention and not attention:
        report.left["attention"] += [f"{n}: attention=False" for n in hf_attention]
    elif hf_attention:
        _hf.register_attention()
        before = getattr(config, "_attn_implementation", None)
        if before != _hf.NAME:
            model.set_attn_implementation(_hf.NAME)
        what = "(already patched)" if before == _hf.NAME else f"{before} -> {_hf.NAME}"
        report.swapped["attention"] += [f"{n}: {what} (kernels.flash_attention)" for n in hf_attention]
    model.kernels_patch_report = report
    if verbose:
        print(report, file=sys.stdout)
    return model
