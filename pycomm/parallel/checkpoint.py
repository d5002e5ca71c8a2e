"""Checkpoints that do not depend on the parallel shape: save full tensors, load by sharding.

Contract
--------
``full_state_dict(model, pp_group=None)`` is a collective over ``model``'s tensor-parallel groups
(and ``pp_group`` when given): every rank gets the same dict of *full* (unsharded) tensors under
the dense model's names.  Tensor-parallel layers gather their shards (``gather_full``); other
parameters and buffers are taken as they are.  With pipeline parallelism each rank's model holds
only its stages' layers; the dicts of the ``pp_group`` ranks are merged (layers must be named by
their global index, so names do not collide).  Data-parallel replicas are identical: save from
one (``mesh.dp_rank == 0``).

``load_full_state_dict(model, state)`` copies into every parameter and buffer of ``model`` its
shard of ``state[name]``; it is local (no communication) and works for any tensor-parallel degree
and any split into stages, so a model saved at one shape loads at another (tp2 -> tp1,
pp2 -> dp2, ...).  Keys of ``model`` missing from ``state`` raise ``KeyError`` naming them; extra
keys (other stages' layers) are ignored.
"""
from __future__ import annotations

import io

import torch
from torch import nn

import pycomm
from pycomm.distributed import Group

from .layers import TensorParallelModule

__all__ = ["full_state_dict", "load_full_state_dict", "all_gather_object"]


def all_gather_object(obj, group: Group) -> list:
    """Every rank's picklable ``obj``, in group-rank order (through uint8 tensors)."""
    if group.size == 1:
        return [obj]
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    sizes = torch.zeros(group.size, dtype=torch.int64)
    pycomm.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64), group=group)
    n = int(sizes.max())
    padded = torch.zeros(n, dtype=torch.uint8)
    padded[:data.numel()] = data
    out = torch.empty(group.size * n, dtype=torch.uint8)
    pycomm.all_gather(out, padded, group=group)
    return [torch.load(io.BytesIO(out[r * n:r * n + int(sizes[r])].numpy().tobytes()), weights_only=True)
            for r in range(group.size)]


def _local_tensors(model: nn.Module):
    """(full name, module, local name, tensor) for every parameter and persistent buffer."""
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in mod.named_parameters(recurse=False):
            yield prefix + name, mod, name, p
        for name, b in mod.named_buffers(recurse=False):
            if name not in mod._non_persistent_buffers_set:
                yield prefix + name, mod, name, b


def full_state_dict(model: nn.Module, pp_group: Group | None = None) -> dict[str, torch.Tensor]:
    """Full, unsharded tensors of ``model`` (and of the other stages with ``pp_group``)."""
    state = {}
    for key, mod, name, t in _local_tensors(model):
        if isinstance(mod, TensorParallelModule) and isinstance(t, nn.Parameter):
            state[key] = mod.gather_full(name, t)
        else:
            state[key] = t.detach().clone()
    if pp_group is not None and pp_group.size > 1:
        merged = {}
        for part in all_gather_object(state, pp_group):
            merged.update(part)
        state = merged
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load this rank's shards of the full tensors ``state`` into ``model`` (module docstring)."""
    entries = list(_local_tensors(model))
    missing = [key for key, *_ in entries if key not in state]
    if missing:
        raise KeyError(f"load_full_state_dict: the checkpoint lacks {missing[:5]}"
                       f"{' and more' if len(missing) > 5 else ''} ({len(missing)} keys) that this "
                       f"model has; was it saved from the same model configuration?")
    with torch.no_grad():
        for key, mod, name, t in entries:
            full = state[key]
            local = (mod.shard_full(name, full)
                     if isinstance(mod, TensorParallelModule) and isinstance(t, nn.Parameter) else full)
            if local.shape != t.shape:
                raise ValueError(f"load_full_state_dict: {key} has shape {tuple(full.shape)} in the "
                                 f"checkpoint, which gives {tuple(local.shape)} here but the model "
                                 f"expects {tuple(t.shape)}")
            t.copy_(local)
