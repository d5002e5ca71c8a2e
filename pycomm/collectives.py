"""Collectives and point-to-point operations on CPU and CUDA tensors.

Every function checks its arguments before anything is sent: a bad tensor raises
``ValueError`` or ``TypeError`` saying what to do, leaves the caller's tensors untouched and
the group usable.  ``algorithm`` is "ring", "tree" or "auto" (the cost model of
pycomm.tuning picks).  ``async_op=True`` returns a :class:`Work`; collectives of one group
always run in the order they were called.

float16 and bfloat16 are reduced in float32: the tensor is upcast once, reduced, and
rounded once, so the result is the float32 reduction rounded to the tensor's dtype.
Results are bitwise identical on every rank (each element is reduced by one rank, or at
the root of a tree, and copied unchanged to the others).

CUDA tensors go to pycomm._gpu: CUDA IPC between the ranks of one host, NCCL point-to-point
carrying the same ring and tree plans otherwise.  As with torch.distributed's NCCL backend,
a call on CUDA tensors returns once the work is ordered on the caller's current stream.

A group whose ranks span hosts is handed to pycomm._hierarchy after the checks: all_reduce
is hierarchical (shared memory inside each host, gloo between hosts; plain gloo when hosts
hold unequal numbers of ranks), the other operations go over gloo.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass

import torch

from pycomm import _gpu, _hierarchy, _types
from pycomm.distributed import Group, group_or_world

__all__ = [
    "Work", "P2POp", "all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier",
    "send", "recv", "isend", "irecv", "batch_isend_irecv",
]

_DEBUG = os.environ.get("PYCOMM_DEBUG", "").upper() in ("INFO", "DEBUG")


class Work:
    """Handle of an asynchronous operation (``async_op=True``)."""

    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the operation finished; re-raises its error.  The collective's own
        deadline (the group's timeout) bounds the wait; `timeout` (seconds) may shorten it,
        and raises TimeoutError if it expires first."""
        self._future.result(timeout)
        return True

    def is_completed(self) -> bool:
        return self._future.done()

    def is_success(self) -> bool:
        return self._future.done() and self._future.exception() is None

    def exception(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None

    def get_future(self) -> torch.futures.Future:
        """A torch.futures.Future completed (or failed) with the operation."""
        fut = torch.futures.Future()

        def done(f: concurrent.futures.Future):
            if f.exception() is not None:
                fut.set_exception(f.exception())
            else:
                fut.set_result(f.result())

        self._future.add_done_callback(done)
        return fut


# ---------------------------------------------------------------------------- checks


def _check_tensor(fn: str, arg: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pycomm.{fn}: {arg} must be a torch.Tensor, not {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"pycomm.{fn}: {arg} is a {t.layout} tensor; pass a dense one (.to_dense())")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"pycomm.{fn}: {arg} is on {t.device}; pycomm moves CPU tensors (shared memory) and "
            "CUDA tensors (CUDA IPC, NCCL): pass t.cpu() or a CUDA tensor"
        )
    if t.dtype not in _types.DTYPE_CODES:
        raise TypeError(f"pycomm.{fn}: {arg} has dtype {t.dtype}; supported: {_types.SUPPORTED}")
    if not t.is_contiguous():
        raise ValueError(
            f"pycomm.{fn}: {arg} is not contiguous; pass t.contiguous() (and copy the result "
            "back if you need it in the original tensor)"
        )


def _check_pair(fn: str, out: torch.Tensor, inp: torch.Tensor, out_numel: int) -> None:
    _check_tensor(fn, "output", out)
    _check_tensor(fn, "input", inp)
    if out.device != inp.device:
        raise ValueError(f"pycomm.{fn}: output is on {out.device} but input is on {inp.device}; "
                         "use one device")
    if out.dtype != inp.dtype:
        raise TypeError(f"pycomm.{fn}: output is {out.dtype} but input is {inp.dtype}; use one dtype")
    if out.numel() != out_numel:
        raise ValueError(
            f"pycomm.{fn}: output has {out.numel()} elements; it needs {out_numel} "
            f"(input has {inp.numel()} on each of the group's ranks)"
        )


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _check_algorithm(algorithm: str) -> str:
    if algorithm not in ("auto", "ring", "tree"):
        raise ValueError(f"unknown algorithm {algorithm!r}: use 'ring', 'tree' or 'auto'")
    return algorithm


def _algorithm(g: Group, collective: str, algorithm: str, nbytes: int) -> int:
    _check_algorithm(algorithm)
    if algorithm == "auto":
        algorithm = g.model.pick(collective, nbytes, g.size)
    if _DEBUG and g._hier is None:  # groups across hosts log their own plan
        print(f"pycomm: {collective} of {nbytes} B on group {g.gid} (rank {g.rank}/{g.size}): "
              f"{algorithm} over shm", flush=True)
    return _types.ALGORITHMS[algorithm]


def _reduction(fn: str, dtype: torch.dtype, op) -> tuple[str, int]:
    name = _types.reduce_op_name(op)
    if name == "avg" and not dtype.is_floating_point:
        raise TypeError(f"pycomm.{fn}: op='avg' needs a floating-point tensor, not {dtype}; "
                        "use op='sum' and divide")
    return name, _types.OPS[name]


def _work_buffer(t: torch.Tensor) -> torch.Tensor:
    """The buffer the C++ side reduces: float32 for half types (upcast once), else t."""
    return t.float() if t.dtype in _types.HALF_TYPES else t


# ---------------------------------------------------------------------------- collectives


def all_reduce(tensor: torch.Tensor, op="sum", algorithm: str = "auto",
               group: Group | None = None, async_op: bool = False):
    """Reduces `tensor` across the group, in place, on every rank.  On a group across
    hosts: shared memory inside each host and gloo between them (plain gloo if hosts hold
    unequal numbers of the group's ranks); see pycomm._hierarchy."""
    g = group_or_world(group)
    _check_tensor("all_reduce", "tensor", tensor)
    name, code = _reduction("all_reduce", tensor.dtype, op)
    if tensor.is_cuda:
        return _gpu.all_reduce(g, tensor, name, code, _check_algorithm(algorithm), async_op)
    algo = _algorithm(g, "all_reduce", algorithm, tensor.numel() * tensor.element_size())
    if g._hier is not None:
        return _hierarchy.all_reduce(g, tensor, name, algorithm, async_op)

    def run():
        buf = _work_buffer(tensor)
        g._comm.all_reduce(buf.data_ptr(), buf.data_ptr(), buf.numel(),
                           _types.DTYPE_CODES[buf.dtype], code, algo, g.timeout)
        if name == "avg":
            buf.div_(g.size)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    return g._run(run, async_op)


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, op="sum", algorithm: str = "auto",
                   group: Group | None = None, async_op: bool = False):
    """output = the reduction over ranks of chunk `rank` of `input`, where input holds
    world_size chunks of output.numel() elements.  output may be input's own chunk."""
    g = group_or_world(group)
    _check_tensor("reduce_scatter", "input", input)
    _check_tensor("reduce_scatter", "output", output)
    if input.numel() != g.size * output.numel():
        raise ValueError(
            f"pycomm.reduce_scatter: input has {input.numel()} elements; it needs world_size "
            f"({g.size}) x output.numel() ({output.numel()}) = {g.size * output.numel()}"
        )
    _check_pair("reduce_scatter", output, input, input.numel() // g.size)
    n = output.numel()
    in_place = output.data_ptr() == input.data_ptr() + g.rank * n * input.element_size()
    if _overlap(output, input) and not in_place:
        raise ValueError("pycomm.reduce_scatter: output overlaps input; pass separate tensors, or "
                         "input[rank * n:(rank + 1) * n] as output for an in-place call")
    name, code = _reduction("reduce_scatter", input.dtype, op)
    if input.is_cuda:
        return _gpu.reduce_scatter(g, output, input, name, code, _check_algorithm(algorithm), async_op)
    algo = _algorithm(g, "reduce_scatter", algorithm, input.numel() * input.element_size())
    if g._hier is not None:
        return _hierarchy.reduce_scatter(g, output, input, name, async_op)

    def run():
        src, dst = _work_buffer(input), _work_buffer(output)
        if dst is not output and in_place:
            dst = src[g.rank * n:(g.rank + 1) * n]
        g._comm.reduce_scatter(dst.data_ptr(), src.data_ptr(), n, _types.DTYPE_CODES[src.dtype],
                               code, algo, g.timeout)
        if name == "avg":
            dst.div_(g.size)
        if dst is not output:
            output.copy_(dst)
        return output

    return g._run(run, async_op)


def all_gather(output: torch.Tensor, input: torch.Tensor, algorithm: str = "auto",
               group: Group | None = None, async_op: bool = False):
    """output = every rank's input, concatenated in rank order (output.numel() ==
    world_size * input.numel()).  input may be output's own chunk."""
    g = group_or_world(group)
    _check_pair("all_gather", output, input, g.size * (input.numel() if isinstance(input, torch.Tensor) else 0))
    n = input.numel()
    in_place = input.data_ptr() == output.data_ptr() + g.rank * n * output.element_size()
    if _overlap(output, input) and not in_place:
        raise ValueError("pycomm.all_gather: input overlaps output; pass separate tensors, or "
                         "output[rank * n:(rank + 1) * n] as input for an in-place call")
    if input.is_cuda:
        return _gpu.all_gather(g, output, input, _check_algorithm(algorithm), async_op)
    algo = _algorithm(g, "all_gather", algorithm, output.numel() * output.element_size())
    if g._hier is not None:
        return _hierarchy.all_gather(g, output, input, async_op)

    def run():
        g._comm.all_gather(output.data_ptr(), input.data_ptr(), n,
                           _types.DTYPE_CODES[input.dtype], algo, g.timeout)
        return output

    return g._run(run, async_op)


def broadcast(tensor: torch.Tensor, src: int, group: Group | None = None, async_op: bool = False):
    """Copies `tensor` from group rank `src` to every rank, in place."""
    g = group_or_world(group)
    _check_tensor("broadcast", "tensor", tensor)
    if not isinstance(src, int) or not 0 <= src < g.size:
        raise ValueError(f"pycomm.broadcast: src={src!r} is not a rank of this group (0..{g.size - 1})")
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.is_cuda:
        return _gpu.broadcast(g, tensor, src, async_op)
    algo = _algorithm(g, "broadcast", "auto", nbytes)
    if g._hier is not None:
        return _hierarchy.broadcast(g, tensor, src, async_op)

    def run():
        g._comm.broadcast(tensor.data_ptr(), tensor.numel(), _types.DTYPE_CODES[tensor.dtype], src,
                          algo, g.timeout)
        return tensor

    return g._run(run, async_op)


def barrier(group: Group | None = None) -> None:
    """Returns once every rank of the group has entered the barrier."""
    g = group_or_world(group)
    if g._hier is not None:
        return _hierarchy.barrier(g)
    g._run(lambda: g._comm.barrier(g.timeout), False)


# ---------------------------------------------------------------------------- point-to-point


@dataclass
class P2POp:
    """One send or receive for batch_isend_irecv: op is pycomm.isend or pycomm.irecv
    (or the strings "send"/"recv"); peer is a rank of `group`."""

    op: object
    tensor: torch.Tensor
    peer: int
    group: Group | None = None


class P2PWork(Work):
    """Handle of posted point-to-point messages.  Messages progress whenever this rank calls
    into the group (waits, other sends and receives, collectives), like MPI's nonblocking
    operations: wait() (or is_completed(), or any later call) is what moves them."""

    def __init__(self, group: Group, ids: list[int], tensors: list[torch.Tensor]):
        self._group, self._ids, self._tensors = group, set(ids), tensors  # tensors stay alive
        self._error: BaseException | None = None

    def _poll(self, slice_s: float) -> bool:
        comm = self._group._comm
        if self._error is None and self._ids:
            try:
                comm.progress(slice_s)
                self._ids = {i for i in self._ids if not comm.done(i)}
            except Exception as e:  # noqa: BLE001 - re-raised by wait()
                self._error = e
        return self._error is not None or not self._ids

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._poll(0.005):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"pycomm: point-to-point not complete within {timeout} s")
        if self._error is not None:
            raise self._error
        return True

    def is_completed(self) -> bool:
        return self._poll(0.0)

    def is_success(self) -> bool:
        return self.is_completed() and self._error is None

    def exception(self) -> BaseException | None:
        return self._error

    def get_future(self) -> torch.futures.Future:
        fut = torch.futures.Future()

        def drive():
            try:
                self.wait()
                fut.set_result(self._tensors)
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)

        threading.Thread(target=drive, daemon=True, name="pycomm-p2p-future").start()
        return fut


def _p2p(ops: list[P2POp], async_op: bool):
    if not ops:
        raise ValueError("batch_isend_irecv needs at least one P2POp")
    groups = {id(group_or_world(o.group)) for o in ops}
    if len(groups) != 1:
        raise ValueError("batch_isend_irecv: all ops must use the same group")
    g = group_or_world(ops[0].group)
    items = []
    for o in ops:
        kind = {isend: True, send: True, "send": True, irecv: False, recv: False, "recv": False}.get(o.op)
        if kind is None:
            raise ValueError(f"P2POp.op must be pycomm.isend or pycomm.irecv, not {o.op!r}")
        fn = "send" if kind else "recv"
        _check_tensor(fn, "tensor", o.tensor)
        if not isinstance(o.peer, int) or not 0 <= o.peer < g.size or o.peer == g.rank:
            raise ValueError(f"pycomm.{fn}: peer {o.peer!r} must be another rank of the group "
                             f"(0..{g.size - 1}, not this rank {g.rank})")
        items.append((kind, o.peer, o.tensor))
    devices = {t.device.type for _, _, t in items}
    if len(devices) > 1:
        raise ValueError("batch_isend_irecv: mix of CPU and CUDA tensors; use one device per batch")
    if "cuda" in devices:
        work = _gpu.p2p(g, items, True)
        if async_op:
            return work
        work.wait()
        return None
    if g._hier is not None:
        return _hierarchy.p2p(g, items, async_op)
    if g._comm is None:
        raise RuntimeError("pycomm: this group was destroyed; call init_process_group again")
    ids = [g._comm.post(k, p, t.data_ptr(), t.numel() * t.element_size(), g.timeout) for k, p, t in items]
    work = P2PWork(g, ids, [t for _, _, t in items])
    if async_op:
        return work
    work.wait()
    return None


def send(tensor: torch.Tensor, dst: int, group: Group | None = None) -> None:
    """Sends `tensor` to group rank `dst`; returns once the peer has received it."""
    _p2p([P2POp("send", tensor, dst, group)], False)


def recv(tensor: torch.Tensor, src: int, group: Group | None = None) -> None:
    """Receives into `tensor` (same number of bytes as the matching send) from rank `src`."""
    _p2p([P2POp("recv", tensor, src, group)], False)


def isend(tensor: torch.Tensor, dst: int, group: Group | None = None) -> Work:
    return _p2p([P2POp("send", tensor, dst, group)], True)


def irecv(tensor: torch.Tensor, src: int, group: Group | None = None) -> Work:
    return _p2p([P2POp("recv", tensor, src, group)], True)


def batch_isend_irecv(ops: list[P2POp]) -> list[Work]:
    """Posts the sends and receives together; returns one Work per op, all completing
    together.  (Every isend/irecv is posted at once too, so any order of posted messages
    between neighbours is deadlock-free; batching only saves waits.)"""
    work = _p2p(list(ops), True)
    return [work] * len(ops)
