"""Random numbers under tensor parallelism: dropout that is reproducible per rank.

Two streams, as in Megatron's ``random.py`` (without its global CUDA tracker):

* the default torch generator, seeded identically on every rank by :func:`manual_seed`, draws
  everything that must agree across tensor-parallel ranks: initialisation of full weights
  before slicing, and dropout on *replicated* activations (after a row-parallel all-reduce, on
  the residual stream), so the replicas stay bit-identical;
* a tensor-parallel generator seeded ``seed + 2718 + tp_rank`` draws dropout on *sharded*
  activations (attention probabilities of this rank's heads, the column-parallel hidden), so
  each shard gets its own mask, and the same mask again for the same seed and rank.

:func:`get_rng_state` / :func:`set_rng_state` cover both streams, which activation
checkpointing needs to recompute a forward with the same masks.
"""
from __future__ import annotations

import torch

from .mesh import current_mesh

__all__ = ["manual_seed", "dropout", "get_rng_state", "set_rng_state", "tensor_parallel_generator"]

_OFFSET = 2718  # Megatron's: keeps the TP stream away from the default one for small seeds
_tp_gen: torch.Generator | None = None


def manual_seed(seed: int, tp_rank: int | None = None) -> None:
    """Seed both streams; ``tp_rank`` defaults to the current mesh's (0 without a mesh)."""
    global _tp_gen
    if tp_rank is None:
        mesh = current_mesh()
        tp_rank = mesh.tp_rank if mesh is not None else 0
    torch.manual_seed(seed)
    _tp_gen = torch.Generator().manual_seed(seed + _OFFSET + tp_rank)


def tensor_parallel_generator() -> torch.Generator:
    """The per-tensor-parallel-rank generator (seeded from torch's initial seed if never set)."""
    global _tp_gen
    if _tp_gen is None:
        mesh = current_mesh()
        _tp_gen = torch.Generator().manual_seed(
            torch.initial_seed() + _OFFSET + (mesh.tp_rank if mesh is not None else 0)
        )
    return _tp_gen


def dropout(x: torch.Tensor, p: float, training: bool, sharded: bool) -> torch.Tensor:
    """Inverted dropout; ``sharded=True`` for activations that differ across tensor-parallel
    ranks (per-rank stream), False for replicated ones (common stream)."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got p={p}")
    gen = tensor_parallel_generator() if sharded else None
    keep = torch.rand(x.shape, generator=gen, dtype=torch.float32) >= p
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def get_rng_state() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.get_rng_state(), tensor_parallel_generator().get_state()


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.set_rng_state(state[0])
    tensor_parallel_generator().set_state(state[1])
