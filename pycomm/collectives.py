"""The collectives and point-to-point operations: pycomm's public API.

Every function checks its arguments, then makes one call: to the backend the group chose
for the tensor's device (pycomm.backends).  A bad argument raises ``ValueError`` or
``TypeError`` saying what to do, before anything is sent: the caller's tensors are untouched
and the group stays usable.  ``algorithm`` is "ring", "tree" or "auto" (the cost model
picks); all_reduce also has "exchange" (recursive doubling: one hop on 2 ranks).
``async_op=True`` returns a :class:`~pycomm.work.Work`; operations of one group run in the
order they were called.

Tensors: contiguous, on the CPU or a CUDA device; float32/64, float16 and bfloat16 (reduced
in float32), int8/16/32/64, uint8, bool, and complex64/128 (as pairs of floats; summed and
averaged).  Results are bitwise identical on every rank.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pycomm import _codes
from pycomm.distributed import group_or_world
from pycomm.group import Group
from pycomm.work import Work

__all__ = [
    "Work", "P2POp", "all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce",
    "gather", "scatter", "all_to_all", "barrier", "send", "recv", "isend", "irecv",
    "batch_isend_irecv",
]

_STRIDED = torch.strided
_ALGORITHMS = ("auto", "ring", "tree")
_ALL_REDUCE_ALGORITHMS = (*_ALGORITHMS, "exchange")


# ---------------------------------------------------------------------------- checks


def _tensor(fn: str, arg: str, t) -> torch.Tensor:
    """t, checked; complex tensors as their real view (pairs of floats)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pycomm.{fn}: {arg} must be a torch.Tensor, not {type(t).__name__}")
    if t.layout is not _STRIDED:
        raise TypeError(f"pycomm.{fn}: {arg} is a {t.layout} tensor; pass a dense one (.to_dense())")
    if not (t.is_cpu or t.is_cuda):
        raise ValueError(
            f"pycomm.{fn}: {arg} is on {t.device}; pycomm moves CPU tensors (shared memory) and "
            "CUDA tensors (CUDA IPC, NCCL): pass t.cpu() or a CUDA tensor")
    if t.is_neg() or t.is_conj():
        # a lazily negated or conjugated view: its memory does not hold the values it shows
        raise ValueError(f"pycomm.{fn}: {arg} is a negated or conjugated view; pass "
                         "t.resolve_neg() / t.resolve_conj() (and copy the result back)")
    if t.dtype not in _codes.DTYPES:
        if t.dtype in _codes.COMPLEX and t.is_contiguous():
            return torch.view_as_real(t)
        raise TypeError(f"pycomm.{fn}: {arg} has dtype {t.dtype}; supported: {_codes.SUPPORTED}")
    if not t.is_contiguous():
        raise ValueError(
            f"pycomm.{fn}: {arg} is not contiguous; pass t.contiguous() (and copy the result "
            "back if you need it in the original tensor)")
    return t


def _like(fn: str, out: torch.Tensor, inp: torch.Tensor) -> None:
    if out.device != inp.device:
        raise ValueError(f"pycomm.{fn}: output is on {out.device} but input is on {inp.device}; "
                         "use one device")
    if out.dtype != inp.dtype:
        raise TypeError(f"pycomm.{fn}: output is {out.dtype} but input is {inp.dtype}; use one dtype")


def _numel(fn: str, arg: str, t: torch.Tensor, want: int, why: str) -> None:
    if t.numel() != want:
        raise ValueError(f"pycomm.{fn}: {arg} has {t.numel()} elements; it needs {want} ({why})")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _algorithm(fn: str, algorithm: str, choices: tuple[str, ...] = _ALGORITHMS) -> str:
    if algorithm not in choices:
        raise ValueError(f"pycomm.{fn}: unknown algorithm {algorithm!r}: use "
                         f"{', '.join(repr(c) for c in choices[1:])} or 'auto'")
    return algorithm


def _rank(fn: str, arg: str, value, g: Group) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < g.size:
        raise ValueError(f"pycomm.{fn}: {arg}={value!r} is not a rank of this group (0..{g.size - 1})")
    return value


# ---------------------------------------------------------------------------- collectives


def empty(*size, dtype: torch.dtype = torch.float32, group: Group | None = None) -> torch.Tensor:
    """A CPU tensor in shared memory that every rank of the group maps (a registered buffer,
    like the buckets DDP all-reduces every step): its all-reduces (algorithm="auto", from
    64 KiB) read the peers' data where it lies instead of sending it through the transport.
    Every rank calls it with the same size and dtype, like a collective.  Where the group's
    transport has no such buffers (a group across hosts), a plain tensor."""
    g = group_or_world(group)
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = tuple(size[0])
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in size):
        raise TypeError(f"pycomm.empty: size must be non-negative ints, like torch.empty's, not {size!r}")
    if dtype not in _codes.DTYPES and dtype not in _codes.HALF:
        raise TypeError(f"pycomm.empty: dtype {dtype} is not one pycomm moves; use one of {_codes.SUPPORTED}")
    return g.backends["cpu"].empty(tuple(size), dtype)


def all_reduce(tensor: torch.Tensor, op="sum", algorithm: str = "auto", group: Group | None = None,
               async_op: bool = False):
    """Reduces `tensor` across the group, in place, on every rank."""
    g = group_or_world(group)
    native = g.native
    if native is not None and not async_op and native(tensor, op, algorithm):
        return None  # the common case, run without Python (csrc/torch/native.h)
    t = _tensor("all_reduce", "tensor", tensor)
    o = _codes.reduce_op("all_reduce", op, tensor.dtype)
    return g.backend(t).all_reduce(t, o, _algorithm("all_reduce", algorithm, _ALL_REDUCE_ALGORITHMS), async_op)


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, op="sum", algorithm: str = "auto",
                   group: Group | None = None, async_op: bool = False):
    """output = the reduction over ranks of chunk `rank` of `input`, where input holds
    world_size chunks of output.numel() elements.  output may be input's own chunk."""
    g = group_or_world(group)
    out, inp = _tensor("reduce_scatter", "output", output), _tensor("reduce_scatter", "input", input)
    _like("reduce_scatter", out, inp)
    _numel("reduce_scatter", "input", inp, g.size * out.numel(),
           f"world_size ({g.size}) x output.numel() ({out.numel()})")
    n = out.numel()
    in_place = n > 0 and out.data_ptr() == inp.data_ptr() + g.rank * n * inp.element_size()
    if _overlap(out, inp) and not in_place:
        raise ValueError("pycomm.reduce_scatter: output overlaps input; pass separate tensors, or "
                         "input[rank * n:(rank + 1) * n] as output for an in-place call")
    o = _codes.reduce_op("reduce_scatter", op, input.dtype)
    return g.backend(inp).reduce_scatter(out, inp, o, _algorithm("reduce_scatter", algorithm), async_op)


def all_gather(output: torch.Tensor, input: torch.Tensor, algorithm: str = "auto",
               group: Group | None = None, async_op: bool = False):
    """output = every rank's input, concatenated in rank order (output.numel() ==
    world_size * input.numel()).  input may be output's own chunk."""
    g = group_or_world(group)
    out, inp = _tensor("all_gather", "output", output), _tensor("all_gather", "input", input)
    _like("all_gather", out, inp)
    _numel("all_gather", "output", out, g.size * inp.numel(),
           f"world_size ({g.size}) x input.numel() ({inp.numel()})")
    n = inp.numel()
    in_place = n > 0 and inp.data_ptr() == out.data_ptr() + g.rank * n * out.element_size()
    if _overlap(out, inp) and not in_place:
        raise ValueError("pycomm.all_gather: input overlaps output; pass separate tensors, or "
                         "output[rank * n:(rank + 1) * n] as input for an in-place call")
    return g.backend(inp).all_gather(out, inp, _algorithm("all_gather", algorithm), async_op)


def broadcast(tensor: torch.Tensor, src: int, group: Group | None = None, async_op: bool = False,
              algorithm: str = "auto"):
    """Copies `tensor` from group rank `src` to every rank, in place."""
    g = group_or_world(group)
    t = _tensor("broadcast", "tensor", tensor)
    root = _rank("broadcast", "src", src, g)
    return g.backend(t).broadcast(t, root, _algorithm("broadcast", algorithm), async_op)


def reduce(tensor: torch.Tensor, dst: int, op="sum", algorithm: str = "auto",
           group: Group | None = None, async_op: bool = False):
    """Reduces `tensor` across the group into `tensor` on group rank `dst`; the other ranks'
    tensors are left as they were."""
    g = group_or_world(group)
    t = _tensor("reduce", "tensor", tensor)
    root = _rank("reduce", "dst", dst, g)
    o = _codes.reduce_op("reduce", op, tensor.dtype)
    return g.backend(t).reduce(t, root, o, _algorithm("reduce", algorithm), async_op)


def gather(output: torch.Tensor | None, input: torch.Tensor, dst: int, group: Group | None = None,
           async_op: bool = False, algorithm: str = "auto"):
    """On group rank `dst`, output = every rank's input in rank order (output.numel() ==
    world_size * input.numel()); on the other ranks output is not used (may be None)."""
    g = group_or_world(group)
    inp = _tensor("gather", "input", input)
    root = _rank("gather", "dst", dst, g)
    out = None
    if g.rank == root:
        if output is None:
            raise ValueError("pycomm.gather: on the dst rank, output must be a tensor of "
                             "world_size x input.numel() elements, not None")
        out = _tensor("gather", "output", output)
        _like("gather", out, inp)
        _numel("gather", "output", out, g.size * inp.numel(),
               f"world_size ({g.size}) x input.numel() ({inp.numel()})")
        if _overlap(out, inp):
            raise ValueError("pycomm.gather: input overlaps output; pass separate tensors")
    return g.backend(inp).gather(out, inp, root, _algorithm("gather", algorithm), async_op)


def scatter(output: torch.Tensor, input: torch.Tensor | None, src: int, group: Group | None = None,
            async_op: bool = False, algorithm: str = "auto"):
    """output = block `rank` of group rank `src`'s input, which holds world_size blocks of
    output.numel() elements; on the other ranks input is not used (may be None)."""
    g = group_or_world(group)
    out = _tensor("scatter", "output", output)
    root = _rank("scatter", "src", src, g)
    inp = None
    if g.rank == root:
        if input is None:
            raise ValueError("pycomm.scatter: on the src rank, input must be a tensor of "
                             "world_size x output.numel() elements, not None")
        inp = _tensor("scatter", "input", input)
        _like("scatter", out, inp)
        _numel("scatter", "input", inp, g.size * out.numel(),
               f"world_size ({g.size}) x output.numel() ({out.numel()})")
        if _overlap(out, inp):
            raise ValueError("pycomm.scatter: output overlaps input; pass separate tensors")
    return g.backend(out).scatter(out, inp, root, _algorithm("scatter", algorithm), async_op)


def _splits(fn: str, arg: str, splits, t: torch.Tensor, g: Group) -> list[int]:
    """Element counts per rank (of dim 0 slices, as torch's split sizes) for all_to_all."""
    row = t.numel() // t.shape[0] if t.dim() and t.shape[0] else (1 if t.dim() else t.numel())
    if splits is None:
        if t.dim() == 0 or t.shape[0] % g.size:
            raise ValueError(f"pycomm.all_to_all: {arg.split('_')[0]} has {t.shape[0] if t.dim() else 0} "
                             f"rows, not divisible into {g.size} equal blocks; pass {arg}")
        return [t.shape[0] // g.size * row] * g.size
    try:
        sizes = [int(s) for s in splits]
    except (TypeError, ValueError):
        raise TypeError(f"pycomm.{fn}: {arg} must be a list of {g.size} ints, not {splits!r}") from None
    if len(sizes) != g.size or any(s < 0 for s in sizes):
        raise ValueError(f"pycomm.{fn}: {arg} must be {g.size} non-negative sizes, one per rank, "
                         f"not {list(splits)}")
    rows = t.shape[0] if t.dim() else 0
    if sum(sizes) != rows:
        raise ValueError(f"pycomm.{fn}: {arg} sums to {sum(sizes)} but the tensor has {rows} rows")
    return [s * row for s in sizes]


def all_to_all(output: torch.Tensor, input: torch.Tensor, output_split_sizes: Sequence[int] | None = None,
               input_split_sizes: Sequence[int] | None = None, group: Group | None = None,
               async_op: bool = False):
    """torch.distributed.all_to_all_single: rank r sends the j-th block of its input (along
    dim 0; input_split_sizes[j] rows, or equal blocks) to rank j, which stores it as its r-th
    block of output (output_split_sizes[r] rows).  Uneven and empty blocks are fine (the
    token exchange of a mixture-of-experts layer)."""
    g = group_or_world(group)
    out, inp = _tensor("all_to_all", "output", output), _tensor("all_to_all", "input", input)
    _like("all_to_all", out, inp)
    if _overlap(out, inp):
        raise ValueError("pycomm.all_to_all: output overlaps input; pass separate tensors")
    if out.dim() != inp.dim() or out.shape[1:] != inp.shape[1:]:
        raise ValueError(f"pycomm.all_to_all: output {tuple(out.shape)} and input {tuple(inp.shape)} "
                         "must have the same shape after dim 0")
    in_counts = _splits("all_to_all", "input_split_sizes", input_split_sizes, inp, g)
    out_counts = _splits("all_to_all", "output_split_sizes", output_split_sizes, out, g)
    return g.backend(inp).all_to_all(out, inp, out_counts, in_counts, async_op)


def barrier(group: Group | None = None) -> None:
    """Returns once every rank of the group has entered the barrier."""
    g = group_or_world(group)
    g.backends["cpu"].barrier()


# ---------------------------------------------------------------------------- point-to-point


@dataclass
class P2POp:
    """One send or receive for batch_isend_irecv: op is pycomm.isend or pycomm.irecv
    (or the strings "send"/"recv"); peer is a rank of `group` (None for a receive from
    any source); messages match by (peer, tag)."""

    op: object
    tensor: torch.Tensor
    peer: int | None
    group: Group | None = None
    tag: int = 0


def _p2p(ops: list[P2POp], async_op: bool):
    if not ops:
        raise ValueError("batch_isend_irecv needs at least one P2POp")
    g = group_or_world(ops[0].group)
    if any(group_or_world(o.group) is not g for o in ops):
        raise ValueError("batch_isend_irecv: all ops must use the same group")
    items = []
    for o in ops:
        kind = {isend: True, send: True, "send": True, irecv: False, recv: False, "recv": False}.get(o.op)
        if kind is None:
            raise ValueError(f"P2POp.op must be pycomm.isend or pycomm.irecv, not {o.op!r}")
        fn = "send" if kind else "recv"
        t = _tensor(fn, "tensor", o.tensor)
        if isinstance(o.tag, bool) or not isinstance(o.tag, int) or not 0 <= o.tag < 2 ** 31:
            raise ValueError(f"pycomm.{fn}: tag must be an int in [0, 2**31), not {o.tag!r}")
        peer = o.peer
        if peer is None and not kind:
            peer = -1  # any source
        elif isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < g.size or peer == g.rank:
            raise ValueError(f"pycomm.{fn}: peer {peer!r} must be another rank of the group "
                             f"(0..{g.size - 1}, not this rank {g.rank})")
        items.append((kind, peer, t, o.tag))
    if len({t.is_cuda for _, _, t, _ in items}) > 1:
        raise ValueError("batch_isend_irecv: mix of CPU and CUDA tensors; use one device per batch")
    return g.backend(items[0][2]).p2p(items, async_op)


def send(tensor: torch.Tensor, dst: int, group: Group | None = None, tag: int = 0) -> None:
    """Sends `tensor` to group rank `dst` with `tag`; returns once `tensor` may be reused
    (MPI's standard mode, as gloo and NCCL): a message that fits in the transport's free
    slots (on shared memory 4 x 256 KiB per peer by default) is copied there and it returns
    before the peer has posted its receive; of a larger one, the peer's progress (a
    receive, a wait or any collective it is in) must first take the bytes that did not
    fit.  The receive must have the same size."""
    _p2p([P2POp("send", tensor, dst, group, tag)], False)


def recv(tensor: torch.Tensor, src: int | None = None, group: Group | None = None, tag: int = 0) -> int:
    """Receives into `tensor` the earliest message with `tag` from group rank `src`, or from
    any rank (src=None); returns the sender's rank.  The message must have tensor's size in
    bytes (CommMismatchError otherwise)."""
    work = _p2p([P2POp("recv", tensor, src, group, tag)], True)
    work.wait()
    return work.source_rank if src is None else src


def isend(tensor: torch.Tensor, dst: int, group: Group | None = None, tag: int = 0) -> Work:
    """Posts a send (see send) and returns its Work at once; the message moves whenever this
    rank calls into the group.  The Work may be dropped: pycomm keeps `tensor` alive until
    the message has left it."""
    return _p2p([P2POp("send", tensor, dst, group, tag)], True)


def irecv(tensor: torch.Tensor, src: int | None = None, group: Group | None = None, tag: int = 0) -> Work:
    """Posts a receive (see recv) and returns its Work at once; for src=None the Work's
    `source_rank` is the sender's group rank once it has completed.  The Work may be dropped:
    pycomm keeps `tensor` alive until the message is in it."""
    return _p2p([P2POp("recv", tensor, src, group, tag)], True)


def batch_isend_irecv(ops: list[P2POp]) -> list[Work]:
    """Posts the sends and receives together; returns one Work per op, all completing
    together.  (Every isend/irecv is posted at once too, so any order of posted messages
    between neighbours is deadlock-free; batching only saves waits.)"""
    work = _p2p(list(ops), True)
    return [work] * len(ops)
