"""``torch.nn`` modules backed by the kernels: drop-in replacements with the same parameters and
state-dict keys as their torch counterparts (``kernels.patch`` swaps them in place).

* ``Linear``: ``nn.Linear`` whose forward is ``kernels.matmul`` (optionally with a fused
  activation, which ``kernels.patch`` uses to fold a following GELU/ReLU/SiLU into the matmul).
* ``RMSNorm``, ``LayerNorm``: normalisation over the last dimension.
* ``MergedQKVAttention``: self-attention with one merged QKV projection, flash attention
  (causal by default, grouped-query when ``num_kv_heads < num_heads``) and an output projection.
* ``MultiheadAttention``: what ``kernels.patch`` puts in place of a batch-first
  ``nn.MultiheadAttention``; the same call signature, the kernels for self-attention calls
  without masks or returned weights, torch's own computation otherwise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _amp
from .layer_norm import layer_norm
from .matmul import check_activation, matmul
from .qkv_attention import qkv_attention
from .rms_norm import rms_norm

_ACTIVATIONS = {None: lambda y: y, "relu": F.relu, "gelu": F.gelu, "silu": F.silu,
                "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}


class Linear(nn.Linear):
    """``nn.Linear`` computed by ``kernels.matmul``; ``activation`` (None, "relu", "gelu",
    "gelu_tanh", "silu") is applied in the matmul's epilogue."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, activation=None):
        check_activation(activation)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    @classmethod
    def from_torch(cls, linear: nn.Linear, activation=None) -> Linear:
        """Wrap an existing ``nn.Linear``, sharing its parameter objects (optimisers keep working)."""
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                dtype=linear.weight.dtype, activation=activation)
        m.weight = linear.weight
        m.bias = linear.bias
        return m

    def forward(self, x):
        dt = _amp.matmul_dtype(x, self.weight, self.bias)
        if dt is None:  # float64 and friends: torch's linear, then the activation
            return _ACTIVATIONS[self.activation](F.linear(x, self.weight, self.bias))
        x, w, b = _amp.cast(dt, x, self.weight, self.bias)  # autocast's dtype, as F.linear would
        # weight.t() is a strided view; the matmul kernel reads it in place.
        return matmul(x, w.t(), b, self.activation)

    def extra_repr(self):
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension (``eps=None`` means ``finfo(dtype).eps``, as torch)."""

    def __init__(self, hidden_size: int, eps: float | None = 1e-6, elementwise_affine: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype)) if elementwise_affine else None

    @classmethod
    def from_torch(cls, norm: nn.RMSNorm) -> RMSNorm:
        (n,) = norm.normalized_shape
        m = cls(n, eps=norm.eps, elementwise_affine=False)
        m.weight = norm.weight
        return m

    def forward(self, x):
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return rms_norm(x, self.weight, eps)

    def extra_repr(self):
        return f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.weight is not None}"


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension, computed by ``kernels.layer_norm``."""

    @classmethod
    def from_torch(cls, norm: nn.LayerNorm) -> LayerNorm:
        m = cls(norm.normalized_shape, eps=norm.eps, elementwise_affine=False, bias=False)
        m.elementwise_affine = norm.elementwise_affine
        m.weight = norm.weight
        m.bias = norm.bias
        return m

    def forward(self, x):
        if len(self.normalized_shape) != 1:
            raise ValueError(
                f"kernels.nn.LayerNorm normalises the last dimension only; got normalized_shape "
                f"{tuple(self.normalized_shape)} (use torch.nn.LayerNorm for that)"
            )
        return layer_norm(x, self.weight, self.bias, self.eps)


class MergedQKVAttention(nn.Module):
    """Self-attention ``(B, S, E) -> (B, S, E)`` with a merged QKV projection.

    ``qkv_weight`` is ``((H + 2*H_kv) * D, E)`` (rows of Wq, Wk, Wv), ``D = embed_dim // num_heads``.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, bias: bool = True,
                 causal: bool = True, device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.embed_dim, self.num_heads, self.num_kv_heads, self.causal = embed_dim, num_heads, num_kv_heads, causal
        self.head_dim = embed_dim // num_heads
        rows = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.qkv_weight = nn.Parameter(torch.empty(rows, embed_dim, device=device, dtype=dtype))
        self.qkv_bias = nn.Parameter(torch.empty(rows, device=device, dtype=dtype)) if bias else None
        self.out_proj = Linear(num_heads * self.head_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        self._reset_qkv()

    def _reset_qkv(self):
        # nn.Linear's initialisation, applied to the merged projection.
        nn.init.kaiming_uniform_(self.qkv_weight, a=math.sqrt(5))
        if self.qkv_bias is not None:
            bound = 1 / math.sqrt(self.embed_dim)
            nn.init.uniform_(self.qkv_bias, -bound, bound)

    @classmethod
    def from_separate(cls, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, o_proj: nn.Linear,
                      num_heads: int, num_kv_heads: int | None = None, causal: bool = True):
        """Build from separate q/k/v/o projections (copies the q/k/v weights into one matrix;
        ``o_proj``'s parameters are shared)."""
        E = q_proj.in_features
        if q_proj.out_features % num_heads != 0:
            raise ValueError(f"q_proj.out_features={q_proj.out_features} is not a multiple of num_heads={num_heads}")
        D = q_proj.out_features // num_heads
        if num_kv_heads is None:
            num_kv_heads = k_proj.out_features // D
        for name, p in (("k_proj", k_proj), ("v_proj", v_proj)):
            if p.in_features != E or p.out_features != num_kv_heads * D:
                raise ValueError(f"{name} must map {E} -> {num_kv_heads * D} features, "
                                 f"got {p.in_features} -> {p.out_features}")
        if o_proj.in_features != num_heads * D:
            raise ValueError(f"o_proj must take {num_heads * D} features, got {o_proj.in_features}")
        w = q_proj.weight
        m = cls(E, num_heads, num_kv_heads, bias=False, causal=causal, device="meta", dtype=w.dtype)
        m.head_dim = D
        m.embed_dim = E
        with torch.no_grad():
            m.qkv_weight = nn.Parameter(torch.cat([q_proj.weight, k_proj.weight, v_proj.weight], 0))
            projs = (q_proj, k_proj, v_proj)
            if any(p.bias is not None for p in projs):
                m.qkv_bias = nn.Parameter(torch.cat([
                    p.bias if p.bias is not None else torch.zeros(p.out_features, dtype=w.dtype, device=w.device)
                    for p in projs
                ]))
        m.out_proj = Linear.from_torch(o_proj)
        return m

    def forward(self, x):
        y = qkv_attention(x, self.qkv_weight, self.qkv_bias, num_heads=self.num_heads,
                          num_kv_heads=self.num_kv_heads, causal=self.causal)
        return self.out_proj(y)

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}")


class MultiheadAttention(nn.Module):
    """Stand-in for a batch-first ``nn.MultiheadAttention`` (same parameters, same call).

    Runs ``qkv_attention`` when called as self-attention (``query is key is value``) with
    ``need_weights=False``, no ``key_padding_mask``, no dropout in effect, and either no
    ``attn_mask`` or ``is_causal=True`` (the mask is then taken as the causal hint, as torch does).
    Any other call is computed by ``F.multi_head_attention_forward`` with the same parameters,
    so results never silently change meaning.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout = mha.embed_dim, mha.num_heads, mha.dropout
        self.batch_first = True
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = Linear.from_torch(mha.out_proj)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        fast = (
            query is key and key is value and query.dim() == 3 and key_padding_mask is None
            and not need_weights and (attn_mask is None or is_causal)
            and (self.dropout == 0.0 or not self.training)
        )
        if fast:
            y = qkv_attention(query, self.in_proj_weight, self.in_proj_bias, num_heads=self.num_heads,
                              causal=bool(is_causal))
            return self.out_proj(y), None
        q, k, v = (t.transpose(0, 1) if t.dim() == 3 else t for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            q, k, v, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias, None, None, False,
            self.dropout, self.out_proj.weight, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        return (out.transpose(0, 1) if query.dim() == 3 else out), weights

    def extra_repr(self):
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first=True"
