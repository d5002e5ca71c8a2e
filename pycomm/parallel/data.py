"""Data parallelism: gradients all-reduced in buckets while the backward pass still runs.

Contract
--------
``DataParallel(module, group=None, bucket_cap_mb=25)`` wraps ``module`` (its forward is the
module's).  At construction every replica takes rank 0's parameters and buffers (broadcast), so
replicas start identical.  During ``loss.backward()`` each parameter's gradient is copied into
its bucket as soon as it is accumulated; a bucket whose gradients are all in is averaged over the
group with an asynchronous all-reduce right away, while autograd goes on computing earlier
layers' gradients.  When the backward ends the wrapper waits for the buckets and writes the
averages back to ``param.grad``, so after ``backward()`` returns every replica holds the same,
averaged gradients.

Buckets are filled in *backward order*: parameters are taken in reverse registration order (the
order a sequential model produces gradients), ``bucket_cap_mb`` megabytes per bucket, as PyTorch
DDP does.  ``no_sync()`` skips the reduction (gradient accumulation over micro-batches; also what
the pipeline runtime needs, since a stage runs many backwards per step); ``sync_gradients()``
then reduces everything explicitly.  ``bucket_log`` records, per reduction, the order in which
buckets were launched and how many gradients were still missing at each launch (the overlap).

Parameters that receive no gradient in a backward are reduced as zeros (every replica must take
part in every bucket's all-reduce).

After a failure, ``pycomm.shrink()`` and then ``shrink(group, optimizer)`` go on with the surviving
replicas (docs/parallel.md, "Losing a rank"): every replica holds the whole model and optimizer
state, which is why data parallelism, and only it, can continue without the lost rank.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

import pycomm
from pycomm.distributed import Group

from .mesh import default_group

__all__ = ["DataParallel"]


class _Bucket:
    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.offsets = []
        n = 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.buffer = torch.zeros(n, dtype=params[0].dtype)
        self.ready = 0
        self.work: pycomm.Work | None = None


class DataParallel(nn.Module):
    """Replicates ``module`` over ``group`` (default: the mesh's dp group, else the world)."""

    def __init__(self, module: nn.Module, group: Group | None = None, bucket_cap_mb: float = 25):
        super().__init__()
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        self.module = module
        self.group = default_group("dp") if group is None else group
        self.bucket_cap_mb = bucket_cap_mb
        self._sync = True
        self._callback_queued = False
        self.bucket_log: list[list[tuple[int, int]]] = []

        self._broadcast(list(module.parameters()) + list(module.buffers()))

        params = [p for p in module.parameters() if p.requires_grad]
        cap = bucket_cap_mb * 2**20
        self.buckets: list[_Bucket] = []
        current: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed(params):
            # One dtype per bucket: the flat buffer is reduced as one tensor.
            if current and (size + p.numel() * p.element_size() > cap or p.dtype != current[0].dtype):
                self.buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += p.numel() * p.element_size()
        if current:
            self.buckets.append(_Bucket(current))
        self._where: dict[torch.Tensor, tuple[_Bucket, int]] = {}
        for b in self.buckets:
            for i, p in enumerate(b.params):
                self._where[p] = (b, i)
                p.register_post_accumulate_grad_hook(self._grad_ready)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _broadcast(self, tensors) -> None:
        """Every replica takes group rank 0's values of `tensors` (in the same order everywhere)."""
        if self.group.size == 1:
            return
        with torch.no_grad():
            for t in tensors:
                buf = t.data.contiguous()  # pycomm needs contiguous memory; copy back if it made one
                pycomm.broadcast(buf, 0, group=self.group)
                if buf.data_ptr() != t.data.data_ptr():
                    t.data.copy_(buf)

    def shrink(self, group: Group | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Goes on over `group` (default: the mesh's dp group, else the world, as at
        construction) once ``pycomm.shrink()`` has replaced the group that a failure broke.

        Redone here: the buckets are reset (the failed step's all-reduces are abandoned), and
        the replicas take the new rank 0's parameters and buffers, and with `optimizer` its
        optimizer state, because a failure can reach the ranks at different points of a step
        (one finished its last all-reduce and stepped, another did not).  The optimizer must
        have the same state layout on every replica (true for data parallelism).

        Left to the caller: redo the step that failed (its gradients are lost), split the
        global batch over the new number of replicas, and rebuild whatever else used the old
        groups (``parallel.init_mesh``, a pipeline runtime).
        """
        self.group = default_group("dp") if group is None else group
        self._callback_queued = False
        for b in self.buckets:
            b.work, b.ready = None, 0
        self._broadcast(list(self.module.parameters()) + list(self.module.buffers()))
        if optimizer is not None:
            state = []
            for pg in optimizer.param_groups:
                for p in pg["params"]:
                    s = optimizer.state.get(p, {})
                    state += [s[k] for k in sorted(s) if isinstance(s[k], torch.Tensor)]
            self._broadcast(state)

    @contextlib.contextmanager
    def no_sync(self):
        """Backwards inside accumulate gradients locally, without communication."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    # ------------------------------------------------------------------ during backward

    def _grad_ready(self, p: torch.Tensor) -> None:
        if not self._sync or self.group.size == 1:
            return
        if not self._callback_queued:
            self._callback_queued = True
            self.bucket_log.append([])
            # Runs once autograd has finished this backward: wait for the buckets there.
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        bucket, i = self._where[p]
        n = p.numel()
        assert p.grad is not None  # the hook runs once the gradient exists
        bucket.buffer[bucket.offsets[i]:bucket.offsets[i] + n].copy_(p.grad.reshape(-1))
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        missing = sum(len(b.params) - b.ready for b in self.buckets)
        self.bucket_log[-1].append((self.buckets.index(bucket), missing))
        bucket.work = pycomm.all_reduce(bucket.buffer, op="avg", group=self.group, async_op=True)

    def _finish(self) -> None:
        self._callback_queued = False
        # Buckets whose parameters got no gradient this time still take part (as zeros).
        for b in self.buckets:
            if b.work is None:
                for i, p in enumerate(b.params):
                    if p.grad is None:
                        b.buffer[b.offsets[i]:b.offsets[i] + p.numel()].zero_()
                    elif b.ready < len(b.params):
                        b.buffer[b.offsets[i]:b.offsets[i] + p.numel()].copy_(p.grad.reshape(-1))
                self._launch(b)
        for b in self.buckets:
            assert b.work is not None  # launched above
            b.work.wait()
            for i, p in enumerate(b.params):
                avg = b.buffer[b.offsets[i]:b.offsets[i] + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = avg.clone()
                else:
                    p.grad.copy_(avg)
            b.work, b.ready = None, 0

    # ------------------------------------------------------------------ explicit

    def sync_gradients(self) -> None:
        """Average every parameter's current gradient over the group now (after ``no_sync``)."""
        if self.group.size == 1:
            return
        self.bucket_log.append([])
        for b in self.buckets:
            for i, p in enumerate(b.params):
                view = b.buffer[b.offsets[i]:b.offsets[i] + p.numel()]
                view.copy_(p.grad.reshape(-1)) if p.grad is not None else view.zero_()
            b.ready = len(b.params)
            self._launch(b)
        self._finish()
