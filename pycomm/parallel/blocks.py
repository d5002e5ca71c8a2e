"""Transformer blocks, dense and tensor-parallel: MLP and causal self-attention.

Contract
--------
``MLP`` / ``SelfAttention`` are the dense reference blocks; ``ParallelMLP`` /
``ParallelSelfAttention`` hold one tensor-parallel rank's shard of them, with the same parameter
names, and compute the same function of a replicated ``[batch, seq, hidden]`` input, returning a
replicated output.  Built directly, a parallel block draws the dense block's initialisation (same
order of random draws) and keeps its shard; ``from_dense(block, group)`` shards an existing one.

* MLP: ``fc2(gelu(fc1(x)))``, fc1 column-parallel, fc2 row-parallel: one all-reduce forward (g
  after fc2) and one backward (f before fc1).  fc1's bias and the GELU are one fused kernel,
  ``kernels.bias_gelu``, applied to fc1's matmul (``skip_bias_add``): the bias is sharded with
  fc1's columns, so each rank fuses its own slice.
* Attention: a merged QKV projection whose output rows are laid out ``[Q: num_heads*d, K:
  num_kv_heads*d, V: num_kv_heads*d]`` in the dense block.  Tensor parallelism splits it by whole
  key/value groups: rank r holds KV groups ``r*KV/tp ..`` with all their query heads, so its
  local rows are again ``[Q, K, V]`` of ``num_heads/tp`` and ``num_kv_heads/tp`` heads and the
  same attention code runs on the shard.  ``proj`` is row-parallel over the heads.
  Grouped-query attention: query head h uses key/value head ``h // (num_heads/num_kv_heads)``.
  The attention itself is ``kernels.flash_attention(q, k, v, causal=True)`` (GQA without
  repeating k/v), except when attention-probability dropout is active: the kernel has no
  dropout, so that case computes the probabilities explicitly.

Kernels dispatch per call (``kernels/_dispatch.py``): Triton on CUDA tensors or under
``TRITON_INTERPRET=1``, their PyTorch fallback otherwise; ``PYCOMM_KERNELS_BACKEND`` overrides.

Dropout: attention-probability dropout is on sharded heads (per-rank stream), output dropout on
the replicated result (common stream), see ``random.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pycomm import kernels
from pycomm.distributed import Group

from .layers import ColumnParallelLinear, RowParallelLinear
from .mappings import resolve_tp_group
from .random import dropout

__all__ = ["MLP", "SelfAttention", "ParallelMLP", "ParallelSelfAttention"]


class MLP(nn.Module):
    """Dense ``fc2(gelu(fc1(x)))`` with output dropout."""

    def __init__(self, hidden: int, ffn_hidden: int | None = None, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        ffn_hidden = ffn_hidden or 4 * hidden
        self.fc1 = nn.Linear(hidden, ffn_hidden, bias=bias)
        self.fc2 = nn.Linear(ffn_hidden, hidden, bias=bias)
        self.dropout = dropout

    def forward(self, x):
        h = _bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias)
        return dropout(self.fc2(h), self.dropout, self.training, sharded=False)


def _bias_gelu(h, bias):
    """``gelu(h + bias)`` as one kernel (``h`` is fc1's output without its bias)."""
    return F.gelu(h) if bias is None else kernels.bias_gelu(h, bias)


class ParallelMLP(nn.Module):
    """Tensor-parallel MLP: column-parallel fc1, row-parallel fc2 (module docstring)."""

    def __init__(self, hidden: int, ffn_hidden: int | None = None, bias: bool = True,
                 dropout: float = 0.0, group: Group | None = None):
        super().__init__()
        self._from(MLP(hidden, ffn_hidden, bias, dropout), group)

    def _from(self, dense: MLP, group):
        group = resolve_tp_group(group)
        self.fc1 = ColumnParallelLinear.from_dense(dense.fc1, group)
        self.fc2 = RowParallelLinear.from_dense(dense.fc2, group)
        self.dropout = dense.dropout

    @classmethod
    def from_dense(cls, module: MLP, group: Group | None = None) -> ParallelMLP:
        if not isinstance(module, MLP):
            raise TypeError(f"ParallelMLP.from_dense takes a parallel.MLP, got {type(module).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._from(module, group)
        return self

    def forward(self, x):
        h = _bias_gelu(self.fc1(x, skip_bias_add=True), self.fc1.bias)
        return dropout(self.fc2(h), self.dropout, self.training, sharded=False)


def _attend(q, k, v, p: float, training: bool) -> torch.Tensor:
    """Causal attention of ``q [B,H,S,d]`` over ``k, v [B,KV,S,d]``; probabilities dropped out
    with the tensor-parallel stream (heads are sharded)."""
    if not training or p == 0.0:
        return kernels.flash_attention(q, k, v, causal=True)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
    return dropout(probs, p, training, sharded=True) @ v


def _check_heads(hidden, num_heads, num_kv_heads, tp):
    if hidden % num_heads:
        raise ValueError(f"hidden={hidden} is not divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}; "
                         f"each key/value head serves a whole group of query heads")
    if num_heads % tp:
        raise ValueError(f"num_heads={num_heads} is not divisible by the tensor-parallel size {tp}; "
                         f"use a tp degree that divides {num_heads}")
    if num_kv_heads % tp:
        raise ValueError(f"num_kv_heads={num_kv_heads} is not divisible by the tensor-parallel size "
                         f"{tp} (attention is split by whole key/value groups); use a tp degree "
                         f"that divides {num_kv_heads}")


class SelfAttention(nn.Module):
    """Dense causal self-attention with a merged QKV projection (module docstring)."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int | None = None,
                 bias: bool = True, attn_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        _check_heads(hidden, num_heads, num_kv_heads, 1)
        self.head_dim = hidden // num_heads
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.qkv = nn.Linear(hidden, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(num_heads * self.head_dim, hidden, bias=bias)
        self.attn_dropout, self.dropout = attn_dropout, dropout

    def forward(self, x):
        return _attention_forward(self, x, self.num_heads, self.num_kv_heads)


def _attention_forward(mod, x, heads, kv_heads):
    b, s, _ = x.shape
    d = mod.head_dim
    qkv = mod.qkv(x)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = q.view(b, s, heads, d).transpose(1, 2)
    k = k.view(b, s, kv_heads, d).transpose(1, 2)
    v = v.view(b, s, kv_heads, d).transpose(1, 2)
    o = _attend(q, k, v, mod.attn_dropout, mod.training).transpose(1, 2).reshape(b, s, heads * d)
    return dropout(mod.proj(o), mod.dropout, mod.training, sharded=False)


def _qkv_partition(num_heads: int, num_kv_heads: int, d: int, tp: int) -> list[torch.Tensor]:
    """Rows of the dense merged QKV weight held by each rank: whole KV groups, [Q, K, V] order."""
    per_group = num_heads // num_kv_heads
    groups_per_rank = num_kv_heads // tp
    parts = []
    for r in range(tp):
        gs = range(r * groups_per_rank, (r + 1) * groups_per_rank)
        q = [torch.arange(h * d, (h + 1) * d) for g in gs for h in range(g * per_group, (g + 1) * per_group)]
        k = [torch.arange((num_heads + g) * d, (num_heads + g + 1) * d) for g in gs]
        v = [torch.arange((num_heads + num_kv_heads + g) * d, (num_heads + num_kv_heads + g + 1) * d) for g in gs]
        parts.append(torch.cat(q + k + v))
    return parts


class ParallelSelfAttention(nn.Module):
    """Tensor-parallel causal self-attention, split by whole heads and KV groups."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int | None = None,
                 bias: bool = True, attn_dropout: float = 0.0, dropout: float = 0.0,
                 group: Group | None = None):
        super().__init__()
        group = resolve_tp_group(group)
        # Check before building the dense block so the error names the tensor-parallel size.
        _check_heads(hidden, num_heads, num_kv_heads or num_heads, group.size)
        self._from(SelfAttention(hidden, num_heads, num_kv_heads, bias, attn_dropout, dropout), group)

    def _from(self, dense: SelfAttention, group):
        group = resolve_tp_group(group)
        tp = group.size
        _check_heads(dense.proj.out_features, dense.num_heads, dense.num_kv_heads, tp)
        self.head_dim = dense.head_dim
        self.num_heads, self.num_kv_heads = dense.num_heads, dense.num_kv_heads
        self.local_heads, self.local_kv_heads = dense.num_heads // tp, dense.num_kv_heads // tp
        self.qkv = ColumnParallelLinear.from_dense(
            dense.qkv, group, partition=_qkv_partition(dense.num_heads, dense.num_kv_heads, dense.head_dim, tp))
        self.proj = RowParallelLinear.from_dense(dense.proj, group)
        self.attn_dropout, self.dropout = dense.attn_dropout, dense.dropout

    @classmethod
    def from_dense(cls, module: SelfAttention, group: Group | None = None) -> ParallelSelfAttention:
        if not isinstance(module, SelfAttention):
            raise TypeError(f"ParallelSelfAttention.from_dense takes a parallel.SelfAttention, "
                            f"got {type(module).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._from(module, group)
        return self

    def forward(self, x):
        return _attention_forward(self, x, self.local_heads, self.local_kv_heads)
