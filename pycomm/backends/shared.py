"""Registered shared-memory buffers: tensors that live in shared memory from the start
(``pycomm.empty``), so that an all-reduce reads the peers' data where it lies instead of
sending it through the transport's slots.

Each rank creates one POSIX shared-memory segment per buffer (``0600``, this user's, a random
name), the group all-gathers the names over the transport, every rank maps every peer's
segment (checked like the transport's: owner, mode, size, no links), and each rank then
unlinks its own name, so nothing is left in ``/dev/shm`` once the buffer exists.  The
mappings live as long as the tensor (and its views).

The all-reduce of a registered buffer, on p ranks (DeepSpeed's and vLLM's shared-memory
all-reduce, reduce-scatter then all-gather, without copies into slots):

1. a small all-reduce over the transport checks that every rank passes the same buffer,
   offset, count, dtype and op (a mismatch raises on every rank) and doubles as the barrier
   after which every rank's data is in place;
2. rank r reduces chunk r of every rank's buffer into its own buffer, in a fixed order of
   ranks, on the transport's reduction threads;
3. a barrier; then every rank copies each peer's reduced chunk out of that peer's buffer;
4. a barrier, so that no rank writes its buffer while a peer still reads it.

Per rank this moves each byte through memory about 2.5 times on 2 ranks, where the slot ring
moves it 4.5 times.  Every chunk is reduced once and copied, so every rank ends with the same
bits.  A peer that dies or stalls is named by the barriers, as by any collective.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import re
import secrets
import stat
import weakref
from typing import TYPE_CHECKING

import torch

from pycomm import _C
from pycomm._codes import DTYPES, OPS, Op
from pycomm.errors import CommError

if TYPE_CHECKING:
    from pycomm.backends.shm import ShmBackend

_DIR = "/dev/shm"
_NAME_BYTES = 64
_NAME = re.compile(r"pycomm-buf-[0-9a-f]{32}")
SHARED_FROM = 64 * 1024
"""smallest all-reduce (bytes) of a registered buffer that takes the shared path: below it
the transport's one- or two-hop algorithms win over three synchronisations"""


class SharedBuffer:
    """One registered buffer: this rank's mapping and every peer's, by group rank."""

    def __init__(self, serial: int, nbytes: int, maps: list[mmap.mmap]):
        self.serial, self.nbytes, self.maps = serial, nbytes, maps
        self.bases = [ctypes.addressof(ctypes.c_char.from_buffer(m)) if nbytes else 0 for m in maps]


def _open_peer(name: str, nbytes: int, rank: int) -> mmap.mmap:
    """Maps peer `rank`'s segment after checking it is this user's, 0600, of the agreed size."""
    if not _NAME.fullmatch(name):
        raise CommError(f"pycomm.empty: rank {rank} sent a segment name of another form ({name[:40]!r})")
    fd = os.open(os.path.join(_DIR, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o777 != 0o600:
            raise CommError(f"pycomm.empty: rank {rank}'s segment {name} is not this user's 0600 file")
        if st.st_size != nbytes:
            raise CommError(f"pycomm.empty: rank {rank}'s segment {name} has {st.st_size} bytes, not {nbytes}")
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def _agree(backend: ShmBackend, values: list[int]) -> tuple[list[int], list[int]]:
    """The smallest and largest of each value over the group's ranks (one max all-reduce of
    the values and their negations): equal when every rank passed the same."""
    both = torch.tensor(values + [-v for v in values], dtype=torch.int64)
    backend._all_reduce(both, OPS["max"], "ring")
    n = len(values)
    return [-v for v in both[n:].tolist()], both[:n].tolist()


def create(backend: ShmBackend, size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor of a new registered buffer (every rank of the group calls it, with the
    same size and dtype, like a collective)."""
    numel = 1
    for s in size:
        numel *= s
    nbytes = max(numel * torch.empty((), dtype=dtype).element_size(), 1)
    name = f"pycomm-buf-{secrets.token_hex(16)}"
    path = os.path.join(_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    maps: list[mmap.mmap] = []
    try:
        try:
            os.ftruncate(fd, nbytes)
            mine = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        # Every rank's name, over the transport (the collective also checks the sizes agree).
        names = torch.zeros(backend.size * _NAME_BYTES, dtype=torch.uint8)
        own = torch.zeros(_NAME_BYTES, dtype=torch.uint8)
        own[:len(name)] = torch.frombuffer(bytearray(name.encode()), dtype=torch.uint8)
        backend._all_gather(names, own, "ring")
        low, high = _agree(backend, [nbytes])
        if low != high:
            raise CommError(f"pycomm.empty: the ranks asked for buffers of different sizes "
                            f"({low[0]} to {high[0]} bytes); call it with the same size and dtype on every rank")
        for r in range(backend.size):
            if r == backend.rank:
                maps.append(mine)
            else:
                raw = bytes(names[r * _NAME_BYTES:(r + 1) * _NAME_BYTES].tolist()).rstrip(b"\0")
                maps.append(_open_peer(raw.decode(errors="replace"), nbytes, r))
        backend._barrier()  # every peer has mapped this rank's segment
    finally:
        os.unlink(path)
    buf = SharedBuffer(backend.next_serial(), nbytes, maps)
    tensor = torch.frombuffer(mine, dtype=dtype, count=numel).view(size) if numel else torch.empty(
        size, dtype=dtype)
    if numel:
        backend.register(buf)
        weakref.finalize(tensor, backend.unregister, buf.bases[backend.rank])
    return tensor


def all_reduce(backend: ShmBackend, buf: SharedBuffer, t: torch.Tensor, op: Op,
               pool: _C.ReducePool) -> None:
    """The all-reduce of `t`, which lies in registered buffer `buf` (see the module docstring)."""
    p, r = backend.size, backend.rank
    esize = t.element_size()
    offset = t.data_ptr() - buf.bases[r]
    count = t.numel()
    dtype = DTYPES[t.dtype]
    # 1. Same call on every rank (as max of x and of -x), and everyone's data in place.
    low, high = _agree(backend, [buf.serial, offset, count, dtype, op.code])
    if low != high:
        raise CommError(
            "pycomm.all_reduce: the ranks passed different registered buffers or parts of them "
            f"(this rank: buffer {buf.serial}, offset {offset} B, {count} elements; across ranks from "
            f"{low} to {high} as [buffer, offset, count, dtype, op]); "
            "every rank must all-reduce the same part of the buffer pycomm.empty gave it")
    per = -(-count // p)
    per = -(-per // 16) * 16  # whole cache lines per chunk, for 4-byte types
    chunks = [(q * per, max(0, min(count, (q + 1) * per) - q * per)) for q in range(p)]
    # 2. Chunk r of every rank's buffer, reduced into this rank's buffer in a fixed order.
    start, n = chunks[r]
    if n:
        dst = buf.bases[r] + offset + start * esize
        for q in [*range(r + 1, p), *range(r)]:
            pool.reduce(dst, dst, buf.bases[q] + offset + start * esize, n, dtype, op.code)
    backend._barrier()
    # 3. Every peer's reduced chunk, out of its buffer.
    for q in range(p):
        start, n = chunks[q]
        if q != r and n:
            ctypes.memmove(buf.bases[r] + offset + start * esize, buf.bases[q] + offset + start * esize,
                           n * esize)
    backend._barrier()
