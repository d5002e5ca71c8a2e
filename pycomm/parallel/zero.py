"""ZeRO stage 1: optimizer state sharded over the data-parallel group.

Contract
--------
``ZeroRedundancyOptimizer(params, optimizer_class, group=None, **defaults)`` is used like the
optimizer it wraps (``zero_grad``, ``step``, ``state_dict``), on replicas that compute their own
local gradients (do *not* also wrap the model in ``DataParallel``: the reduce-scatter here is
the gradient averaging).  Each parameter group is flattened into one vector, padded to a
multiple of the group size ``N`` and cut into ``N`` equal contiguous shards.  ``step()``:

1. reduce-scatter (average) the flat gradient: rank r receives the averaged gradient of shard r;
2. the inner ``optimizer_class`` (built on the shards only, with ``defaults``) steps shard r;
3. all-gather the updated shards and copy them back into the parameters.

The inner optimizer's state (e.g. Adam's two moments) exists only for this rank's shard, so
optimizer memory is divided by ``N`` (:meth:`optimizer_state_bytes` measures it).  Exact for
element-wise optimizers (SGD, Adam, AdamW...): each element's update depends only on that
element, so sharding changes nothing.  Optimizers that mix elements of a tensor (LAMB's per-
tensor norm, gradient clipping inside the optimizer) would see shards instead of tensors.
"""
from __future__ import annotations

import torch
from torch import nn

import pycomm
from pycomm.distributed import Group

from .mesh import default_group

__all__ = ["ZeroRedundancyOptimizer"]


class _FlatGroup:
    def __init__(self, params: list[nn.Parameter], size: int, rank: int):
        self.params = params
        total = sum(p.numel() for p in params)
        self.shard = -(-total // size)  # ceil: pad so every rank owns the same length
        self.flat_grad = torch.zeros(self.shard * size, dtype=params[0].dtype)
        self.flat_param = torch.zeros(self.shard * size, dtype=params[0].dtype)
        self.local = nn.Parameter(torch.zeros(self.shard, dtype=params[0].dtype))
        self.rank = rank
        self._copy_params_to_flat()
        with torch.no_grad():
            self.local.copy_(self.flat_param[rank * self.shard:(rank + 1) * self.shard])

    def _copy_params_to_flat(self):
        o = 0
        for p in self.params:
            self.flat_param[o:o + p.numel()].copy_(p.detach().reshape(-1))
            o += p.numel()


class ZeroRedundancyOptimizer(torch.optim.Optimizer):
    """ZeRO-1 wrapper around ``optimizer_class`` (see module docstring)."""

    def __init__(self, params, optimizer_class: type, group: Group | None = None, **defaults):
        self.group = default_group("dp") if group is None else group
        super().__init__(params, defaults)
        size, rank = self.group.size, self.group.rank
        self._flat: list[_FlatGroup] = []
        inner_groups = []
        for pg in self.param_groups:
            params = [p for p in pg["params"] if p.requires_grad]
            if not params:
                continue
            dtypes = {p.dtype for p in params}
            if len(dtypes) != 1:
                raise ValueError(f"ZeroRedundancyOptimizer flattens each parameter group into one vector; "
                                 f"this group mixes dtypes {sorted(map(str, dtypes))}: put each dtype "
                                 f"in its own parameter group")
            fg = _FlatGroup(params, size, rank)
            self._flat.append(fg)
            inner_groups.append({**{k: v for k, v in pg.items() if k != "params"}, "params": [fg.local]})
        self.optim = optimizer_class(inner_groups, **defaults)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ZeroRedundancyOptimizer.step does not take a closure; compute the loss "
                             "and call backward() before step()")
        size, rank = self.group.size, self.group.rank
        for fg in self._flat:
            o = 0
            for p in fg.params:
                g = fg.flat_grad[o:o + p.numel()]
                g.copy_(p.grad.reshape(-1)) if p.grad is not None else g.zero_()
                o += p.numel()
            fg.local.grad = torch.empty_like(fg.local)
            if size > 1:
                pycomm.reduce_scatter(fg.local.grad, fg.flat_grad, op="avg", group=self.group)
            else:
                fg.local.grad.copy_(fg.flat_grad)
        # Hyper-parameters changed on this wrapper's groups (schedulers) reach the inner optimizer.
        for outer, inner in zip([pg for pg in self.param_groups if any(p.requires_grad for p in pg["params"])],
                                self.optim.param_groups):
            for k, v in outer.items():
                if k != "params":
                    inner[k] = v
        self.optim.step()
        for fg in self._flat:
            own = fg.flat_param[rank * fg.shard:(rank + 1) * fg.shard]
            own.copy_(fg.local)
            if size > 1:
                pycomm.all_gather(fg.flat_param, own, group=self.group)
            o = 0
            for p in fg.params:
                p.copy_(fg.flat_param[o:o + p.numel()].view_as(p))
                o += p.numel()
        return None

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state held on this rank (the inner optimizer's tensors)."""
        return sum(t.numel() * t.element_size() for st in self.optim.state.values()
                   for t in st.values() if torch.is_tensor(t))

    def state_dict(self):
        """This rank's shard of the optimizer state (ZeRO keeps no full copy anywhere)."""
        return self.optim.state_dict()

    def load_state_dict(self, state_dict):
        self.optim.load_state_dict(state_dict)
