"""The CUDA IPC collectives' phases (pycomm/backends/cuda.py), run on CPU processes.

The IPC transport is three parts: mapped buffers and a reduction kernel (csrc/cuda/ipc.cu,
which needs a GPU), and the orchestration in pycomm.backends.cuda that stages inputs, places slices,
splits messages into chunks and separates the phases with host barriers.  Here the first
part is replaced by shared memory between the rank processes with the same interface
(put/get/reduce on raw addresses, the reduction in rank order with float32 accumulation for
half types), so the orchestration runs for real on the CPU: exact results, one-shot and
two-shot, chunked messages, bitwise-identical ranks, and the phases' barriers (a rank that
reads a buffer before its owner staged it would get zeros and fail).  The NCCL watchdog's
diagnosis (which ranks never reached a collective) is store traffic only, checked here too.
"""
import ctypes
import os
from multiprocessing import shared_memory

import pytest
import torch
import world

import pycomm
from pycomm import _codes
from pycomm.backends import cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]


class SharedBuffers:
    """pycomm._cuda.IpcBuffers' interface over POSIX shared memory."""

    def __init__(self, g, capacity, tag):
        self.capacity = capacity
        name = f"pycomm-test-ipc-{os.getppid()}-{tag}-r{g.rank}"
        self._mine = shared_memory.SharedMemory(name=name, create=True, size=capacity)
        ctypes.memset(self._addr(self._mine), 0, capacity)
        pycomm.barrier(g)
        self._peers = [self._mine if r == g.rank else
                       shared_memory.SharedMemory(name=name.rsplit("-r", 1)[0] + f"-r{r}")
                       for r in range(g.size)]
        pycomm.barrier(g)
        self._mine.unlink()  # everyone has mapped it: nothing is left in /dev/shm
        self.pointer = self._addr(self._mine)

    @staticmethod
    def _addr(shm):
        return ctypes.addressof(ctypes.c_char.from_buffer(shm.buf))

    def _view(self, addr, count, dtype):
        nbytes = count * torch.tensor([], dtype=dtype).element_size()
        return torch.frombuffer((ctypes.c_char * nbytes).from_address(addr), dtype=dtype) if nbytes else \
            torch.empty(0, dtype=dtype)

    def put(self, offset, src, nbytes, stream):
        assert offset + nbytes <= self.capacity
        ctypes.memmove(self.pointer + offset, src, nbytes)

    def get(self, peer, dst, offset, nbytes, stream):
        assert offset + nbytes <= self.capacity
        ctypes.memmove(dst, self._addr(self._peers[peer]) + offset, nbytes)

    def reduce(self, out, offset, count, dtype_code, op_code, stream):
        dtype = next(d for d, c in _codes.DTYPES.items() if c == dtype_code)
        acc_type = torch.float32 if dtype in _codes.HALF else dtype
        acc = None
        for shm in self._peers:  # rank order, as the kernel
            v = self._view(self._addr(shm) + offset, count, dtype).to(acc_type)
            if acc is None:
                acc = v.clone()
            elif op_code in (0, 5):  # sum, avg
                acc += v
            elif op_code == 1:
                acc *= v
            elif op_code == 2:
                acc = torch.minimum(acc, v)
            else:
                acc = torch.maximum(acc, v)
        self._view(out, count, dtype).copy_(acc.to(dtype))

    def close(self):
        for shm in self._peers:
            shm.close()


def _input(rank, count, dtype, salt=0):
    i = torch.arange(count, dtype=torch.int64)
    return ((i * 7 + rank * 3 + salt) % 17 - (0 if dtype == torch.uint8 else 8)).to(dtype)


def job_ipc_collectives(capacity, oneshot_bytes, counts):
    g = pycomm.distributed.group_or_world(None)
    r, p = g.rank, g.size
    ph = cuda.Phases(r, p, g.backends["cpu"]._barrier, lambda: None)
    buf = SharedBuffers(g, capacity, f"{capacity}-{oneshot_bytes}")
    SUM, MAX = _codes.OPS["sum"].code, _codes.OPS["max"].code
    bad, bits = [], []
    try:
        for dtype in DTYPES:
            for n in counts:
                t = _input(r, n, dtype)
                oneshot = n * t.element_size() <= oneshot_bytes
                cuda.ipc_all_reduce(ph, buf, t, SUM, 0, oneshot)
                want = sum(_input(q, n, dtype).double() for q in range(p))
                if not torch.equal(t, (want if n else torch.zeros(0)).to(dtype)):
                    bad.append(("all_reduce", str(dtype), n))
                bits.append(t.view(torch.uint8).sum().item() if n else 0)

                inp = torch.cat([_input(r, n, dtype, salt=b) for b in range(p)])
                out = torch.empty(n, dtype=dtype)
                cuda.ipc_reduce_scatter(ph, buf, out, inp, MAX, 0)
                want = torch.stack([torch.cat([_input(q, n, dtype, salt=b) for b in range(p)])
                                    for q in range(p)]).max(0).values[r * n:(r + 1) * n]
                if not torch.equal(out, want):
                    bad.append(("reduce_scatter", str(dtype), n))
                # in place: the output is the input's own chunk
                cuda.ipc_reduce_scatter(ph, buf, inp[r * n:(r + 1) * n], inp, MAX, 0)
                if not torch.equal(inp[r * n:(r + 1) * n], want):
                    bad.append(("reduce_scatter in place", str(dtype), n))

                gathered = torch.empty(p * n, dtype=dtype)
                cuda.ipc_all_gather(ph, buf, gathered, _input(r, n, dtype), 0)
                everyone = torch.cat([_input(q, n, dtype) for q in range(p)])
                if not torch.equal(gathered, everyone):
                    bad.append(("all_gather", str(dtype), n))

                b = _input(r, n, dtype)
                cuda.ipc_broadcast(ph, buf, b, p - 1, 0)
                if not torch.equal(b, _input(p - 1, n, dtype)):
                    bad.append(("broadcast", str(dtype), n))

                root = n % p
                red = torch.zeros(n, dtype=dtype)
                cuda.ipc_reduce(ph, buf, red, _input(r, n, dtype), root, SUM, 0)
                if r == root and not torch.equal(red, sum(_input(q, n, dtype).double()
                                                          for q in range(p)).to(dtype)):
                    bad.append(("reduce", str(dtype), n))

                gat = torch.zeros(p * n, dtype=dtype) if r == root else None
                cuda.ipc_gather(ph, buf, gat, _input(r, n, dtype), root, 0)
                if r == root and not torch.equal(gat, everyone):
                    bad.append(("gather", str(dtype), n))

                sc = torch.zeros(n, dtype=dtype)
                cuda.ipc_scatter(ph, buf, sc, everyone if r == root else None, root, 0)
                if not torch.equal(sc, _input(r, n, dtype)):
                    bad.append(("scatter", str(dtype), n))

                # uneven all_to_all: rank j sends (j + k + n) % 3 elements to rank k
                es = torch.tensor([], dtype=dtype).element_size()
                sends = [[(j + k + n) % 3 for k in range(p)] for j in range(p)]
                a_in = torch.cat([_input(r * p + k, sends[r][k], dtype) for k in range(p)])
                a_out = torch.zeros(sum(sends[j][r] for j in range(p)), dtype=dtype)
                cuda.ipc_all_to_all(ph, buf, a_out, a_in, [[c * es for c in row] for row in sends], 0)
                want = torch.cat([_input(j * p + r, sends[j][r], dtype) for j in range(p)])
                if not torch.equal(a_out, want):
                    bad.append(("all_to_all", str(dtype), n))
    finally:
        buf.close()
    return bad, bits


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("oneshot", [1 << 30, 0], ids=["one-shot", "two-shot"])
def test_ipc_phases_compute_exact_results(run, size, oneshot):
    # 256 bytes per phase: most messages go in several chunks
    results = run(size, job_ipc_collectives, 512, oneshot, [0, 1, 7, 33, 1000])
    assert all(not bad for bad, _ in results), results
    assert len({tuple(bits) for _, bits in results}) == 1  # bitwise identical
    assert not [s for s in world.segments() if "pycomm-test-ipc" in s]


def job_diagnose(absent):
    """Every rank but `absent` has its NCCL watchdog fire on collective #5 (rank 0 on #4):
    the diagnosis must name the absent rank and rank 0, which is stuck earlier."""
    g = pycomm.distributed.group_or_world(None)
    if g.rank == absent:
        return None
    store = pycomm.distributed._require().store
    return cuda.diagnose(store, f"pycomm/test-diagnose-{os.getppid()}-{absent}/", g.rank, g.ranks,
                         4 if g.rank == 0 else 5, 4.0)


def test_watchdog_names_the_ranks_that_never_reached_the_collective(run):
    out = run(3, job_diagnose, 2)
    assert out[1] == [0, 2], out  # rank 0 is stuck at #4, rank 2 never reported
    assert out[0] == [2], out      # from rank 0's side (#4) only the absent rank is missing


@pytest.mark.parametrize("setting, algorithm, one_host, size, want", [
    ("auto", "auto", True, 4, "ipc"),       # one host: CUDA IPC
    ("auto", "ring", True, 4, "nccl"),      # an explicit plan runs over NCCL
    ("auto", "auto", False, 4, "nccl"),     # across hosts
    ("auto", "auto", True, 9, "nccl"),      # more ranks than the IPC kernel reads
    ("nccl", "auto", True, 2, "nccl"),
    ("ipc", "tree", True, 2, "ipc"),
])
def test_cuda_transport_choice(setting, algorithm, one_host, size, want):
    assert cuda.choose_transport(setting, one_host, size, algorithm) == want


def test_cuda_transport_errors_say_what_to_use(monkeypatch):
    with pytest.raises(ValueError, match="use nccl"):
        cuda.choose_transport("ipc", False, 4)
    monkeypatch.setenv("PYCOMM_CUDA_TRANSPORT", "shm")
    with pytest.raises(ValueError, match="auto, ipc, nccl"):
        pycomm._settings.Settings.from_env()
