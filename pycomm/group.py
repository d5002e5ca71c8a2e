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

import concurrent.futures
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from pycomm._settings import Settings
from pycomm.errors import CommError
from pycomm.tuning import CostModel
from pycomm.work import Work

if TYPE_CHECKING:
    from pycomm.backends import Backend


def _checked(fn: Callable, keep: tuple) -> Callable:
    """fn, then a check that no tensor of the operation changed its storage meanwhile (set_,
    resize_): the bytes went to the old storage, which `keep` held alive."""
    if not keep:
        return fn
    before = [(t, t.data_ptr()) for t in keep]

    def run():
        out = fn()
        for t, ptr in before:
            if t.data_ptr() != ptr:
                raise ValueError(
                    "pycomm: a tensor of this operation got new storage while the operation ran "
                    "(set_(), resize_() or similar); its result is in the old storage and lost. "
                    "Do not change a tensor's storage before its Work has completed")
        return out

    return run


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
    backends: dict[str, "Backend"] = field(default_factory=dict, repr=False)
    """the backend of each device type ("cpu", "cuda"), chosen when the group was built"""
    hosts: tuple[str, ...] = field(default=(), repr=False)
    """host identity of each member"""
    key: str = field(default="", repr=False)
    """the group's prefix in the rendezvous store (pycomm.shrink agrees under it)"""
    _executor: concurrent.futures.ThreadPoolExecutor | None = field(default=None, repr=False)
    _last: concurrent.futures.Future | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _closed: bool = field(default=False, repr=False)
    _picks: dict = field(default_factory=dict, repr=False)
    _worker: int = field(default=0, repr=False)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def closed(self) -> bool:
        """Destroyed (destroy_process_group): it can run nothing any more."""
        return self._closed

    def backend(self, tensor: torch.Tensor) -> "Backend":
        """The backend that moves `tensor`'s device type."""
        b = self.backends.get("cuda" if tensor.is_cuda else "cpu")
        if b is None:
            if self._closed:
                raise RuntimeError("pycomm: this group was destroyed; call init_process_group again")
            raise ValueError(f"pycomm: group {self.gid} has no backend for {tensor.device} tensors")
        return b

    # ------------------------------------------------------------------ order

    def run(self, fn: Callable, async_op: bool, keep: tuple = ()) -> Work | None:
        """fn() now (async_op=False; returns None) or on the group's worker thread, after
        everything queued before it (returns its Work).  `keep`: the operation's tensors,
        held (storage included) until it is done."""
        with self._lock:
            if self._closed:
                raise RuntimeError("pycomm: this group was destroyed; call init_process_group again")
            if async_op:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        max_workers=1, thread_name_prefix=f"pycomm-g{self.gid}",
                        initializer=self._mark_worker)
                self._last = self._executor.submit(_checked(fn, keep))
                return Work(self._last, keep + tuple(t.untyped_storage() for t in keep))
            pending = self._last
        if pending is not None and not pending.done() and threading.get_ident() != self._worker:
            # Earlier async operations first (their errors belong to their own Work).  On
            # the worker itself (a done-callback) everything earlier has finished already.
            concurrent.futures.wait([pending])
        fn()
        return None

    def _mark_worker(self) -> None:
        self._worker = threading.get_ident()

    def idle(self) -> bool:
        """No asynchronous operation of this group is queued or running."""
        last = self._last
        return last is None or last.done()

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
        with self._lock:
            self._closed = True
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True)
        backends, self.backends = self.backends, {}
        for b in backends.values():
            try:
                b.leave(reason)
                b.close()
            except CommError:
                pass

