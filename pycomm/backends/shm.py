"""ShmBackend: CPU tensors of a group on one host, over shared memory.

Every collective is a row of the C++ collective table, run by the group's communicator
(pycomm._C.Communicator over a ShmTransport: csrc/communicator.cpp, csrc/transport/shm.cpp).
Point-to-point messages are posted to the communicator, which matches them by (source,
tag), and progress whenever this rank calls into the group, like MPI's nonblocking
operations (see MessageWork).  The backend keeps a posted message's buffers alive until the
communicator has finished with them, whatever happens to its Work.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from pycomm import _C, tuning
from pycomm._codes import ALGORITHMS, COLLECTIVES, DTYPES, HALF, NONE, Op
from pycomm.backends import Backend, P2PItem, _finish, shared
from pycomm.errors import CommError
from pycomm.work import Driven

_ALL_REDUCE = COLLECTIVES["all_reduce"]


class _Message:
    """One posted message, owned by the backend (not by its Work) until the communicator
    says it is complete: the C++ side writes into (or reads from) its buffers until then."""

    __slots__ = ("keep", "done", "peer", "error")

    def __init__(self, keep: tuple):
        self.keep: tuple | None = keep  # the tensor and its storage; None once done
        self.done = False
        self.peer = -1          # once done: the sender of a receive, the destination of a send
        self.error: BaseException | None = None


class MessageWork(Driven):
    """Posted messages: they move while someone waits on them (or calls into the group).
    Dropping this handle early is safe: the backend's registry of messages in flight keeps
    their buffers alive until the communicator has finished with them."""

    def __init__(self, backend: ShmBackend, messages: list[_Message], tensors: list[torch.Tensor],
                 any_source: list[bool]):
        super().__init__()
        self._backend, self._messages, self._tensors = backend, messages, tensors
        self._any_source = any_source

    def poll(self, slice_s: float) -> bool:
        if not all(m.done for m in self._messages):
            self._backend.progress(slice_s)
        for m in self._messages:
            if m.error is not None:
                raise m.error
        if not all(m.done for m in self._messages):
            return False
        # Set before the Work completes: done-callbacks (the torch.distributed adapter's)
        # read it.
        for m, anysrc in zip(self._messages, self._any_source):
            if anysrc:
                self.source_rank = m.peer
                break
        return True

    def _outputs(self) -> list[torch.Tensor]:
        return list(self._tensors)


class ShmBackend(Backend):
    name = "shm"
    inline = True

    def __init__(self, group, transport: _C.ShmTransport):
        super().__init__(group)
        self.transport = transport
        self.comm = _C.Communicator(transport)
        # Messages in flight by id: their buffers stay alive until the communicator reports
        # them complete (checked after every progress and collective call, and at close),
        # however long their Work lives.
        self._inflight: dict[int, _Message] = {}
        self._lock = threading.Lock()  # posting + registering, and reaping, are atomic
        self._shared: dict[int, shared.SharedBuffer] = {}
        """registered buffers (pycomm.empty) by this rank's base address"""
        self._pool: _C.ReducePool | None = None
        self._serial = 0
        self.registered_all_reduces = 0
        """all-reduces run out of registered buffers (tests check which path ran)"""
        m = group.model
        self.native = None if group.settings.debug else _C.NativeAllReduce(
            group.worker, self.comm, m.alpha, m.beta, m.gamma, group.settings.algo, group.timeout)
        """plain blocking all-reduces without Python; off while messages are in flight, whose
        progress is Python's (around every collective)"""
        if group.settings.debug:
            print(f"pycomm: group {group.gid} (rank {group.rank}/{group.size}): shm transport, "
                  f"{self.single_copy()}, reduction on {transport.reduce_threads} thread(s) "
                  f"(PYCOMM_SHM_REDUCE_THREADS={group.settings.shm_reduce_threads or 'auto'}; "
                  f"{group.host_procs} process(es) on this host)", flush=True)

    # ------------------------------------------------------------------ registered buffers

    def empty(self, size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        made: list[torch.Tensor] = []

        def run() -> list:
            made.append(shared.create(self, size, dtype))
            return made

        self.submit("empty", run, (), False)  # after the group's queued work, like a collective
        return made[0]

    def next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def register(self, buf: shared.SharedBuffer) -> None:
        self._shared[buf.bases[self.rank]] = buf
        if self.native is not None:
            self.native.add_shared(buf.bases[self.rank], buf.nbytes)

    def unregister(self, base: int) -> None:
        if self._shared.pop(base, None) is not None and self.native is not None:
            self.native.remove_shared(base)

    def _shared_of(self, t: torch.Tensor, algorithm: str) -> shared.SharedBuffer | None:
        """The registered buffer `t` lies in, where its all-reduce takes the shared path."""
        nbytes = t.numel() * t.element_size()
        if (not self._shared or algorithm != "auto" or nbytes < shared.SHARED_FROM or self.size < 2
                or t.dtype in HALF or not t.is_contiguous()):
            return None
        p = t.data_ptr()
        for base, buf in self._shared.items():
            if base <= p and p + nbytes <= base + buf.nbytes:
                return buf
        return None

    def all_reduce(self, t: torch.Tensor, op: Op, algorithm: str, async_op: bool):
        buf = self._shared_of(t, algorithm)
        if buf is None:
            return super().all_reduce(t, op, algorithm, async_op)
        if self.group.settings.debug:
            self.log("all_reduce", t.numel() * t.element_size(),
                     "registered buffer (pycomm.empty): reduced out of the peers' buffers")
        if self._pool is None:
            self._pool = _C.ReducePool(self.transport.reduce_threads)

        def run(t):
            shared.all_reduce(self, buf, t, op, self._pool)
            _finish(t, t, op, self.size)
            self.registered_all_reduces += 1
            return [t]

        return self.submit("all_reduce", run, (t,), async_op, "shared")

    def single_copy(self) -> str:
        """The single-copy path as the start-up probe left it, for PYCOMM_DEBUG."""
        t = self.transport
        if t.single_copy_from == tuning.NEVER:
            return "single copy off (PYCOMM_SHM_SINGLE_COPY=never or the cost model)"
        if not t.can_read_peers:
            return f"single copy unavailable, receiving through the slots: {t.single_copy_why}"
        return f"single copy (process_vm_readv) for sends of at least {t.single_copy_from} B"

    @property
    def timeout(self) -> float:
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._timeout = seconds
        native = getattr(self, "native", None)  # None while Backend.__init__ sets it first
        if native is not None:
            native.timeout = seconds

    def _table(self, collective: str, algo: str, out: torch.Tensor, inp: torch.Tensor, count: int,
               op: Op = NONE, root: int = -1, send_counts: Sequence[int] = (),
               recv_counts: Sequence[int] = ()) -> None:
        try:
            self.comm.collective(COLLECTIVES[collective], ALGORITHMS[algo], out.data_ptr(), inp.data_ptr(),
                                 count, DTYPES[inp.dtype], op.code, root, self.timeout,
                                 list(send_counts), list(recv_counts))
        finally:
            if self._inflight:
                self._reap()

    def _all_reduce(self, buf, op, algo):  # the latency-bound path, spelled out
        ptr = buf.data_ptr()
        try:
            self.comm.collective(_ALL_REDUCE, ALGORITHMS[algo], ptr, ptr, buf.numel(), DTYPES[buf.dtype],
                                 op.code, -1, self.timeout)
        finally:
            if self._inflight:
                self._reap()

    def _queue_all_reduce(self, t, op, algo):
        return self.group.queue_native(self.comm, _ALL_REDUCE, ALGORITHMS[algo], t, t, t.numel(),
                                       DTYPES[t.dtype], op.code, -1)

    def _barrier(self) -> None:
        try:
            self.comm.barrier(self.timeout)
        finally:
            if self._inflight:
                self._reap()

    def _p2p(self, items: list[P2PItem]) -> MessageWork:
        comm = self._comm()
        messages = []
        with self._lock:
            for is_send, peer, t, tag in items:
                i = comm.post(is_send, peer, t.data_ptr(), t.numel() * t.element_size(), self.timeout, tag)
                messages.append(_Message((t, t.untyped_storage())))
                self._inflight[i] = messages[-1]
            if self.native is not None:
                self.native.enabled = False
        return MessageWork(self, messages, [t for _, _, t, _ in items],
                           [not is_send and peer < 0 for is_send, peer, _, _ in items])

    def progress(self, slice_s: float) -> None:
        """Moves posted messages for at most slice_s seconds (less once one completes)."""
        comm = self._comm()
        try:
            comm.progress(slice_s)
        finally:
            self._reap(comm)

    def _comm(self) -> _C.Communicator:
        comm = self.comm
        if comm is None:
            raise CommError("pycomm: this group was destroyed; its messages cannot move any more")
        return comm

    def _reap(self, comm: _C.Communicator | None = None) -> None:
        """Releases the buffers of the messages the communicator has completed."""
        comm = comm or self.comm
        if comm is None:
            return
        with self._lock:
            for i, peer in comm.completed():
                m = self._inflight.pop(i, None)
                if m is not None:
                    m.peer, m.keep = peer, None
                    m.done = True
            if self.native is not None and not self._inflight and self.comm is not None:
                self.native.enabled = True

    def leave(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.leave(reason)

    def gone(self) -> dict[int, str]:
        return dict(self.transport.gone()) if self.transport is not None else {}

    def close(self) -> None:
        if self.native is not None:
            self.native.enabled = False
        comm, self.comm = self.comm, None
        if comm is not None:
            self._reap(comm)
            # The communicator forgets what is still pending (after any call in progress on
            # another thread returns): only then are the buffers free to go.
            gone = CommError("pycomm: the group was destroyed before this message completed")
            with self._lock:
                for i in comm.cancel():
                    m = self._inflight.pop(i, None)
                    if m is not None:
                        m.keep, m.error = None, gone
        self.transport = None
