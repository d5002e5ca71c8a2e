"""Splitting a model's layers into pipeline stages.

Contract: :func:`partition` cuts ``num_layers`` consecutive layers into ``num_stages`` contiguous,
non-empty ranges whose sizes differ by at most one (the first ``num_layers % num_stages`` stages
get one more), or follows explicit ``sizes``; every layer lands in exactly one stage.
:func:`local_stages` lists the model stages a pipeline rank holds (Megatron's placement: stage
``s`` on rank ``s % pp``, so with ``virtual`` chunks rank r holds r, r+pp, ...).
Pure Python, no torch.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["partition", "local_stages"]


def partition(num_layers: int, num_stages: int, sizes: Sequence[int] | None = None) -> list[range]:
    """Contiguous layer ranges, one per model stage (see module docstring)."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if sizes is not None:
        sizes = list(sizes)
        if len(sizes) != num_stages or any(s < 1 for s in sizes) or sum(sizes) != num_layers:
            raise ValueError(
                f"layer counts {sizes} must give {num_stages} stages of at least one layer each, "
                f"summing to the {num_layers} layers (sum is {sum(sizes)}); every layer must be in "
                f"exactly one stage"
            )
    else:
        if num_layers < num_stages:
            raise ValueError(
                f"cannot split {num_layers} layers into {num_stages} pipeline stages: each stage needs "
                f"at least one layer; use at most {num_layers} stages (pp * virtual) or a deeper model"
            )
        base, extra = divmod(num_layers, num_stages)
        sizes = [base + (1 if s < extra else 0) for s in range(num_stages)]
    out, start = [], 0
    for n in sizes:
        out.append(range(start, start + n))
        start += n
    assert start == num_layers  # no layer dropped, none duplicated
    return out


def local_stages(pp_rank: int, pp: int, virtual: int = 1) -> list[int]:
    """Model stages held by pipeline rank ``pp_rank``: ``pp_rank + k*pp`` for k < virtual."""
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank={pp_rank} is not in 0..{pp - 1}")
    return [pp_rank + k * pp for k in range(virtual)]
