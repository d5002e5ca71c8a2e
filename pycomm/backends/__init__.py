"""Backends: how one group moves the tensors of one device type.

A group holds one backend per device type, chosen when the group is built
(pycomm.distributed):

============== ============== =========================================================
backend        module         used for
============== ============== =========================================================
ShmBackend     shm.py         CPU tensors, all members on one host: pycomm's own plans
                              (csrc/) over shared memory
HierarchyBack. hierarchy.py   CPU tensors, members on several hosts: shared memory
                              inside a host, gloo between hosts
CudaBackend    cuda.py        CUDA tensors: CUDA IPC on one host, NCCL point-to-point
                              carrying pycomm's plans otherwise
============== ============== =========================================================

This module is the interface and the policy that every backend shares, written once:

- arguments arrive checked (pycomm.collectives); tensors are contiguous;
- float16 and bfloat16 are reduced in float32: upcast once, reduce, round once;
- avg is a sum divided by the group size, once, after the reduction;
- a rooted reduction leaves the other ranks' tensors untouched;
- algorithm="auto" is the cost model's pick (or $PYCOMM_ALGO's), logged with PYCOMM_DEBUG;
- blocking or asynchronous, in call order: ``submit`` (the group's worker thread; CUDA
  backends override it with stream ordering).

A backend implements the primitives (``_all_reduce`` ... ``_p2p``) on buffers whose dtype
it can reduce.  Transports that run the collective table (shared memory, NCCL) implement
``_table`` and inherit the rest.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from pycomm._codes import HALF, NONE, Op
from pycomm.work import Work

if TYPE_CHECKING:
    from pycomm.group import Group

P2PItem = tuple  # (is_send: bool, peer: int, tensor: torch.Tensor, tag: int); peer -1: any source


def _acc(t: torch.Tensor) -> torch.Tensor:
    """The buffer a reduction runs in: a float32 copy of a half tensor, else the tensor."""
    return t.float() if t.dtype in HALF else t


def _finish(buf: torch.Tensor, t: torch.Tensor, op: Op, size: int) -> None:
    """After a reduction into buf: divide an average, round a half type back into t."""
    if op.avg:
        # A divisor on the device: for a Python-number divisor torch's CUDA kernel multiplies
        # by its reciprocal, which can lose a bit when the size is not a power of two (the
        # likely cause of the 3-rank IPC avg mismatch on an H200, 2026-11-26).
        buf.div_(torch.full((), size, dtype=buf.dtype, device=buf.device) if buf.is_cuda else size)
    if buf is not t:
        t.copy_(buf)


class Backend:
    """The interface (see the module docstring).  Public methods take checked arguments and
    return None (blocking) or a Work (async_op=True)."""

    name = "?"
    """how it moves data, for messages and PYCOMM_DEBUG ("shm", "gloo", "CUDA IPC", ...)"""
    inline = False
    """whether a blocking call may skip ``submit`` when the group is idle (CPU transports)"""

    def __init__(self, group: Group):
        self.group = group
        self.rank, self.size, self.timeout = group.rank, group.size, group.timeout

    # ------------------------------------------------------------------ policy

    def submit(self, name: str, fn: Callable[..., list], tensors: tuple, async_op: bool,
               algo: str = "auto") -> Work | None:
        """Runs fn(*tensors) in the group's call order (pycomm.group.Group.run: asynchronous
        jobs get aliases of the tensors, None stays None).  `algo`: the call's algorithm as
        pick() returned it (transports that pick per call read it)."""
        return self.group.run(fn, async_op, tensors)

    def pick(self, collective: str, algorithm: str, nbytes: int) -> str:
        algo = self.group.pick(collective, algorithm, nbytes)
        if self.group.settings.debug:
            self.log(collective, nbytes, self.describe(collective, algo))
        return algo

    def describe(self, collective: str, algo: str) -> str:
        """How this backend runs `collective` with `algo`, for PYCOMM_DEBUG."""
        return f"{algo} over {self.name}"

    def log(self, collective: str, nbytes: int, how: str) -> None:
        g = self.group
        print(f"pycomm: {collective} of {nbytes} B on group {g.gid} (rank {g.rank}/{g.size}): {how}",
              flush=True)

    def all_reduce(self, t: torch.Tensor, op: Op, algorithm: str, async_op: bool):
        algo = self.pick("all_reduce", algorithm, t.numel() * t.element_size())
        if self.inline and not op.avg and t.dtype not in HALF:
            # The latency-bound common case: nothing to adjust, so no Python around the call.
            if not async_op and self.group.idle():
                self._all_reduce(t, op, algo)
                return None
            if async_op:
                work = self._queue_all_reduce(t, op, algo)
                if work is not None:
                    return work

        def run(t):
            buf = _acc(t)
            self._all_reduce(buf, op, algo)
            _finish(buf, t, op, self.size)
            return [t]

        return self.submit("all_reduce", run, (t,), async_op, algo)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op: Op, algorithm: str,
                       async_op: bool):
        """out may be inp's own chunk (inp[rank*n:(rank+1)*n])."""
        algo = self.pick("reduce_scatter", algorithm, inp.numel() * inp.element_size())
        n = out.numel()
        in_place = n > 0 and out.data_ptr() == inp.data_ptr() + self.rank * n * inp.element_size()

        def run(out, inp):
            src = _acc(inp)
            if src is inp:
                dst = out
            else:
                dst = src[self.rank * n:(self.rank + 1) * n] if in_place else torch.empty_like(out, dtype=src.dtype)
            self._reduce_scatter(dst, src, op, algo)
            _finish(dst, out, op, self.size)
            return [out]

        return self.submit("reduce_scatter", run, (out, inp), async_op, algo)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, algorithm: str, async_op: bool):
        """inp may be out's own chunk."""
        algo = self.pick("all_gather", algorithm, out.numel() * out.element_size())

        def run(out, inp):
            self._all_gather(out, inp, algo)
            return [out]

        return self.submit("all_gather", run, (out, inp), async_op, algo)

    def broadcast(self, t: torch.Tensor, root: int, algorithm: str, async_op: bool):
        algo = self.pick("broadcast", algorithm, t.numel() * t.element_size())

        def run(t):
            self._broadcast(t, root, algo)
            return [t]

        return self.submit("broadcast", run, (t,), async_op, algo)

    def reduce(self, t: torch.Tensor, root: int, op: Op, algorithm: str, async_op: bool):
        algo = self.pick("reduce", algorithm, t.numel() * t.element_size())

        def run(t):
            src = _acc(t)
            self._reduce(src, src, root, op, algo)  # in place on the root, untouched elsewhere
            if self.rank == root:
                _finish(src, t, op, self.size)
            return [t]

        return self.submit("reduce", run, (t,), async_op, algo)

    def gather(self, out: torch.Tensor | None, inp: torch.Tensor, root: int, algorithm: str,
               async_op: bool):
        """out: on root, size * inp.numel() elements; elsewhere ignored (may be None)."""
        nbytes = inp.numel() * inp.element_size() * self.size
        algo = self.pick("gather", algorithm, nbytes)

        def run(out, inp):
            self._gather(out if self.rank == root else None, inp, root, algo)
            return [out] if self.rank == root else []

        return self.submit("gather", run, (out, inp), async_op, algo)

    def scatter(self, out: torch.Tensor, inp: torch.Tensor | None, root: int, algorithm: str,
                async_op: bool):
        """inp: on root, size * out.numel() elements; elsewhere ignored (may be None)."""
        nbytes = out.numel() * out.element_size() * self.size
        algo = self.pick("scatter", algorithm, nbytes)

        def run(out, inp):
            self._scatter(out, inp if self.rank == root else None, root, algo)
            return [out]

        return self.submit("scatter", run, (out, inp), async_op, algo)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_counts: Sequence[int],
                   in_counts: Sequence[int], async_op: bool):
        """Counts are elements to (in_counts[j]) and from (out_counts[j]) each rank j."""
        if self.group.settings.debug:
            self.log("all_to_all", inp.numel() * inp.element_size(), self.describe("all_to_all", "pairwise"))

        def run(out, inp):
            self._all_to_all(out, inp, list(out_counts), list(in_counts))
            return [out]

        return self.submit("all_to_all", run, (out, inp), async_op)

    def barrier(self) -> None:
        def run():
            self._barrier()
            return []

        self.submit("barrier", run, (), False)

    def p2p(self, items: list[P2PItem], async_op: bool):
        """Sends and receives posted together (no order among them is needed to avoid a
        deadlock); returns one Work for all (async_op) or waits for it."""
        work = self._p2p(items)
        if async_op:
            return work
        work.wait()
        return None

    def empty(self, size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """pycomm.empty: a tensor whose all-reduces this backend can run faster than any
        other's (a registered buffer where the transport has them); a plain one here."""
        return torch.empty(size, dtype=dtype)

    def close(self) -> None:
        """Releases the transport's resources (destroy_process_group)."""

    def leave(self, reason: str) -> None:
        """Tells the peers that this rank leaves the group alive (`reason`:
        "destroy_process_group", "process exit", "abort"), so that the ones that still need
        it fail at once instead of waiting out the timeout.  Transports that cannot say so
        leave it to the connection closing."""

    def gone(self) -> dict[int, str]:
        """Group ranks that cannot take part any more (exited, left, stopped), with why, as
        far as this rank can see (pycomm.shrink excludes them without waiting)."""
        return {}

    # ------------------------------------------------------------------ primitives

    def _table(self, collective: str, algo: str, out: torch.Tensor, inp: torch.Tensor, count: int,
               op: Op = NONE, root: int = -1, send_counts: Sequence[int] = (),
               recv_counts: Sequence[int] = ()) -> None:
        """One row of the collective table on this transport (see csrc/algorithms/collectives.h
        for what `count` counts per row)."""
        raise NotImplementedError(f"{type(self).__name__} does not run the collective table")

    def _all_reduce(self, buf, op, algo):
        self._table("all_reduce", algo, buf, buf, buf.numel(), op)

    def _reduce_scatter(self, out, inp, op, algo):
        self._table("reduce_scatter", algo, out, inp, out.numel(), op)

    def _all_gather(self, out, inp, algo):
        self._table("all_gather", algo, out, inp, inp.numel())

    def _broadcast(self, buf, root, algo):
        self._table("broadcast", algo, buf, buf, buf.numel(), root=root)

    def _reduce(self, out, inp, root, op, algo):
        self._table("reduce", algo, out, inp, inp.numel(), op, root)

    def _gather(self, out, inp, root, algo):
        self._table("gather", algo, inp if out is None else out, inp, inp.numel(), root=root)

    def _scatter(self, out, inp, root, algo):
        self._table("scatter", algo, out, out if inp is None else inp, out.numel(), root=root)

    def _all_to_all(self, out, inp, out_counts, in_counts):
        # count 0: ranks' own counts differ; the row identifies the call by the counts per message
        self._table("all_to_all", "pairwise", out, inp, 0, send_counts=in_counts, recv_counts=out_counts)

    def _queue_all_reduce(self, t: torch.Tensor, op: Op, algo: str) -> Work | None:
        """An asynchronous all_reduce queued as a native job (no Python on the worker), or
        None where the transport has none."""
        return None

    def _barrier(self) -> None:
        raise NotImplementedError

    def _p2p(self, items: list[P2PItem]) -> Work:
        raise NotImplementedError
