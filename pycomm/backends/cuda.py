"""CudaBackend: CUDA tensors, over CUDA IPC or NCCL point-to-point.

The CUDA work itself is csrc/cuda/ (through pycomm._cuda).  A group's CUDA resources are
made by its first CUDA operation (every member makes that call, so the set-up is collective
too):

- a CUDA stream of its own, which waits for the caller's current stream before each
  operation, and an event recorded after it;
- "ipc" (ranks on one host, at most 8): every rank's staging buffer mapped by the others.
  all_reduce is one-shot for small messages (each rank reduces all buffers, in rank order)
  and two-shot above PYCOMM_CUDA_ONESHOT_BYTES (each rank reduces its slice, then gathers
  the others' slices); the other collectives read the peers' buffers the same way.  Host
  barriers over the group's shared-memory communicator separate the phases, so the IPC
  transport inherits its timeouts and dead-peer errors, and works for processes that share
  one GPU (time-sliced: kernels cannot spin on each other);
- "nccl" (across hosts, when asked for with PYCOMM_CUDA_TRANSPORT=nccl, or for an explicit
  algorithm="ring"/"tree"): pycomm's plans over NCCL point-to-point, cut into rounds
  (csrc/algorithms/rounds.h); all_to_all and messages are one NCCL group each.

Stream semantics follow torch.distributed's NCCL backend: a call returns once the work is
enqueued, and the caller's current stream waits for it; ``Work.wait()`` does the same for
async calls, ``Work.wait(timeout)`` also blocks the host.  IPC operations synchronise the
host at each phase (that is what the barriers need), so they return complete; async ones
run on the group's worker thread.

A NCCL operation that does not complete within the group's timeout is aborted by a
watchdog thread, which then asks the other ranks (through the store) which operation they
are waiting for: the error names the ranks that never reached it.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pycomm import _cuda, _rendezvous
from pycomm._codes import ALGORITHMS, COLLECTIVES, DTYPES, NONE, Op
from pycomm.backends import Backend, P2PItem
from pycomm.errors import CommError, CommTimeoutError
from pycomm.work import Work


def choose_transport(setting: str, one_host: bool, size: int, algorithm: str = "auto") -> str:
    """'ipc' or 'nccl' for a CUDA operation: PYCOMM_CUDA_TRANSPORT (`setting`), where the
    group's ranks are, and whether an explicit plan ("ring", "tree") was asked for."""
    if setting == "ipc" or (setting == "auto" and algorithm == "auto"):
        if one_host and size <= _cuda.IPC_MAX_RANKS:
            return "ipc"
        if setting == "ipc":
            raise ValueError(f"PYCOMM_CUDA_TRANSPORT=ipc needs the group on one host with at most "
                             f"{_cuda.IPC_MAX_RANKS} ranks; use nccl")
    return "nccl"


def ipc_reachable(devices: list[int], can_access: Callable[[int, int], bool]) -> bool:
    """Whether every rank can map every other rank's buffer: ranks on one GPU always can,
    ranks on two GPUs only with peer access between them (``can_access(a, b)``, e.g.
    torch.cuda.can_device_access_peer).  Every rank computes the same answer from the same
    device list, so they all pick the same transport."""
    pairs = {(a, b) for a in devices for b in devices if a != b}
    return all(can_access(a, b) for a, b in sorted(pairs))


def _chunks(count: int, parts: int, element_size: int = 1):
    """``parts`` consecutive (start, end) element ranges covering ``count`` elements, each
    starting on a 16-byte boundary (relative to the buffer) so the copies and the reduction
    kernel's vector loads stay 16-byte wide; the last range takes the remainder."""
    unit = max(1, 16 // element_size) if 16 % element_size == 0 else 1
    units = -(-count // unit)
    base, rem = divmod(units, parts)
    offs = [min(count, (i * base + min(i, rem)) * unit) for i in range(parts + 1)]
    return [(offs[i], offs[i + 1]) for i in range(parts)]


# ---------------------------------------------------------------------------- IPC phases
#
# Each function stages and reads the group's IPC buffers (`buf`: put/get/reduce on device
# addresses, csrc/cuda/ipc.cu) and separates the phases with ph.barrier() after
# ph.sync() (the stream's copies have landed).  Messages larger than half the buffer go in
# chunks.  They take plain interfaces so that tests can run them on CPU processes over
# shared memory (tests/cuda/test_ipc_orchestration.py).


@dataclass
class Phases:
    rank: int
    size: int
    barrier: Callable[[], None]
    sync: Callable[[], None]

    def step(self) -> None:
        self.sync()
        self.barrier()


def ipc_all_reduce(ph: Phases, buf, t: torch.Tensor, op: int, stream: int, oneshot: bool):
    es, dt = t.element_size(), DTYPES[t.dtype]
    region = buf.capacity // 2
    step = region // es
    for lo in range(0, t.numel(), step):
        n = min(step, t.numel() - lo)
        ptr = t.data_ptr() + lo * es
        buf.put(0, ptr, n * es, stream)
        ph.step()  # every rank's input is staged
        if oneshot:
            buf.reduce(ptr, 0, n, dt, op, stream)
        else:
            a, b = _chunks(n, ph.size, es)[ph.rank]
            buf.reduce(buf.pointer + region + a * es, a * es, b - a, dt, op, stream)
            ph.step()  # every slice is reduced
            for r, (a, b) in enumerate(_chunks(n, ph.size, es)):
                buf.get(r, ptr + a * es, region + a * es, (b - a) * es, stream)
        ph.step()  # nobody reads the buffers any more: the next chunk may overwrite them


def ipc_reduce_scatter(ph: Phases, buf, out: torch.Tensor, inp: torch.Tensor, op: int, stream: int):
    es, dt, n = inp.element_size(), DTYPES[inp.dtype], out.numel()
    step = max(1, (buf.capacity // 2) // (es * ph.size))
    for lo in range(0, n, step):
        m = min(step, n - lo)
        for r in range(ph.size):  # stage block r's piece at r * m
            buf.put(r * m * es, inp.data_ptr() + (r * n + lo) * es, m * es, stream)
        ph.step()
        buf.reduce(out.data_ptr() + lo * es, ph.rank * m * es, m, dt, op, stream)
        ph.step()


def ipc_reduce(ph: Phases, buf, out: torch.Tensor, inp: torch.Tensor, root: int, op: int, stream: int):
    """The root reduces every rank's staged buffer, in rank order, into out."""
    es, dt = inp.element_size(), DTYPES[inp.dtype]
    step = (buf.capacity // 2) // es
    for lo in range(0, inp.numel(), step):
        n = min(step, inp.numel() - lo)
        buf.put(0, inp.data_ptr() + lo * es, n * es, stream)
        ph.step()
        if ph.rank == root:
            buf.reduce(out.data_ptr() + lo * es, 0, n, dt, op, stream)
        ph.step()


def ipc_all_gather(ph: Phases, buf, out: torch.Tensor, inp: torch.Tensor, stream: int):
    nbytes = inp.numel() * inp.element_size()
    step = buf.capacity // 2
    src = inp.data_ptr()
    for lo in range(0, nbytes, step):
        m = min(step, nbytes - lo)
        buf.put(0, src + lo, m, stream)
        ph.step()
        for r in range(ph.size):
            buf.get(r, out.data_ptr() + r * nbytes + lo, 0, m, stream)
        ph.step()


def ipc_gather(ph: Phases, buf, out: torch.Tensor | None, inp: torch.Tensor, root: int, stream: int):
    nbytes = inp.numel() * inp.element_size()
    step = buf.capacity // 2
    for lo in range(0, nbytes, step):
        m = min(step, nbytes - lo)
        buf.put(0, inp.data_ptr() + lo, m, stream)
        ph.step()
        if ph.rank == root:
            assert out is not None  # the caller passes the root's output
            for r in range(ph.size):
                buf.get(r, out.data_ptr() + r * nbytes + lo, 0, m, stream)
        ph.step()


def ipc_broadcast(ph: Phases, buf, t: torch.Tensor, src: int, stream: int):
    nbytes = t.numel() * t.element_size()
    step = buf.capacity // 2
    for lo in range(0, nbytes, step):
        m = min(step, nbytes - lo)
        if ph.rank == src:
            buf.put(0, t.data_ptr() + lo, m, stream)
            ph.sync()
        ph.barrier()
        if ph.rank != src:
            buf.get(src, t.data_ptr() + lo, 0, m, stream)
            ph.sync()
        ph.barrier()


def ipc_scatter(ph: Phases, buf, out: torch.Tensor, inp: torch.Tensor | None, root: int, stream: int):
    nbytes = out.numel() * out.element_size()
    step = max(1, (buf.capacity // 2) // ph.size)
    for lo in range(0, nbytes, step):
        m = min(step, nbytes - lo)
        if ph.rank == root:
            assert inp is not None  # the caller passes the root's input
            for r in range(ph.size):  # block r's piece at r * m
                buf.put(r * m, inp.data_ptr() + r * nbytes + lo, m, stream)
            ph.sync()
        ph.barrier()
        buf.get(root, out.data_ptr() + lo, ph.rank * m, m, stream)
        ph.step()


def ipc_all_to_all(ph: Phases, buf, out: torch.Tensor, inp: torch.Tensor, matrix: list[list[int]],
                   stream: int):
    """matrix[j][r]: bytes rank j sends rank r (every rank's row, agreed beforehand).  Each
    round stages up to `cap` bytes of every outgoing block and every rank reads its pieces."""
    cap = max(1, (buf.capacity // 2) // ph.size)
    mine = matrix[ph.rank]
    in_off = [sum(mine[:r]) for r in range(ph.size)]
    out_off = [sum(matrix[j][ph.rank] for j in range(r)) for r in range(ph.size)]
    longest = max((max(row) for row in matrix), default=0)
    for lo in range(0, longest, cap):
        for r in range(ph.size):
            m = max(0, min(cap, mine[r] - lo))
            if m:
                buf.put(r * cap, inp.data_ptr() + in_off[r] + lo, m, stream)
        ph.step()
        for j in range(ph.size):
            m = max(0, min(cap, matrix[j][ph.rank] - lo))
            if m:
                buf.get(j, out.data_ptr() + out_off[j] + lo, ph.rank * cap, m, stream)
        ph.step()


# ---------------------------------------------------------------------------- the backend


@dataclass(eq=False)
class _State:
    """A group's CUDA resources (one device per process), made by its first CUDA call."""

    device: int
    stream: torch.cuda.Stream
    ipc: _cuda.IpcBuffers | None = None
    nccl: _cuda.NcclComm | None = None
    seq: int = 0
    pending: list = field(default_factory=list)  # (seq, name, event, start) of NCCL ops
    error: BaseException | None = None
    watchdog: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False


class CudaWork(Work):
    """Handle of a CUDA operation: an event on the group's stream."""

    def __init__(self, st: _State, event: torch.cuda.Event, outputs: list, keep: tuple):
        fut = _future_done(outputs)
        super().__init__(fut, keep)
        self._st, self._event, self._outputs = st, event, outputs
        self._keep_until_event = keep  # the caching allocator must not reuse them early

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
                    raise TimeoutError(f"pycomm: CUDA operation not complete within {timeout} s")
                time.sleep(50e-6)
        return True

    def is_completed(self) -> bool:
        return self._st.error is not None or self._event.query()

    def is_success(self) -> bool:
        return self._st.error is None and self._event.query()

    def exception(self) -> BaseException | None:
        return self._st.error

    def result(self) -> list[torch.Tensor]:
        return list(self._outputs)

    def add_done_callback(self, fn) -> None:
        def drive():
            try:
                self._event.synchronize()
            finally:
                fn(self)

        threading.Thread(target=drive, daemon=True, name="pycomm-cuda-done").start()


def _future_done(value) -> concurrent.futures.Future:
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_result(value)
    return f


class CudaBackend(Backend):
    name = "CUDA"

    def __init__(self, group, store: dist.Store, prefix: str, barrier: Callable[[], None] | None):
        """`barrier`: a host barrier among the group's ranks (its shared-memory communicator),
        needed by CUDA IPC; None across hosts."""
        super().__init__(group)
        self.store, self.prefix = store, prefix + "cuda/"
        self.host_barrier = barrier
        self.one_host = barrier is not None
        self.setting = group.settings.cuda_transport
        self.st: _State | None = None
        self._ipc_ok: bool | None = None  # peer access among the ranks' GPUs, found once

    # ------------------------------------------------------------------ resources

    def _state(self, device: torch.device) -> _State:
        st = self.st
        index = device.index if device.index is not None else torch.cuda.current_device()
        if st is None:
            _cuda.require()
            st = self.st = _State(device=index, stream=torch.cuda.Stream(device=index))
        elif st.device != index:
            raise ValueError(f"pycomm: this group's CUDA operations run on cuda:{st.device}, but the "
                             f"tensor is on {device}; use one device per process and group")
        if st.error is not None:
            raise st.error
        return st

    def _ipc(self, st: _State) -> _cuda.IpcBuffers:
        if st.ipc is None:
            buf = _cuda.IpcBuffers(st.device, 2 * self.group.settings.cuda_ipc_bytes)
            self.store.set(f"{self.prefix}ipc/{self.rank}", buf.handle)  # type: ignore[arg-type]
            _rendezvous.wait_keys(self.store, {f"{self.prefix}ipc/{r}": self.group.ranks[r]
                                               for r in range(self.size)},
                                  self.timeout, "share its CUDA IPC buffer")
            handles = [self.store.get(f"{self.prefix}ipc/{r}") for r in range(self.size)]
            if any(len(h) != _cuda.IPC_HANDLE_BYTES for h in handles):
                raise CommError("pycomm: a CUDA IPC handle in the store has the wrong size; "
                                "something other than this job wrote it")
            buf.open(self.rank, handles)
            st.ipc = buf
        return st.ipc

    def _nccl(self, st: _State) -> _cuda.NcclComm:
        if st.nccl is None:
            key = f"{self.prefix}nccl-id"
            if self.rank == 0:
                self.store.set(key, _cuda.NcclComm.unique_id())  # type: ignore[arg-type]
            _rendezvous.wait_keys(self.store, {key: self.group.ranks[0]}, self.timeout,
                                  "publish the NCCL id")
            uid = self.store.get(key)
            if len(uid) != _cuda.NCCL_ID_BYTES:
                raise CommError("pycomm: the NCCL id in the store has the wrong size; something "
                                "other than this job wrote it")
            # Non-blocking initialisation, polled against the group's timeout: a rank that
            # never calls it is named instead of hanging this one inside ncclCommInitRank.
            arrived = {f"{self.prefix}nccl-arrived/{r}": self.group.ranks[r] for r in range(self.size)}
            self.store.set(f"{self.prefix}nccl-arrived/{self.rank}", "1")
            comm = _cuda.NcclComm(st.device, self.rank, self.size, uid,
                                  self.group.settings.nccl_piece_bytes, self.timeout)
            wait_ready(comm, self.timeout, lambda: _absent(self.store, arrived))
            st.nccl = comm
        return st.nccl

    def _via(self, algo: str) -> str:
        """'ipc' or 'nccl'.  pick() leaves "auto" for IPC and resolves it for NCCL, so the
        algorithm a call carries also says its transport."""
        via = choose_transport(self.setting, self.one_host, self.size, algo)
        if via == "ipc" and not self._peer_access():
            if self.setting == "ipc":
                raise CommError("pycomm: PYCOMM_CUDA_TRANSPORT=ipc, but some of this group's GPUs have no "
                                "peer access to each other; use PYCOMM_CUDA_TRANSPORT=auto or nccl")
            return "nccl"
        return via

    def _peer_access(self) -> bool:
        """Whether CUDA IPC can work among this group's GPUs (checked once, on every rank at its
        first IPC-eligible call: the ranks publish their devices and each checks every pair)."""
        if self._ipc_ok is None:
            device = self.st.device if self.st is not None else torch.cuda.current_device()
            self.store.set(f"{self.prefix}device/{self.rank}", str(device))
            keys = {f"{self.prefix}device/{r}": self.group.ranks[r] for r in range(self.size)}
            _rendezvous.wait_keys(self.store, keys, self.timeout, "publish its CUDA device")
            devices = [int(self.store.get(k)) for k in keys]
            self._ipc_ok = ipc_reachable(devices, torch.cuda.can_device_access_peer)
            if not self._ipc_ok and self.group.settings.debug:
                self.log("cuda", 0, f"no peer access among GPUs {devices}: NCCL instead of CUDA IPC")
        return self._ipc_ok

    # ------------------------------------------------------------------ policy hooks

    def pick(self, collective: str, algorithm: str, nbytes: int) -> str:
        via = self._via(algorithm)
        if via == "ipc":
            if self.group.settings.debug:
                how = ("one-shot" if nbytes <= self.group.settings.cuda_oneshot_bytes else "two-shot") \
                    if collective == "all_reduce" else "staged"
                self.log(collective, nbytes, f"{how} over CUDA IPC")
            return algorithm
        algo = self.group.pick(collective, algorithm, nbytes)
        if self.group.settings.debug:
            self.log(collective, nbytes, f"{algo} over NCCL point-to-point")
        return algo

    def submit(self, name: str, fn: Callable[..., list], tensors: tuple, async_op: bool,
               algo: str = "auto") -> Work | None:
        """IPC: runs fn(*tensors) on the group's stream in the group's call order, blocking
        the host per phase (async: on the group's worker).  NCCL: enqueues fn's work on the
        group's stream after the caller's and returns an event-backed Work (the stream
        orders it; the tensors are recorded on the stream so the allocator keeps them)."""
        cuda = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda]
        st = self._state(cuda[0].device if cuda else torch.device("cuda"))
        caller = torch.cuda.current_stream(st.device)
        if self._via(algo) == "ipc" or name == "barrier":
            # The caller's work so far is captured now, at call time: an async op runs later
            # on the group's worker, and waiting on the caller's stream then would also wait
            # for (and order against) whatever the caller enqueued in between.
            called = torch.cuda.Event()
            called.record(caller)

            def run(*ts):
                st.stream.wait_event(called)
                with torch.cuda.stream(st.stream):
                    out = fn(*ts)
                for t in ts:
                    if t is not None and t.is_cuda:
                        t.record_stream(st.stream)
                caller.wait_stream(st.stream)
                return out

            return self.group.run(run, async_op, tensors)
        st.stream.wait_stream(caller)
        with torch.cuda.stream(st.stream):
            outputs = fn(*tensors)
        for t in cuda:
            t.record_stream(st.stream)
        event = torch.cuda.Event()
        event.record(st.stream)
        st.seq += 1
        self._watch(st, name, event)
        work = CudaWork(st, event, outputs, tuple(cuda))
        if async_op:
            return work
        work.wait()
        return None

    # ------------------------------------------------------------------ watchdog

    def _watch(self, st: _State, name: str, event: torch.cuda.Event) -> None:
        with st.lock:
            st.pending.append((st.seq, name, event, time.monotonic()))
            if st.watchdog is None:
                st.watchdog = threading.Thread(target=self._watchdog, args=(st,), daemon=True,
                                               name=f"pycomm-g{self.group.gid}-watchdog")
                st.watchdog.start()

    def _watchdog(self, st: _State) -> None:
        while not st.closed and st.error is None:
            with st.lock:
                st.pending = [p for p in st.pending if not p[2].query()]
                oldest = st.pending[0] if st.pending else None
            if oldest is not None and time.monotonic() - oldest[3] > self.timeout:
                seq, name, _, _ = oldest
                missing = diagnose(self.store, self.prefix, self.rank, self.group.ranks, seq,
                                   self.timeout)
                try:
                    if st.nccl is not None:
                        st.nccl.abort()  # releases the kernels stuck waiting for a peer
                finally:
                    who = ", ".join(f"rank {r}" for r in missing) or "no rank identified"
                    st.error = CommTimeoutError(
                        f"pycomm: NCCL {name} #{seq} on group {self.group.gid} did not complete within "
                        f"{self.timeout:.1f} s; ranks that had not reached it (dead or slow): {who}. "
                        "The communicator was aborted: destroy the process group and create a new one.")
                return
            time.sleep(0.01)

    # ------------------------------------------------------------------ primitives

    def _live(self) -> _State:
        """The state submit() made for this call (primitives run inside submit)."""
        st = self.st
        if st is None:
            raise RuntimeError("pycomm: this group's CUDA resources were released; call "
                               "init_process_group again")
        return st

    def _phases(self, st: _State) -> Phases:
        if self.host_barrier is None:
            raise RuntimeError("pycomm: CUDA IPC needs the group on one host")
        return Phases(self.rank, self.size, self.host_barrier, st.stream.synchronize)

    def _run_nccl(self, coll: str, algo: str, out, inp, count: int, op: Op = NONE, root: int = -1):
        st = self._live()
        comm = self._nccl(st)
        dt = DTYPES[inp.dtype]
        nbytes = comm.scratch_bytes(COLLECTIVES[coll], ALGORITHMS[algo], count, dt, root)
        # Allocated on the group's stream (current here): reused in stream order.
        scratch = torch.empty(max(1, nbytes), dtype=torch.uint8, device=inp.device)
        comm.run(COLLECTIVES[coll], ALGORITHMS[algo], out.data_ptr(), inp.data_ptr(), scratch.data_ptr(),
                 count, dt, op.code, root, st.stream.cuda_stream)

    def _table(self, collective, algo, out, inp, count, op=NONE, root=-1, send_counts=(), recv_counts=()):
        self._run_nccl(collective, algo, out, inp, count, op, root)

    def _all_reduce(self, buf, op, algo):
        st = self._live()
        if self._via(algo) == "nccl":
            return self._run_nccl("all_reduce", algo, buf, buf, buf.numel(), op)
        oneshot = buf.numel() * buf.element_size() <= self.group.settings.cuda_oneshot_bytes
        ipc_all_reduce(self._phases(st), self._ipc(st), buf, op.code, st.stream.cuda_stream, oneshot)

    def _reduce_scatter(self, out, inp, op, algo):
        st = self._live()
        if self._via(algo) == "nccl":
            return self._run_nccl("reduce_scatter", algo, out, inp, out.numel(), op)
        ipc_reduce_scatter(self._phases(st), self._ipc(st), out, inp, op.code, st.stream.cuda_stream)

    def _all_gather(self, out, inp, algo):
        st = self._live()
        if self._via(algo) == "nccl":
            return self._run_nccl("all_gather", algo, out, inp, inp.numel())
        ipc_all_gather(self._phases(st), self._ipc(st), out, inp, st.stream.cuda_stream)

    def _broadcast(self, buf, root, algo):
        st = self._live()
        if self._via(algo) == "nccl":
            return self._run_nccl("broadcast", algo, buf, buf, buf.numel(), root=root)
        ipc_broadcast(self._phases(st), self._ipc(st), buf, root, st.stream.cuda_stream)

    def _reduce(self, out, inp, root, op, algo):
        st = self._live()
        if self._via(algo) == "nccl":
            return self._run_nccl("reduce", algo, out, inp, inp.numel(), op, root)
        ipc_reduce(self._phases(st), self._ipc(st), out, inp, root, op.code, st.stream.cuda_stream)

    def _gather(self, out, inp, root, algo):
        st = self._live()
        if self._via(algo) == "nccl":
            return self._run_nccl("gather", algo, inp if out is None else out, inp, inp.numel(), root=root)
        ipc_gather(self._phases(st), self._ipc(st), out, inp, root, st.stream.cuda_stream)

    def _scatter(self, out, inp, root, algo):
        st = self._live()
        if self._via(algo) == "nccl":
            return self._run_nccl("scatter", algo, out, out if inp is None else inp, out.numel(), root=root)
        ipc_scatter(self._phases(st), self._ipc(st), out, inp, root, st.stream.cuda_stream)

    def _all_to_all(self, out, inp, out_counts, in_counts):
        st = self._live()
        es = inp.element_size()
        if self._via("auto") == "nccl":
            self._nccl(st).all_to_all(out.data_ptr(), inp.data_ptr(), [c * es for c in in_counts],
                                      [c * es for c in out_counts], st.stream.cuda_stream)
            return
        # Every rank needs every rank's send counts to find its pieces: one tiny all_gather
        # over the host's shared-memory communicator.
        mine = torch.tensor([c * es for c in in_counts], dtype=torch.int64)
        rows = torch.empty(self.size * self.size, dtype=torch.int64)
        self._host_all_gather(rows, mine)
        matrix = rows.view(self.size, self.size).tolist()
        ipc_all_to_all(self._phases(st), self._ipc(st), out, inp, matrix, st.stream.cuda_stream)

    def _host_all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        cpu = self.group.backends["cpu"]
        cpu._all_gather(out, inp, "ring")

    def _barrier(self) -> None:
        self.group.backends["cpu"]._barrier()

    def _p2p(self, items: list[P2PItem]) -> Work:
        tensors = [t for _, _, t, _ in items]
        if any(peer < 0 for _, peer, _, _ in items):
            raise ValueError("pycomm: a receive from any source needs CPU tensors; NCCL matches "
                             "messages by peer")
        st = self._state(tensors[0].device)
        comm = self._nccl(st)
        if self.group.settings.debug:
            self.log("send/recv", sum(t.numel() * t.element_size() for t in tensors), "NCCL point-to-point")

        def run(*ts):
            comm.p2p([(k, t.data_ptr(), t.numel() * t.element_size(), p)
                      for (k, p, _, _), t in zip(items, ts)], st.stream.cuda_stream)
            return list(ts)

        work = self.submit("send/recv", run, tuple(tensors), True)
        assert work is not None  # async_op=True always returns the Work
        return work

    def close(self) -> None:
        """Releases the group's CUDA resources (destroy_process_group)."""
        st, self.st = self.st, None
        if st is not None:
            release(st, self.timeout)


def _absent(store: dist.Store, keys: dict[str, int]) -> list[int]:
    """The global ranks of ``keys`` (key -> rank) whose key is not in the store."""
    missing = []
    for k, r in keys.items():
        try:
            if not store.check([k]):
                missing.append(r)
        except Exception:  # noqa: BLE001 - an unreachable store names the rank too
            missing.append(r)
    return missing


def wait_ready(comm, timeout: float, missing: Callable[[], list[int]], poll: float = 0.001) -> None:
    """Polls ``comm.ready()`` for at most ``timeout`` seconds; at the deadline aborts and
    closes the communicator and raises CommTimeoutError naming ``missing()``."""
    deadline = time.monotonic() + timeout
    while not comm.ready():
        if time.monotonic() > deadline:
            who = ", ".join(f"rank {r}" for r in missing()) or "no rank identified (all called it)"
            try:
                comm.abort()
                comm.close()
            except CommError:
                pass
            raise CommTimeoutError(
                f"pycomm: NCCL initialisation did not complete within {timeout:.1f} s; ranks that never "
                f"started it: {who}. Check that every rank of the group made the same CUDA call.")
        time.sleep(poll)
        poll = min(2 * poll, 0.05)


def release(st: _State, timeout: float, poll: float = 0.01) -> None:
    """Waits (at most ``timeout`` seconds) for the group's stream, then frees its resources.

    The watchdog keeps running while this waits (``closed`` is set only afterwards), so work
    stuck on a dead peer is aborted by it; if the stream is still busy at the deadline, this
    aborts the NCCL communicator itself.  A blocking synchronise here would hang for ever
    behind NCCL kernels waiting for a peer that died.
    """
    deadline = time.monotonic() + timeout
    try:
        while not st.stream.query() and st.error is None and time.monotonic() < deadline:
            time.sleep(poll)
        idle = st.stream.query()
    except Exception:  # noqa: BLE001 - a failed device must not block the shut-down
        idle = False
    with st.lock:
        st.closed = True
    try:
        if st.nccl is not None and not idle:
            st.nccl.abort()  # its kernels wait for a peer that will not come
    except CommError:
        pass
    for res in (st.nccl, st.ipc):
        if res is not None:
            try:
                res.close()
            except CommError:
                pass


def diagnose(store: dist.Store, prefix: str, rank: int, ranks: tuple[int, ...], seq: int,
             timeout: float) -> list[int]:
    """Global ranks whose own NCCL work has not reached operation #seq (asked via the
    store: each rank's watchdog reports how far it got; a dead rank reports nothing)."""
    store.set(f"{prefix}stuck/{rank}", str(seq))
    time.sleep(min(2.0, timeout / 2))  # let the others' watchdogs fire too
    missing = []
    for r in range(len(ranks)):
        if r == rank:
            continue
        key = f"{prefix}stuck/{r}"
        try:
            theirs = int(store.get(key)) if store.check([key]) else -1
        except Exception:  # noqa: BLE001
            theirs = -1
        if theirs < seq:  # never got stuck (absent or busy) or stuck earlier
            missing.append(ranks[r])
    return missing

