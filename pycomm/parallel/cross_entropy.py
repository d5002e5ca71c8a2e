"""Cross-entropy over a vocabulary split across tensor-parallel ranks, without the full logits.

Contract: ``vocab_parallel_cross_entropy(logits, target, group=None)`` takes ``logits`` of shape
``[..., V/tp]`` (this rank's contiguous slice of the vocabulary: ids ``rank*V/tp .. (rank+1)*V/tp
- 1``, as ``ColumnParallelLinear`` produces it) and integer ``target`` of shape ``[...]`` with
global ids; it returns the per-token losses ``[...]`` (float32 if the logits are half), replicated
on every rank.  Differentiable with respect to ``logits``.

Three all-reduces, each on one value per token (Megatron's ``cross_entropy.py``):

1. max of the logits (numerical stability of the exponentials);
2. the target's logit (only the rank whose slice holds the id contributes, others add 0);
3. the sum of exponentials.

``loss = log(sum exp(z - max)) - (z_target - max)``.  The backward is local:
``softmax(z) - onehot(target)`` on this rank's slice, times the incoming gradient.
"""
from __future__ import annotations

import torch

import pycomm
from pycomm.distributed import Group

from .mappings import resolve_tp_group

__all__ = ["vocab_parallel_cross_entropy"]


def _all_reduce(x: torch.Tensor, op: str, group: Group) -> torch.Tensor:
    if group.size > 1:
        pycomm.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        z = logits.float()
        per = z.shape[-1]
        start = group.rank * per
        zmax = _all_reduce(z.max(dim=-1).values.contiguous(), "max", group)
        shifted = z - zmax.unsqueeze(-1)

        outside = (target < start) | (target >= start + per)
        local_t = (target - start).masked_fill(outside, 0)
        picked = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        picked = _all_reduce(picked.contiguous(), "sum", group)

        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1).contiguous(), "sum", group)
        loss = sum_exp.log() - picked

        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, outside)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, outside = ctx.saved_tensors
        grad = softmax.clone()
        # Subtract the one-hot only on the rank that owns the target id.
        grad.scatter_add_(-1, local_t.unsqueeze(-1), (~outside).to(grad.dtype).neg().unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 group: Group | None = None) -> torch.Tensor:
    """Per-token cross-entropy from this rank's vocabulary slice of the logits (see module doc)."""
    group = resolve_tp_group(group)
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"vocab_parallel_cross_entropy: target shape {tuple(target.shape)} must equal the "
            f"logits shape without the vocabulary dimension, {tuple(logits.shape[:-1])}"
        )
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"vocab_parallel_cross_entropy: target must hold integer ids, got {target.dtype}")
    return _VocabParallelCrossEntropy.apply(logits, target.long(), group)
