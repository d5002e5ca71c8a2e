"""Collectives on CUDA tensors: the CUDA IPC and NCCL point-to-point transports.

Called by pycomm.collectives after it has validated the arguments; the CUDA work itself is
csrc/cuda/ (through pycomm._cuda).  Each group gets, on its first CUDA collective (every
member makes that call, so the set-up is collective too):

- a CUDA stream of its own, which waits for the caller's current stream before each
  operation, and an event recorded after it;
- "ipc" (ranks on one host, at most 8): every rank's staging buffer mapped by the others.
  all_reduce is one-shot for small messages (each rank reduces all buffers, in rank order)
  and two-shot above PYCOMM_CUDA_ONESHOT_BYTES (each rank reduces its slice, then gathers
  the others' slices).  Host barriers over the group's shared-memory communicator separate
  the phases, so the IPC transport inherits its timeouts and dead-peer errors, and works
  for processes that share one GPU (time-sliced: kernels cannot spin on each other);
- "nccl" (across hosts, or when asked for): pycomm's ring and tree plans over NCCL
  point-to-point, cut into rounds (csrc/algorithms/rounds.h).

Stream semantics follow torch.distributed's NCCL backend: a call returns once the work is
enqueued, and the caller's current stream waits for it; ``Work.wait()`` does the same for
async calls, ``Work.wait(timeout)`` also blocks the host.  IPC collectives synchronise the
host at each phase (that is what the barriers need), so they return complete.

A NCCL operation that does not complete within the group's timeout is aborted by a
watchdog thread, which then asks the other ranks (through the store) which collective they
are waiting for: the error names the ranks that never reached it.

Environment: PYCOMM_CUDA_TRANSPORT=auto|ipc|nccl, PYCOMM_CUDA_ONESHOT_BYTES (default
262144), PYCOMM_CUDA_IPC_BYTES (staging bytes per rank, default 32 MiB),
PYCOMM_NCCL_PIECE_BYTES (default 1 MiB).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import torch

from pycomm import _cuda, _types
from pycomm.distributed import _env_int
from pycomm.errors import CommError, CommTimeoutError

COLL = {"all_reduce": 0, "reduce_scatter": 1, "all_gather": 2, "broadcast": 3}
_NO_OP = 4  # csrc/common.h RedOp::None: collectives that reduce nothing


def transport_for(g, algorithm: str) -> str:
    """'ipc' or 'nccl' for a CUDA collective on group g."""
    forced = os.environ.get("PYCOMM_CUDA_TRANSPORT", "auto").lower()
    if forced not in ("auto", "ipc", "nccl"):
        raise ValueError(f"PYCOMM_CUDA_TRANSPORT={forced!r}: use 'auto', 'ipc' or 'nccl'")
    one_host = g._hier is None
    if forced == "ipc" or (forced == "auto" and algorithm == "auto"):
        if one_host and g.size <= _cuda.IPC_MAX_RANKS:
            return "ipc"
        if forced == "ipc":
            raise ValueError(f"PYCOMM_CUDA_TRANSPORT=ipc needs the group on one host with at most "
                             f"{_cuda.IPC_MAX_RANKS} ranks; use nccl")
    return "nccl"


@dataclass(eq=False)
class _State:
    """A group's CUDA resources (one device per process)."""

    device: int
    stream: torch.cuda.Stream
    prefix: str
    ipc: _cuda.IpcBuffers | None = None
    nccl: _cuda.NcclComm | None = None
    seq: int = 0
    pending: list = field(default_factory=list)  # (seq, name, event, start) of NCCL ops
    error: BaseException | None = None
    watchdog: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False


def _store():
    from pycomm import distributed

    w = distributed._require()
    return w.store, w.generation


def _state(g, device: torch.device) -> _State:
    if g._comm is None and g._hier is None:
        raise RuntimeError("pycomm: this group was destroyed; call init_process_group again")
    st = g._gpu
    index = device.index if device.index is not None else torch.cuda.current_device()
    if st is None:
        _cuda.require()
        store, generation = _store()
        st = _State(device=index, stream=torch.cuda.Stream(device=index),
                    prefix=f"pycomm/{generation}/g{g.gid}/cuda/")
        g._gpu = st
    elif st.device != index:
        raise ValueError(f"pycomm: this group's CUDA collectives run on cuda:{st.device}, but the "
                         f"tensor is on {device}; use one device per process and group")
    if st.error is not None:
        raise st.error
    return st


def _ipc(g, st: _State) -> _cuda.IpcBuffers:
    if st.ipc is None:
        from pycomm.distributed import _wait_keys

        store, _ = _store()
        buf = _cuda.IpcBuffers(st.device, 2 * _env_int("PYCOMM_CUDA_IPC_BYTES", 32 << 20))
        store.set(f"{st.prefix}ipc/{g.rank}", buf.handle)
        _wait_keys(store, {f"{st.prefix}ipc/{r}": g.ranks[r] for r in range(g.size)}, g.timeout,
                   "share its CUDA IPC buffer")
        buf.open(g.rank, [store.get(f"{st.prefix}ipc/{r}") for r in range(g.size)])
        st.ipc = buf
    return st.ipc


def _nccl(g, st: _State) -> _cuda.NcclComm:
    if st.nccl is None:
        from pycomm.distributed import _wait_keys

        store, _ = _store()
        key = f"{st.prefix}nccl-id"
        if g.rank == 0:
            store.set(key, _cuda.NcclComm.unique_id())
        _wait_keys(store, {key: g.ranks[0]}, g.timeout, "publish the NCCL id")
        st.nccl = _cuda.NcclComm(st.device, g.rank, g.size, store.get(key),
                                 _env_int("PYCOMM_NCCL_PIECE_BYTES", 1 << 20))
    return st.nccl


class CudaWork:
    """Handle of a CUDA collective: an event on the group's stream."""

    def __init__(self, st: _State, event: torch.cuda.Event, result):
        self._st, self._event, self._result = st, event, result

    def wait(self, timeout: float | None = None) -> bool:
        """Makes the caller's current stream wait for the operation.  With a timeout
        (seconds), also blocks the host until it completed, raising TimeoutError."""
        if self._st.error is not None:
            raise self._st.error
        torch.cuda.current_stream(self._st.device).wait_event(self._event)
        if timeout is not None:
            deadline = time.monotonic() + timeout
            while not self._event.query():
                if self._st.error is not None:
                    raise self._st.error
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pycomm: CUDA collective not complete within {timeout} s")
                time.sleep(50e-6)
        return True

    def is_completed(self) -> bool:
        return self._st.error is not None or self._event.query()

    def is_success(self) -> bool:
        return self._st.error is None and self._event.query()

    def exception(self) -> BaseException | None:
        return self._st.error

    def get_future(self) -> torch.futures.Future:
        fut = torch.futures.Future()

        def drive():
            try:
                self._event.synchronize()
                if self._st.error is not None:
                    raise self._st.error
                fut.set_result(self._result)
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)

        threading.Thread(target=drive, daemon=True, name="pycomm-cuda-future").start()
        return fut


# ---------------------------------------------------------------------------- running


def _launch(g, st: _State, name: str, tensors, body, async_op: bool, nccl: bool):
    """Runs body(stream_handle) on the group's stream after the caller's current stream."""
    caller = torch.cuda.current_stream(st.device)
    st.stream.wait_stream(caller)
    with torch.cuda.stream(st.stream):
        body(st.stream.cuda_stream)
    for t in tensors:
        t.record_stream(st.stream)  # the caching allocator must not reuse them early
    event = torch.cuda.Event()
    event.record(st.stream)
    if nccl:
        st.seq += 1
        _watch(g, st, name, event)
    work = CudaWork(st, event, tensors[0] if tensors else None)
    if async_op:
        return work
    work.wait()
    return None


def _watch(g, st: _State, name: str, event: torch.cuda.Event) -> None:
    with st.lock:
        st.pending.append((st.seq, name, event, time.monotonic()))
        if st.watchdog is None:
            st.watchdog = threading.Thread(target=_watchdog, args=(g, st), daemon=True,
                                           name=f"pycomm-g{g.gid}-watchdog")
            st.watchdog.start()


def _watchdog(g, st: _State) -> None:
    while not st.closed and st.error is None:
        with st.lock:
            st.pending = [p for p in st.pending if not p[2].query()]
            oldest = st.pending[0] if st.pending else None
        if oldest is not None and time.monotonic() - oldest[3] > g.timeout:
            seq, name, _, _ = oldest
            missing = _diagnose(g, st, seq)
            try:
                st.nccl.abort()  # releases the kernels stuck waiting for a peer
            finally:
                who = ", ".join(f"rank {r}" for r in missing) or "no rank identified"
                st.error = CommTimeoutError(
                    f"pycomm: NCCL {name} #{seq} on group {g.gid} did not complete within "
                    f"{g.timeout:.1f} s; ranks that had not reached it (dead or slow): {who}. "
                    "The communicator was aborted: destroy the process group and create a new one.")
            return
        time.sleep(0.01)


def _diagnose(g, st: _State, seq: int) -> list[int]:
    """Global ranks whose own NCCL work has not reached collective #seq (asked via the
    store: each rank's watchdog reports how far it got; a dead rank reports nothing)."""
    store, _ = _store()
    store.set(f"{st.prefix}stuck/{g.rank}", str(seq))
    time.sleep(min(2.0, g.timeout / 2))  # let the others' watchdogs fire too
    missing = []
    for r in range(g.size):
        if r == g.rank:
            continue
        key = f"{st.prefix}stuck/{r}"
        try:
            theirs = int(store.get(key)) if store.check([key]) else -1
        except Exception:  # noqa: BLE001
            theirs = -1
        if theirs < seq:  # never got stuck (absent or busy) or stuck earlier
            missing.append(g.ranks[r])
    return missing


def _barrier(g) -> None:
    g._comm.barrier(g.timeout)


def _chunks(count: int, parts: int):
    base, rem = divmod(count, parts)
    offs = [i * base + min(i, rem) for i in range(parts + 1)]
    return [(offs[i], offs[i + 1]) for i in range(parts)]


# ---------------------------------------------------------------------------- IPC bodies


def _ipc_all_reduce(g, st, buf: _cuda.IpcBuffers, t: torch.Tensor, code: int, stream: int,
                    oneshot: bool):
    es, dt = t.element_size(), _types.DTYPE_CODES[t.dtype]
    region = buf.capacity // 2
    step = region // es
    for lo in range(0, t.numel(), step):
        n = min(step, t.numel() - lo)
        ptr = t.data_ptr() + lo * es
        buf.put(0, ptr, n * es, stream)
        st.stream.synchronize()
        _barrier(g)  # every rank's input is staged
        if oneshot:
            buf.reduce(ptr, 0, n, dt, code, stream)
        else:
            a, b = _chunks(n, g.size)[g.rank]
            buf.reduce(buf.pointer + region + a * es, a * es, b - a, dt, code, stream)
            st.stream.synchronize()
            _barrier(g)  # every slice is reduced
            for r, (a, b) in enumerate(_chunks(n, g.size)):
                buf.get(r, ptr + a * es, region + a * es, (b - a) * es, stream)
        st.stream.synchronize()
        _barrier(g)  # nobody reads the buffers any more: the next chunk may overwrite them


def _ipc_reduce_scatter(g, st, buf, out: torch.Tensor, inp: torch.Tensor, code: int, stream: int):
    es, dt, n = inp.element_size(), _types.DTYPE_CODES[inp.dtype], out.numel()
    step = max(1, (buf.capacity // 2) // (es * g.size))
    for lo in range(0, n, step):
        m = min(step, n - lo)
        for r in range(g.size):  # stage block r's piece at r * m
            buf.put(r * m * es, inp.data_ptr() + (r * n + lo) * es, m * es, stream)
        st.stream.synchronize()
        _barrier(g)
        buf.reduce(out.data_ptr() + lo * es, g.rank * m * es, m, dt, code, stream)
        st.stream.synchronize()
        _barrier(g)


def _ipc_all_gather(g, st, buf, out: torch.Tensor, inp: torch.Tensor, stream: int):
    nbytes = inp.numel() * inp.element_size()
    step = buf.capacity // 2
    for lo in range(0, nbytes, step):
        m = min(step, nbytes - lo)
        buf.put(0, inp.data_ptr() + lo, m, stream)
        st.stream.synchronize()
        _barrier(g)
        for r in range(g.size):
            buf.get(r, out.data_ptr() + r * nbytes + lo, 0, m, stream)
        st.stream.synchronize()
        _barrier(g)


def _ipc_broadcast(g, st, buf, t: torch.Tensor, src: int, stream: int):
    nbytes = t.numel() * t.element_size()
    step = buf.capacity // 2
    for lo in range(0, nbytes, step):
        m = min(step, nbytes - lo)
        if g.rank == src:
            buf.put(0, t.data_ptr() + lo, m, stream)
            st.stream.synchronize()
        _barrier(g)
        if g.rank != src:
            buf.get(src, t.data_ptr() + lo, 0, m, stream)
            st.stream.synchronize()
        _barrier(g)


# ---------------------------------------------------------------------------- entry points


def _debug(g, name: str, nbytes: int, how: str) -> None:
    if os.environ.get("PYCOMM_DEBUG", "").upper() in ("INFO", "DEBUG"):
        print(f"pycomm: {name} of {nbytes} B on group {g.gid} (rank {g.rank}/{g.size}): {how}",
              flush=True)


def _ipc_run(g, st, name, tensors, fn, async_op):
    """IPC collectives block the host at each phase; async calls run on the group's
    worker thread (in call order with the group's other collectives)."""
    buf = _ipc(g, st)
    caller = torch.cuda.current_stream(st.device)

    def run():
        st.stream.wait_stream(caller)
        with torch.cuda.stream(st.stream):
            fn(buf, st.stream.cuda_stream)
        for t in tensors:
            t.record_stream(st.stream)
        caller.wait_stream(st.stream)
        return tensors[0] if tensors else None

    return g._run(run, async_op)


def _oneshot(nbytes: int) -> bool:
    return nbytes <= _env_int("PYCOMM_CUDA_ONESHOT_BYTES", 256 << 10)


def _nccl_plan(g, st: _State, collective: str, algorithm: str, nbytes: int) -> tuple[_cuda.NcclComm, int]:
    """The NCCL communicator and the plan's algorithm code (the cost model's choice for
    "auto", with $PYCOMM_ALGO), logged."""
    algo = g.model.pick(collective, nbytes, g.size) if algorithm == "auto" else algorithm
    comm = _nccl(g, st)
    _debug(g, collective, nbytes, f"{algo} over NCCL point-to-point")
    return comm, _types.ALGORITHMS[algo]


def _nccl_run(comm: _cuda.NcclComm, coll: str, algo: int, out: torch.Tensor, inp: torch.Tensor,
              count: int, op: int, root: int, stream: int) -> None:
    """One collective over NCCL with the scratch it needs (allocated on the group's
    stream, which is current here, so the caching allocator reuses it in stream order)."""
    dt = _types.DTYPE_CODES[inp.dtype]
    nbytes = comm.scratch_bytes(COLL[coll], algo, count, dt, root)
    scratch = torch.empty(max(1, nbytes), dtype=torch.uint8, device=inp.device)
    comm.run(COLL[coll], algo, out.data_ptr(), inp.data_ptr(), scratch.data_ptr(), count, dt, op,
             root, stream)


def all_reduce(g, tensor, name: str, code: int, algorithm: str, async_op: bool):
    st = _state(g, tensor.device)
    nbytes = tensor.numel() * tensor.element_size()
    if transport_for(g, algorithm) == "ipc":
        oneshot = _oneshot(nbytes)
        _debug(g, "all_reduce", nbytes, f"{'one-shot' if oneshot else 'two-shot'} over CUDA IPC")

        def fn(buf, stream):
            _ipc_all_reduce(g, st, buf, tensor, code, stream, oneshot)
            if name == "avg":
                tensor.div_(g.size)

        return _ipc_run(g, st, "all_reduce", [tensor], fn, async_op)
    comm, algo = _nccl_plan(g, st, "all_reduce", algorithm, nbytes)

    def body(stream):
        work = tensor.float() if tensor.dtype in _types.HALF_TYPES else tensor
        _nccl_run(comm, "all_reduce", algo, work, work, work.numel(), code, -1, stream)
        if name == "avg":
            work.div_(g.size)
        if work is not tensor:
            tensor.copy_(work)

    return _launch(g, st, "all_reduce", [tensor], body, async_op, nccl=True)


def reduce_scatter(g, output, input, name: str, code: int, algorithm: str, async_op: bool):
    """output may be input's own chunk: both transports stage or stream the input before
    the chunk is written."""
    st = _state(g, input.device)
    nbytes = input.numel() * input.element_size()
    if transport_for(g, algorithm) == "ipc":
        _debug(g, "reduce_scatter", nbytes, "over CUDA IPC")

        def fn(buf, stream):
            _ipc_reduce_scatter(g, st, buf, output, input, code, stream)
            if name == "avg":
                output.div_(g.size)

        return _ipc_run(g, st, "reduce_scatter", [output, input], fn, async_op)
    comm, algo = _nccl_plan(g, st, "reduce_scatter", algorithm, nbytes)

    def body(stream):
        half = input.dtype in _types.HALF_TYPES
        src = input.float() if half else input
        dst = torch.empty(output.shape, dtype=src.dtype, device=output.device) if half else output
        _nccl_run(comm, "reduce_scatter", algo, dst, src, dst.numel(), code, -1, stream)
        if name == "avg":
            dst.div_(g.size)
        if dst is not output:
            output.copy_(dst)

    return _launch(g, st, "reduce_scatter", [output, input], body, async_op, nccl=True)


def all_gather(g, output, input, algorithm: str, async_op: bool):
    st = _state(g, input.device)
    nbytes = output.numel() * output.element_size()
    if transport_for(g, algorithm) == "ipc":
        _debug(g, "all_gather", nbytes, "over CUDA IPC")
        return _ipc_run(g, st, "all_gather", [output, input],
                        lambda buf, stream: _ipc_all_gather(g, st, buf, output, input, stream), async_op)
    comm, algo = _nccl_plan(g, st, "all_gather", algorithm, nbytes)
    body = lambda stream: _nccl_run(comm, "all_gather", algo, output, input, input.numel(),  # noqa: E731
                                    _NO_OP, -1, stream)
    return _launch(g, st, "all_gather", [output, input], body, async_op, nccl=True)


def broadcast(g, tensor, src: int, async_op: bool):
    st = _state(g, tensor.device)
    nbytes = tensor.numel() * tensor.element_size()
    if transport_for(g, "auto") == "ipc":
        _debug(g, "broadcast", nbytes, "over CUDA IPC")
        return _ipc_run(g, st, "broadcast", [tensor],
                        lambda buf, stream: _ipc_broadcast(g, st, buf, tensor, src, stream), async_op)
    comm, algo = _nccl_plan(g, st, "broadcast", "auto", nbytes)
    body = lambda stream: _nccl_run(comm, "broadcast", algo, tensor, tensor, tensor.numel(),  # noqa: E731
                                    _NO_OP, src, stream)
    return _launch(g, st, "broadcast", [tensor], body, async_op, nccl=True)


def p2p(g, items, async_op: bool):
    """items: (is_send, peer, tensor) of CUDA tensors, launched as one NCCL group."""
    st = _state(g, items[0][2].device)
    comm = _nccl(g, st)
    _debug(g, "send/recv", sum(t.numel() * t.element_size() for _, _, t in items), "NCCL point-to-point")

    def body(stream):
        comm.p2p([(k, t.data_ptr(), t.numel() * t.element_size(), p) for k, p, t in items], stream)

    return _launch(g, st, "send/recv", [t for _, _, t in items], body, async_op, nccl=True)


def close(g) -> None:
    """Releases a group's CUDA resources (destroy_process_group)."""
    st = g._gpu
    if st is None:
        return
    st.closed = True
    g._gpu = None
    try:
        st.stream.synchronize()
    except Exception:  # noqa: BLE001 - a failed device must not block the shut-down
        pass
    for res in (st.nccl, st.ipc):
        if res is not None:
            try:
                res.close()
            except CommError:
                pass

