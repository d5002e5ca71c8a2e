"""ShmBackend: CPU tensors of a group on one host, over shared memory.

Every collective is a row of the C++ collective table, run by the group's communicator
(pycomm._C.Communicator over a ShmTransport: csrc/communicator.cpp, csrc/transport/shm.cpp).
Point-to-point messages are posted to the communicator and progress whenever this rank
calls into the group, like MPI's nonblocking operations (see MessageWork).
"""
from __future__ import annotations

from typing import Sequence

import torch

from pycomm import _C
from pycomm._codes import ALGORITHMS, COLLECTIVES, DTYPES, NONE, Op
from pycomm.backends import Backend, P2PItem
from pycomm.work import Driven

_ALL_REDUCE = COLLECTIVES["all_reduce"]


class MessageWork(Driven):
    """Posted messages: they move while someone waits on them (or calls into the group)."""

    def __init__(self, comm: _C.Communicator, ids: list[int], tensors: list[torch.Tensor]):
        super().__init__(keep=tuple(tensors) + tuple(t.untyped_storage() for t in tensors))
        self._comm, self._ids, self._tensors = comm, set(ids), tensors

    def poll(self, slice_s: float) -> bool:
        if self._ids:
            self._comm.progress(slice_s)
            self._ids = {i for i in self._ids if not self._comm.done(i)}
        return not self._ids

    def _outputs(self) -> list[torch.Tensor]:
        return list(self._tensors)


class ShmBackend(Backend):
    name = "shm"
    inline = True

    def __init__(self, group, transport: _C.ShmTransport):
        super().__init__(group)
        self.transport = transport
        self.comm = _C.Communicator(transport)

    def _table(self, collective: str, algo: str, out: torch.Tensor, inp: torch.Tensor, count: int,
               op: Op = NONE, root: int = -1, send_counts: Sequence[int] = (),
               recv_counts: Sequence[int] = ()) -> None:
        self.comm.collective(COLLECTIVES[collective], ALGORITHMS[algo], out.data_ptr(), inp.data_ptr(),
                             count, DTYPES[inp.dtype], op.code, root, self.timeout,
                             list(send_counts), list(recv_counts))

    def _all_reduce(self, buf, op, algo):  # the latency-bound path, spelled out
        ptr = buf.data_ptr()
        self.comm.collective(_ALL_REDUCE, ALGORITHMS[algo], ptr, ptr, buf.numel(), DTYPES[buf.dtype],
                             op.code, -1, self.timeout)

    def _barrier(self) -> None:
        self.comm.barrier(self.timeout)

    def _p2p(self, items: list[P2PItem]) -> MessageWork:
        ids = [self.comm.post(is_send, peer, t.data_ptr(), t.numel() * t.element_size(), self.timeout)
               for is_send, peer, t, _tag in items]
        return MessageWork(self.comm, ids, [t for _, _, t, _ in items])

    def leave(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.leave(reason)

    def gone(self) -> dict[int, str]:
        return dict(self.transport.gone()) if self.transport is not None else {}

    def close(self) -> None:
        self.comm = None
        self.transport = None
