"""Group: a set of ranks, the backends that move its tensors, and the order of its work.

A group is built once (pycomm.distributed) and holds, chosen then, one backend per device
type: "cpu" is shared memory on one host or the hierarchy across hosts, "cuda" is CUDA IPC
or NCCL point-to-point (pycomm.backends).  ``group.backend(tensor)`` is the only choice
pycomm.collectives makes.

Order: operations of one group run in the order they were called.  A blocking call runs
on the caller's thread once the group's earlier asynchronous operations have finished; an
asynchronous one (``async_op=True``) runs on the group's worker thread (``Group.run``).
CUDA operations are ordered by the group's stream instead (backends/cuda.py).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pycomm import _C
from pycomm._settings import Settings
from pycomm.errors import CommError
from pycomm.tuning import CostModel
from pycomm.work import QueuedWork, Work, storage_changed

if TYPE_CHECKING:
    from pycomm.backends import Backend


def _pin(tensors: tuple) -> None:
    """Their storages cannot be resized until _unpin (csrc/torch/storage.cpp says why)."""
    for t in tensors:
        _C.pin_storage(t)


def _unpin(tensors: tuple) -> None:
    for t in tensors:
        _C.unpin_storage(t)


class _Watch:
    """What an asynchronous job needs to run safely while the caller goes on: aliases of
    the caller's tensors (their own shape, so a resize_() the pin refused, which leaves the
    caller's tensor claiming more than its storage, cannot mislead the job), the storages
    pinned and held, and a check afterwards that the caller's tensors still use them
    (set_() swaps a tensor's storage: the result landed in the old one)."""

    def __init__(self, tensors: tuple):
        self.originals = tuple(t for t in tensors if t is not None)
        self.aliases = tuple(None if t is None else t.detach() for t in tensors)
        self.ptrs = [(t, t.data_ptr(), t.numel()) for t in self.originals]
        _pin(self.originals)

    def check(self) -> None:
        for t, ptr, n in self.ptrs:
            if t.data_ptr() != ptr or t.numel() != n:
                raise storage_changed()

    def release(self) -> None:
        _unpin(self.originals)


@dataclass(eq=False)
class Group:
    """A group of ranks.  Members run collectives on it; other ranks hold a placeholder
    (``rank == -1``) so that every rank can call ``new_group`` with the same arguments."""

    ranks: tuple[int, ...]
    """global ranks of the members, in group-rank order"""
    rank: int
    """this process's rank in the group, -1 if it is not a member"""
    gid: int
    timeout: float
    """seconds any one operation may wait for a peer"""
    model: CostModel
    settings: Settings = field(default_factory=Settings, repr=False)
    backends: dict[str, Backend] = field(default_factory=dict, repr=False)
    """the backend of each device type ("cpu", "cuda"), chosen when the group was built"""
    hosts: tuple[str, ...] = field(default=(), repr=False)
    """host identity of each member"""
    host_procs: int = field(default=1, repr=False)
    """processes of the whole job on this process's host: what its cores are shared by"""
    key: str = field(default="", repr=False)
    """the group's prefix in the rendezvous store (pycomm.shrink agrees under it)"""
    native: _C.NativeAllReduce | None = field(default=None, repr=False)
    """the all-reduce both entry points run without Python (csrc/torch/native.h), where the
    CPU transport is shared memory and PYCOMM_DEBUG is off"""
    _closed: bool = field(default=False, repr=False)
    _picks: dict = field(default_factory=dict, repr=False)
    _worker_ident: int = field(default=0, repr=False)
    _worker: _C.Worker | None = field(default=None, repr=False)

    @property
    def worker(self) -> _C.Worker:
        """The group's in-order worker thread (csrc/worker.h), started on first use."""
        if self._worker is None:
            self._worker = _C.Worker(f"pycomm-g{self.gid}")
        return self._worker

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def closed(self) -> bool:
        """Destroyed (destroy_process_group): it can run nothing any more."""
        return self._closed

    def backend(self, tensor: torch.Tensor) -> Backend:
        """The backend that moves `tensor`'s device type."""
        b = self.backends.get("cuda" if tensor.is_cuda else "cpu")
        if b is None:
            if self._closed:
                raise RuntimeError("pycomm: this group was destroyed; call init_process_group again")
            raise ValueError(f"pycomm: group {self.gid} has no backend for {tensor.device} tensors")
        return b

    # ------------------------------------------------------------------ order

    def run(self, fn: Callable[..., object], async_op: bool, tensors: tuple = ()) -> Work | None:
        """fn(*tensors) now (async_op=False; returns None), or on the group's worker thread
        after everything queued before it (returns its Work; _Watch keeps the tensors safe
        meanwhile)."""
        if self._closed:
            raise RuntimeError("pycomm: this group was destroyed; call init_process_group again")
        if async_op:
            watch = _Watch(tensors)
            work = QueuedWork(watch.originals + tuple(t.untyped_storage() for t in watch.originals))

            def job():
                self._worker_ident = threading.get_ident()
                try:
                    # Always run (the peers do): a changed storage is reported afterwards.
                    work._outputs = fn(*watch.aliases)
                    watch.check()
                except BaseException as e:  # noqa: BLE001 - delivered by Work.wait()
                    work._error = e
                finally:
                    watch.release()

            try:
                work._completion = self.worker.submit(job)
            except BaseException:
                watch.release()
                raise
            return work
        if not self.worker.idle() and threading.get_ident() != self._worker_ident:
            # Earlier async operations first (their errors belong to their own Work).  On
            # the worker itself (a done-callback) everything earlier has finished already.
            self.worker.drain()
        fn(*tensors)
        return None

    def queue_native(self, comm, coll: int, algo: int, out: torch.Tensor, inp: torch.Tensor,
                     count: int, dtype: int, op: int, root: int) -> Work:
        """A collective of the table on the worker, run without the GIL (backends/shm.py);
        pointers and counts are taken now, the storages pinned until it has run."""
        if self._closed:
            raise RuntimeError("pycomm: this group was destroyed; call init_process_group again")
        watch = _Watch((out,) if out is inp else (out, inp))
        work = QueuedWork(watch.originals + tuple(t.untyped_storage() for t in watch.originals), [out])
        try:
            work._completion = self.worker.submit_collective(
                comm, coll, algo, out.data_ptr(), inp.data_ptr(), count, dtype, op, root, self.timeout)
        except BaseException:
            watch.release()
            raise
        work._completion.on_done(watch.release)
        return work

    def idle(self) -> bool:
        """No asynchronous operation of this group is queued or running."""
        return self.worker.idle()

    # ------------------------------------------------------------------ algorithms

    def pick(self, collective: str, algorithm: str, nbytes: int, size: int | None = None) -> str:
        """The algorithm to run: `algorithm` itself, or for "auto" $PYCOMM_ALGO's choice if
        it makes one, else the cost model's for `nbytes` on `size` ranks (the group's)."""
        if algorithm != "auto":
            return algorithm
        key = (collective, nbytes, size)
        algo = self._picks.get(key)
        if algo is None:
            algo = self.model.pick(collective, nbytes, size or self.size, self.settings.algo)
            if len(self._picks) < 4096:
                self._picks[key] = algo
        return algo

    # ------------------------------------------------------------------ shut-down

    def leave(self, reason: str) -> None:
        """Tells the peers this rank is leaving, now (see Backend.leave); close() still
        releases the resources."""
        for b in list(self.backends.values()):
            b.leave(reason)

    def gone(self) -> dict[int, str]:
        """Group ranks that cannot take part any more, with why (Backend.gone)."""
        cpu = self.backends.get("cpu")
        return cpu.gone() if cpu is not None else {}

    def close(self, reason: str = "destroy_process_group") -> None:
        """Waits for queued async operations, tells the peers this rank leaves (`reason`),
        then releases every backend.  Leaving comes after the queued work: a peer that is
        still in that work must not fail because this rank is shutting down."""
        self._closed = True
        if self.native is not None:
            self.native.enabled = False
            self.native = None
        if self._worker is not None:
            self._worker.close()  # runs what is queued first
        backends, self.backends = self.backends, {}
        for b in backends.values():
            try:
                b.leave(reason)
                b.close()
            except CommError:
                pass
