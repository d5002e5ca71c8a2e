"""Tensor-parallel layers: column- and row-parallel linear, vocabulary-parallel embedding.

Contract
--------
Each layer holds one tensor-parallel rank's shard of a dense layer and has the dense layer's
parameter names (``weight``, ``bias``), so a full state dict of a parallel model has the keys of
the dense one.  Built directly, a layer first draws the *full* dense initialisation from the
default generator (identical on every rank after ``parallel.manual_seed``) and keeps its slice:
the same seed gives the same model at every tensor-parallel degree.  ``from_dense(module,
group)`` slices an existing ``nn.Linear``/``nn.Embedding`` without drawing random numbers.

Sharding is described per parameter by :meth:`TensorParallelModule.partition`: ``(dim,
indices)`` where ``indices[r]`` lists the rows (along ``dim``) of the full tensor that rank ``r``
holds, or ``None`` for a replicated parameter.  ``shard_full`` and ``gather_full`` (a collective
over the group) convert between full and local tensors; checkpoints use them.

Shapes: ``ColumnParallelLinear`` maps ``[..., in]`` (replicated) to ``[..., out/tp]`` (or
``[..., out]`` with ``gather_output``); ``RowParallelLinear`` maps ``[..., in/tp]`` (or the full
``[..., in]`` with ``input_is_parallel=False``) to the replicated ``[..., out]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import pycomm
from pycomm.distributed import Group

from .mappings import (
    copy_to_tensor_parallel,
    gather_from_tensor_parallel,
    reduce_from_tensor_parallel,
    resolve_tp_group,
    scatter_to_tensor_parallel,
)

__all__ = ["TensorParallelModule", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding"]


def _contiguous_parts(n: int, size: int) -> list[torch.Tensor]:
    step = n // size
    return [torch.arange(r * step, (r + 1) * step) for r in range(size)]


def _check_divides(what: str, n: int, size: int, hint: str) -> None:
    if n % size:
        raise ValueError(
            f"{what}={n} is not divisible by the tensor-parallel size {size}; {hint}"
        )


class TensorParallelModule(nn.Module):
    """Base of layers whose own parameters are sharded over ``self.group``."""

    group: Group

    def partition(self, name: str) -> tuple[int, list[torch.Tensor]] | None:
        """How the full parameter ``name`` is split: (dim, per-rank indices) or None."""
        raise NotImplementedError

    def shard_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor of parameter ``name``."""
        spec = self.partition(name)
        if spec is None:
            return full.clone()
        dim, parts = spec
        return full.index_select(dim, parts[self.group.rank]).contiguous()

    def gather_full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The full tensor of parameter ``name`` from every rank's ``local`` (collective)."""
        spec = self.partition(name)
        if spec is None or self.group.size == 1:
            return local.detach().clone()
        dim, parts = spec
        local = local.detach().contiguous()
        flat = torch.empty(self.group.size * local.numel(), dtype=local.dtype)
        pycomm.all_gather(flat, local.view(-1), group=self.group)
        shape = list(local.shape)
        shape[dim] = sum(len(p) for p in parts)
        full = torch.empty(shape, dtype=local.dtype)
        for r, piece in enumerate(flat.view(self.group.size, *local.shape).unbind(0)):
            full.index_copy_(dim, parts[r], piece)
        return full

    def load_full_(self, full: dict[str, torch.Tensor]) -> None:
        """Copy this rank's shards of the full tensors ``full[name]`` into the parameters."""
        with torch.no_grad():
            for name, p in self.named_parameters(recurse=False):
                p.copy_(self.shard_full(name, full[name]))


class ColumnParallelLinear(TensorParallelModule):
    """``y = x W^T + b`` with W's output rows split over the group (Megatron's column split).

    The input is replicated; forward applies f (identity, all-reduce of the input gradient),
    so a column layer followed by a row layer needs one all-reduce each way.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 gather_output: bool = False, group: Group | None = None,
                 partition: list[torch.Tensor] | None = None):
        super().__init__()
        self._setup(in_features, out_features, bias, gather_output, group, partition)
        self.load_full_(dict(nn.Linear(in_features, out_features, bias=bias).named_parameters()))

    def _setup(self, in_features, out_features, bias, gather_output, group, partition):
        self.group = resolve_tp_group(group)
        size = self.group.size
        if partition is None:
            _check_divides("ColumnParallelLinear out_features", out_features, size,
                           f"use a multiple of {size} or another tp degree")
            partition = _contiguous_parts(out_features, size)
        self._rows = [torch.as_tensor(p, dtype=torch.long) for p in partition]
        if len(self._rows) != size or sorted(torch.cat(self._rows).tolist()) != list(range(out_features)):
            raise ValueError(f"partition must give each of the {size} ranks distinct rows covering "
                             f"0..{out_features - 1}")
        self.in_features, self.out_features, self.gather_output = in_features, out_features, gather_output
        local = len(self._rows[self.group.rank])
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.empty(local)) if bias else None

    def partition(self, name):
        return (0, self._rows)

    @classmethod
    def from_dense(cls, module: nn.Linear, group: Group | None = None, gather_output: bool = False,
                   partition: list[torch.Tensor] | None = None) -> ColumnParallelLinear:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"ColumnParallelLinear.from_dense takes an nn.Linear, got {type(module).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(module.in_features, module.out_features, module.bias is not None,
                    gather_output, group, partition)
        self.load_full_(dict(module.named_parameters()))
        return self

    def forward(self, x: torch.Tensor, skip_bias_add: bool = False) -> torch.Tensor:
        """``skip_bias_add=True``: return ``x W^T`` without the bias, for a caller that fuses the
        (local) bias into the next op, e.g. ``kernels.bias_gelu(y, self.bias)``."""
        if skip_bias_add and self.gather_output:
            raise ValueError("skip_bias_add needs gather_output=False: the bias left out is this rank's slice")
        bias = None if skip_bias_add else self.bias
        y = F.linear(copy_to_tensor_parallel(x, self.group), self.weight, bias)
        return gather_from_tensor_parallel(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"({self.weight.shape[0]} on this rank of {self.group.size}), bias={self.bias is not None}")


class RowParallelLinear(TensorParallelModule):
    """``y = x W^T + b`` with W's input columns split over the group.

    Each rank computes a partial sum from its slice of the input; g (all-reduce forward,
    identity backward) completes it; the bias (replicated) is added once, after the sum.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 input_is_parallel: bool = True, group: Group | None = None):
        super().__init__()
        self._setup(in_features, out_features, bias, input_is_parallel, group)
        self.load_full_(dict(nn.Linear(in_features, out_features, bias=bias).named_parameters()))

    def _setup(self, in_features, out_features, bias, input_is_parallel, group):
        self.group = resolve_tp_group(group)
        size = self.group.size
        _check_divides("RowParallelLinear in_features", in_features, size,
                       f"use a multiple of {size} or another tp degree")
        self._cols = _contiguous_parts(in_features, size)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        self.weight = nn.Parameter(torch.empty(out_features, in_features // size))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def partition(self, name):
        return (1, self._cols) if name == "weight" else None

    @classmethod
    def from_dense(cls, module: nn.Linear, group: Group | None = None,
                   input_is_parallel: bool = True) -> RowParallelLinear:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"RowParallelLinear.from_dense takes an nn.Linear, got {type(module).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(module.in_features, module.out_features, module.bias is not None,
                    input_is_parallel, group)
        self.load_full_(dict(module.named_parameters()))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel(x, self.group)
        y = reduce_from_tensor_parallel(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.weight.shape[1]} on this rank of "
                f"{self.group.size}), out_features={self.out_features}, bias={self.bias is not None}")


class VocabParallelEmbedding(TensorParallelModule):
    """Embedding with the vocabulary (rows) split over the group.

    Each rank looks up the ids in its range ``[start, end)`` and writes zeros for the others;
    the all-reduce (g) sums the one non-zero contribution per token.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Group | None = None):
        super().__init__()
        self._setup(num_embeddings, embedding_dim, group)
        self.load_full_(dict(nn.Embedding(num_embeddings, embedding_dim).named_parameters()))

    def _setup(self, num_embeddings, embedding_dim, group):
        self.group = resolve_tp_group(group)
        size = self.group.size
        _check_divides("VocabParallelEmbedding num_embeddings", num_embeddings, size,
                       f"pad the vocabulary to a multiple of {size}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per = num_embeddings // size
        self.vocab_start, self.vocab_end = self.group.rank * per, (self.group.rank + 1) * per
        self._rows = _contiguous_parts(num_embeddings, size)
        self.weight = nn.Parameter(torch.empty(per, embedding_dim))

    def partition(self, name):
        return (0, self._rows)

    @classmethod
    def from_dense(cls, module: nn.Embedding, group: Group | None = None) -> VocabParallelEmbedding:
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"VocabParallelEmbedding.from_dense takes an nn.Embedding, got {type(module).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(module.num_embeddings, module.embedding_dim, group)
        self.load_full_(dict(module.named_parameters()))
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} (rows {self.vocab_start}..{self.vocab_end - 1} "
                f"on this rank of {self.group.size})")
