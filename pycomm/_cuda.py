"""The thin binding around pycomm's CUDA library (csrc/cuda/pycomm_cuda.h).

The library is torch-free and loaded with ctypes; this module turns its return codes into
exceptions and holds the handles.  Tensors, streams and events stay on the torch side
(pycomm/_gpu.py): only data pointers and cudaStream_t values cross.

``status()`` says whether the library was built and whether a GPU can run it, and why
not, for error messages and for tests that skip without CUDA.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading

from pycomm.errors import CommError

_LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pycomm_cuda.so")
NCCL_ID_BYTES, IPC_HANDLE_BYTES, IPC_MAX_RANKS = 128, 64, 8

_P, _S, _I = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
_SIGNATURES = {
    "pycomm_cuda_versions": [ctypes.POINTER(_I)] * 3,
    "pycomm_cuda_device_count": [ctypes.POINTER(_I)],
    "pycomm_cuda_reduce": [_P, _P, _P, _S, _I, _I, _P],
    "pycomm_nccl_unique_id": [ctypes.c_char_p],
    "pycomm_nccl_init": [ctypes.POINTER(_P), _I, _I, _I, ctypes.c_char_p, _S, ctypes.c_double],
    "pycomm_nccl_ready": [_P, ctypes.POINTER(_I)],
    "pycomm_nccl_destroy": [_P],
    "pycomm_nccl_abort": [_P],
    "pycomm_nccl_scratch_bytes": [_P, _I, _I, _S, _I, _I, ctypes.POINTER(_S)],
    "pycomm_nccl_run": [_P, _I, _I, _P, _P, _P, _S, _I, _I, _I, _P],
    "pycomm_nccl_all_to_all": [_P, _P, _P, ctypes.POINTER(_S), ctypes.POINTER(_S), _P],
    "pycomm_nccl_p2p": [_P, _I, ctypes.POINTER(_I), ctypes.POINTER(_P), ctypes.POINTER(_S),
                        ctypes.POINTER(_I), _P],
    "pycomm_ipc_create": [ctypes.POINTER(_P), _I, _S, ctypes.c_char_p],
    "pycomm_ipc_open": [_P, _I, _I, ctypes.c_char_p],
    "pycomm_ipc_destroy": [_P],
    "pycomm_ipc_pointer": [_P, ctypes.POINTER(_P)],
    "pycomm_ipc_put": [_P, _S, _P, _S, _P],
    "pycomm_ipc_get": [_P, _I, _P, _S, _S, _P],
    "pycomm_ipc_reduce": [_P, _P, _S, _S, _I, _I, _P],
}


class CudaUnavailable(CommError):
    """The CUDA transports cannot run here (not built, no driver, or no GPU)."""


@functools.lru_cache(maxsize=1)
def _load():
    if not os.path.exists(_LIB):
        raise CudaUnavailable(
            "pycomm was built without its CUDA transports (no nvcc or NCCL at build time); "
            "install nvcc and `pip install nvidia-nccl-cu12`, then rebuild with PYCOMM_CUDA=1 "
            "(see README: Building with CUDA)")
    lib = ctypes.CDLL(_LIB)
    lib.pycomm_cuda_error.restype = ctypes.c_char_p
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, _I
    return lib


def _call(name: str, *args) -> None:
    lib = _load()
    if getattr(lib, name)(*args) != 0:
        raise CommError(f"pycomm CUDA: {lib.pycomm_cuda_error().decode(errors='replace')}")


def built() -> bool:
    return os.path.exists(_LIB)


def versions() -> dict:
    """{"cuda_runtime": 13000, "cuda_driver": 0 without a driver, "nccl": 23203}"""
    r, d, n = _I(), _I(), _I()
    _call("pycomm_cuda_versions", ctypes.byref(r), ctypes.byref(d), ctypes.byref(n))
    return {"cuda_runtime": r.value, "cuda_driver": d.value, "nccl": n.value}


def status() -> tuple[bool, str]:
    """(usable, why): whether CUDA collectives can run in this process."""
    try:
        v = versions()
    except CudaUnavailable as e:
        return False, str(e)
    if v["cuda_driver"] == 0:
        return False, "no CUDA driver on this machine"
    n = _I()
    try:
        _call("pycomm_cuda_device_count", ctypes.byref(n))
    except CommError as e:
        return False, str(e)
    if n.value == 0:
        return False, "no CUDA device visible"
    return True, f"{n.value} device(s), CUDA runtime {v['cuda_runtime']}, NCCL {v['nccl']}"


def require() -> None:
    ok, why = status()
    if not ok:
        raise CudaUnavailable(f"pycomm: CUDA tensors need the CUDA transports, but {why}")


def reduce(dst: int, a: int, b: int, count: int, dtype: int, op: int, stream: int) -> None:
    _call("pycomm_cuda_reduce", dst, a, b, count, dtype, op, stream)


class NcclComm:
    """A NCCL communicator running pycomm's plans (csrc/cuda/nccl.cu)."""

    @staticmethod
    def unique_id() -> bytes:
        buf = ctypes.create_string_buffer(NCCL_ID_BYTES)
        _call("pycomm_nccl_unique_id", buf)
        return buf.raw

    def __init__(self, device: int, rank: int, size: int, uid: bytes, piece_bytes: int, timeout: float = 0.0):
        """Returns before the peers are connected: poll ready().  ``timeout`` (seconds, 0: none)
        bounds each later call's wait for NCCL to connect to the peers."""
        self._h = _P()
        # abort() (the watchdog's thread) and close() (the caller's) must not both free the handle
        self._lock = threading.Lock()
        _call("pycomm_nccl_init", ctypes.byref(self._h), device, rank, size, uid, piece_bytes, timeout)

    def ready(self) -> bool:
        """True once NCCL's initialisation finished; raises if it failed."""
        done = _I()
        _call("pycomm_nccl_ready", self._h, ctypes.byref(done))
        return bool(done.value)

    def scratch_bytes(self, coll: int, algo: int, count: int, dtype: int, root: int) -> int:
        n = _S()
        _call("pycomm_nccl_scratch_bytes", self._h, coll, algo, count, dtype, root, ctypes.byref(n))
        return n.value

    def run(self, coll, algo, out, inp, scratch, count, dtype, op, root, stream) -> None:
        _call("pycomm_nccl_run", self._h, coll, algo, out, inp, scratch, count, dtype, op, root, stream)

    def all_to_all(self, out: int, inp: int, send_bytes: list[int], recv_bytes: list[int],
                   stream: int) -> None:
        """Bytes to and from each rank, in rank order, as one group."""
        sends, recvs = (_S * len(send_bytes))(*send_bytes), (_S * len(recv_bytes))(*recv_bytes)
        _call("pycomm_nccl_all_to_all", self._h, out, inp, sends, recvs, stream)

    def p2p(self, ops: list[tuple[bool, int, int, int]], stream: int) -> None:
        """ops: (is_send, data_ptr, nbytes, peer), launched as one group."""
        n = len(ops)
        is_send = (_I * n)(*[int(o[0]) for o in ops])
        bufs = (_P * n)(*[o[1] for o in ops])
        nbytes = (_S * n)(*[o[2] for o in ops])
        peers = (_I * n)(*[o[3] for o in ops])
        _call("pycomm_nccl_p2p", self._h, n, is_send, bufs, nbytes, peers, stream)

    def abort(self) -> None:
        with self._lock:
            if self._h:
                _call("pycomm_nccl_abort", self._h)

    def close(self) -> None:
        with self._lock:
            h, self._h = self._h, _P()
        if h:
            _call("pycomm_nccl_destroy", h)


class IpcBuffers:
    """This rank's CUDA IPC buffer, mapped by the other ranks of its host (csrc/cuda/ipc.cu)."""

    def __init__(self, device: int, capacity: int):
        self._h = _P()
        handle = ctypes.create_string_buffer(IPC_HANDLE_BYTES)
        _call("pycomm_ipc_create", ctypes.byref(self._h), device, capacity, handle)
        self.handle, self.capacity = handle.raw, capacity
        mine = _P()
        _call("pycomm_ipc_pointer", self._h, ctypes.byref(mine))
        self.pointer = mine.value  # this rank's own buffer

    def open(self, rank: int, handles: list[bytes]) -> None:
        _call("pycomm_ipc_open", self._h, rank, len(handles), b"".join(handles))

    def put(self, offset: int, src: int, nbytes: int, stream: int) -> None:
        _call("pycomm_ipc_put", self._h, offset, src, nbytes, stream)

    def get(self, peer: int, dst: int, offset: int, nbytes: int, stream: int) -> None:
        _call("pycomm_ipc_get", self._h, peer, dst, offset, nbytes, stream)

    def reduce(self, out: int, offset: int, count: int, dtype: int, op: int, stream: int) -> None:
        _call("pycomm_ipc_reduce", self._h, out, offset, count, dtype, op, stream)

    def close(self) -> None:
        if self._h:
            h, self._h = self._h, _P()
            _call("pycomm_ipc_destroy", h)
