"""Groups that span hosts: shared memory inside a host, gloo between hosts.

pycomm.distributed builds a group here (``connect``) when its members are on more than one
host (host identity: the boot id, or $PYCOMM_HOST_ID); pycomm.collectives sends every
operation on such a group here, after checking its arguments.  Groups on one host never come
here and create no gloo group.

Shape of a group over H hosts.  Hosts are ordered by their lowest group rank; a member's
*local index* is its position among the members on its host, in group-rank order.  When
every host has the same number L of members, each member gets

- ``local``: a pycomm communicator over the L members on its host (shared memory, store
  prefix ``<group>/h<host>/``, segment label ``g<gid>h<host>``), when L > 1;
- ``cross``: a gloo group over the H members with its local index, one per host, in host
  order (prefix ``<group>/x<local index>/``); when L == 1 this is ``whole``;
- ``whole``: a gloo group over the whole group, in group-rank order (prefix
  ``<group>/gloo/``).

With unequal counts per host only ``whole`` is built.  ``<group>`` is the group's key in the
world store, ``pycomm/<generation>/g<gid>/``.  The gloo groups are
``torch.distributed.ProcessGroupGloo`` objects built straight from the store:
torch.distributed need not be initialised.  Every gloo group has the group's timeout.

all_reduce, L ranks on each of H hosts, n elements:

1. reduce_scatter over shm among the L local ranks: local index i ends with shard i of
   ceil(n / L) elements (the buffer is padded to L shards);
2. all_reduce of shard i over gloo among the H ranks of local index i;
3. all_gather over shm among the L local ranks.

Only n / L elements per rank cross hosts, and each host sends them on L connections at once.
Per rank the cost is the local ring or tree reduce-scatter and all-gather on n elements over L
ranks (pycomm's algorithms, chosen by the cost model for L ranks as on one host, or by
``algorithm=``/$PYCOMM_ALGO) plus gloo's all-reduce of n / L elements over H ranks.  Results
are bitwise identical on every rank: each shard is reduced on one host by one rank, reduced
across hosts by gloo (whose result is the same on its ranks) and copied unchanged.  float16
and bfloat16 are reduced in float32, as on one host; avg is a sum divided by the group size.
L == 1 is the gloo step alone.  Unequal counts per host fall back to one gloo all-reduce over
``whole``.

reduce_scatter, all_gather, broadcast, barrier and point-to-point run over ``whole`` (gloo),
correct but not hierarchical.  Point-to-point messages are bytes, as on shared memory;
``send`` returns once gloo has sent the message.

Failures.  A failing stage raises CommError (CommTimeoutError for a time-out) naming the
operation, the stage, the transport and the global ranks involved.  The rank then tells its
peers, as the shared-memory transport does: it aborts its local communicator (its host's
ranks stop at once) and releases its gloo groups (their peers on other hosts see the
connection close at once).  After a failure the group is unusable; later calls say so.
"""
from __future__ import annotations

import concurrent.futures
import datetime
import os
import threading
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pycomm import _C, _types
from pycomm.distributed import Group, _shm_transport, _wait_keys
from pycomm.errors import CommError, CommTimeoutError

_DEBUG = os.environ.get("PYCOMM_DEBUG", "").upper() in ("INFO", "DEBUG")

_GLOO_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "prod": dist.ReduceOp.PRODUCT,
             "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


@dataclass(eq=False)
class Hierarchy:
    """One member's view of a group across hosts (see the module docstring)."""

    gid: int
    ranks: tuple[int, ...]
    """global ranks of the group's members, in group-rank order"""
    rank: int
    """this process's group rank"""
    host_members: tuple[tuple[int, ...], ...]
    """group ranks on each host, hosts in order of their lowest group rank"""
    host_names: tuple[str, ...]
    host: int
    """this rank's host index"""
    local_index: int
    """this rank's position among its host's members"""
    per_host: int | None
    """L when every host has L members, else None (no hierarchical all-reduce)"""
    timeout: float
    local: _C.Communicator | None = field(default=None, repr=False)
    cross: dist.ProcessGroupGloo | None = field(default=None, repr=False)
    whole: dist.ProcessGroupGloo | None = field(default=None, repr=False)
    failed: str | None = None
    """why the group failed: it cannot be used again"""
    released: bool = False
    _transport: _C.ShmTransport | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def num_hosts(self) -> int:
        return len(self.host_members)

    def global_ranks(self, group_ranks) -> list[int]:
        return [self.ranks[r] for r in group_ranks]

    def cross_members(self) -> tuple[int, ...]:
        """Group ranks of the cross-host gloo group of this rank's local index."""
        return tuple(m[self.local_index] for m in self.host_members)

    def release(self) -> None:
        """Drops the communicators: the gloo groups close their connections."""
        with self._lock:
            self.local = self.cross = self.whole = None
            self._transport = None
            self.released = True

    def check(self) -> None:
        if self.released and self.failed is None:
            raise RuntimeError("pycomm: this group was destroyed; call init_process_group again")
        if self.failed is not None:
            raise CommError("pycomm: this group failed earlier and cannot be used again "
                            "(destroy it and create a new one): " + self.failed)

    def fail(self, exc_type: type, msg: str) -> CommError:
        """Records the failure, tells the peers (see the module docstring), returns the error."""
        with self._lock:
            if self.failed is None:
                self.failed = msg
            if self._transport is not None:
                self._transport.abort(msg)
            # Dropping the last reference closes the gloo connections, so peers on other
            # hosts waiting for this rank fail now instead of at their time-out.
            self.cross = self.whole = None
        return exc_type(msg)

    def shm_stage(self, what: str, fn):
        """Runs fn(local communicator); a CommError gets the stage and the global ranks."""
        self.check()
        try:
            return fn(self.local)
        except CommError as e:
            members = self.global_ranks(self.host_members[self.host])
            where = ", ".join(f"{i} = rank {r}" for i, r in enumerate(members))
            msg = (f"pycomm: group {self.gid} across hosts, {what} over shared memory among "
                   f"global ranks {members} on host {self.host_names[self.host]} failed on rank "
                   f"{self.ranks[self.rank]}: {e} [ranks in that message are local: {where}]")
            raise self.fail(type(e), msg) from e

    def _gloo_group(self, which: str) -> dist.ProcessGroupGloo:
        pg = getattr(self, which)
        if pg is None:  # released by a failure (maybe on another thread) or by destroy
            self.check()
        return pg

    def gloo_stage(self, what: str, which: str, fn, wait: bool = True):
        """Runs fn(gloo group `which`: "cross" or "whole"), which returns a gloo Work, and
        waits for it (wait=False: returns it, posted).  A gloo error or time-out becomes
        CommError / CommTimeoutError naming the stage and the global ranks."""
        try:
            # No local name here holds the gloo group: fail() must drop its last reference.
            work = fn(self._gloo_group(which))
            if wait:
                work.wait()
            return work
        except RuntimeError as e:
            traceback.clear_frames(e.__traceback__)  # fn's frame holds the gloo group
            self.check()  # failed meanwhile (another thread), or destroyed
            members = self.global_ranks(self.cross_members() if which == "cross"
                                        else range(len(self.ranks)))
            timed_out = "timed out" in str(e).lower() or "timeout" in str(e).lower()
            how = f"timed out after {self.timeout:.1f} s" if timed_out else "failed"
            msg = (f"pycomm: group {self.gid} across hosts, {what} over gloo among global ranks "
                   f"{members} {how} on rank {self.ranks[self.rank]}: {e}")
            raise self.fail(CommTimeoutError if timed_out else CommError, msg) from None


# ---------------------------------------------------------------------------- building


def _layout(hosts: tuple[str, ...]) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """Group ranks on each host, and the hosts' names, hosts ordered by lowest group rank."""
    order: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        order.setdefault(h, []).append(r)
    return tuple(tuple(m) for m in order.values()), tuple(h.split("/")[0] for h in order)


def _gloo(store: dist.Store, prefix: str, rank: int, size: int, timeout: float) -> dist.ProcessGroupGloo:
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size,
                                 datetime.timedelta(seconds=timeout))


def connect(store: dist.Store, prefix: str, group: Group, hosts: tuple[str, ...],
            token: str) -> Hierarchy:
    """Builds this member's side of `group`, whose members are on hosts `hosts` (by group
    rank).  Every member calls it, with the group's store prefix."""
    members, names = _layout(hosts)
    host = next(i for i, m in enumerate(members) if group.rank in m)
    sizes = {len(m) for m in members}
    h = Hierarchy(gid=group.gid, ranks=group.ranks, rank=group.rank, host_members=members,
                  host_names=names, host=host, local_index=members[host].index(group.rank),
                  per_host=sizes.pop() if len(sizes) == 1 else None, timeout=group.timeout)
    # Everyone arrives before the gloo groups connect, so a missing rank is named here
    # rather than in a store time-out.
    store.set(f"{prefix}joined/{group.rank}", "1")
    _wait_keys(store, {f"{prefix}joined/{r}": group.ranks[r] for r in range(group.size)},
               group.timeout, f"join group {group.gid} (across hosts)")
    try:
        if h.per_host is not None and h.per_host > 1:
            h._transport = _shm_transport(
                store, f"{prefix}h{host}/", h.local_index, tuple(h.global_ranks(members[host])),
                token, group.timeout, f"g{group.gid}h{host}")
            h.local = _C.Communicator(h._transport)
            h.cross = _gloo(store, f"{prefix}x{h.local_index}/", host, h.num_hosts, group.timeout)
        h.whole = _gloo(store, f"{prefix}gloo/", group.rank, group.size, group.timeout)
        if h.per_host == 1:
            h.cross = h.whole  # one rank per host: the same ranks in the same order
    except CommError:
        h.release()
        raise
    except RuntimeError as e:
        h.release()
        raise CommError(f"pycomm: could not connect group {group.gid} across hosts "
                        f"(global ranks {list(group.ranks)}) over gloo: {e}") from e
    return h


# ---------------------------------------------------------------------------- helpers


def _log(g: Group, collective: str, nbytes: int, how: str) -> None:
    if _DEBUG:
        print(f"pycomm: {collective} of {nbytes} B on group {g.gid} (rank {g.rank}/{g.size}): {how}",
              flush=True)


def _local_algorithm(g: Group, collective: str, algorithm: str, nbytes: int) -> str:
    """The algorithm of a shared-memory stage: as on one host, for the L local ranks."""
    if algorithm != "auto":
        return algorithm
    return g.model.pick(collective, nbytes, g._hier.per_host)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions run in: float32 for half types (as on one host)."""
    return torch.float32 if dtype in _types.HALF_TYPES else dtype


def _gloo_opts(cls, op: str):
    opts = cls()
    opts.reduceOp = _GLOO_OPS[op]
    return opts


# ---------------------------------------------------------------------------- collectives


def all_reduce(g: Group, tensor: torch.Tensor, op: str, algorithm: str, async_op: bool):
    """pycomm.all_reduce on a group across hosts (arguments already checked)."""
    h = g._hier
    n = tensor.numel()
    nbytes = n * tensor.element_size()
    L = h.per_host
    if L is None:
        counts = ", ".join(str(len(m)) for m in h.host_members)
        _log(g, "all_reduce", nbytes,
             f"over gloo ({h.num_hosts} hosts with {counts} ranks: unequal, so not hierarchical)")
        return g._run(lambda: _flat_all_reduce(h, tensor, op), async_op)
    acc = _acc(tensor.dtype)
    shard = -(-n // L)
    bytes_ = L * shard * acc.itemsize
    if L == 1:
        rs_algo = ag_algo = None
        _log(g, "all_reduce", nbytes, f"hierarchical: all_reduce over gloo ({h.num_hosts} hosts, 1 rank each)")
    else:
        rs_algo = _local_algorithm(g, "reduce_scatter", algorithm, bytes_)
        ag_algo = _local_algorithm(g, "all_gather", algorithm, bytes_)
        _log(g, "all_reduce", nbytes,
             f"hierarchical: reduce_scatter {rs_algo} over shm ({L} ranks) + all_reduce over gloo "
             f"({h.num_hosts} hosts) + all_gather {ag_algo} over shm")

    def run():
        flat = tensor.view(-1)
        if acc == tensor.dtype and L * shard == n:
            buf = flat  # reduce in place: no copy
        else:
            buf = torch.empty(L * shard, dtype=acc)
            buf[:n].copy_(flat)
            buf[n:].zero_()
        mine = buf[h.local_index * shard:(h.local_index + 1) * shard]
        code = _types.DTYPE_CODES[acc]
        if L > 1:
            h.shm_stage("all_reduce stage 1/3 (reduce_scatter)", lambda c: c.reduce_scatter(
                mine.data_ptr(), buf.data_ptr(), shard, code, _types.OPS[op],
                _types.ALGORITHMS[rs_algo], g.timeout))
        stage = "all_reduce stage 2/3 (all_reduce of this rank's shard)" if L > 1 else "all_reduce"
        h.gloo_stage(stage, "cross", lambda pg: pg.allreduce([mine], _gloo_opts(dist.AllreduceOptions, op)))
        if op == "avg":
            mine.div_(g.size)  # once per element, by the shard's owner: identical on every rank
        if L > 1:
            h.shm_stage("all_reduce stage 3/3 (all_gather)", lambda c: c.all_gather(
                buf.data_ptr(), mine.data_ptr(), shard, code, _types.ALGORITHMS[ag_algo], g.timeout))
        if buf is not flat:
            flat.copy_(buf[:n])
        return tensor

    return g._run(run, async_op)


def _flat_all_reduce(h: Hierarchy, tensor: torch.Tensor, op: str) -> torch.Tensor:
    flat = tensor.view(-1)
    buf = flat.to(_acc(tensor.dtype))
    h.gloo_stage("all_reduce", "whole", lambda pg: pg.allreduce([buf], _gloo_opts(dist.AllreduceOptions, op)))
    if op == "avg":
        buf.div_(len(h.ranks))
    if buf is not flat:
        flat.copy_(buf)
    return tensor


def reduce_scatter(g: Group, output: torch.Tensor, input: torch.Tensor, op: str, async_op: bool):
    """pycomm.reduce_scatter on a group across hosts: one gloo reduce-scatter."""
    h = g._hier
    _log(g, "reduce_scatter", input.numel() * input.element_size(), f"over gloo ({h.num_hosts} hosts)")

    def run():
        acc = _acc(input.dtype)
        src = input.view(-1).to(acc)
        # gloo may write its output while it still reads its input: never let them overlap.
        dst = torch.empty(output.numel(), dtype=acc)
        h.gloo_stage("reduce_scatter", "whole", lambda pg: pg._reduce_scatter_base(
            dst, src, _gloo_opts(dist.ReduceScatterOptions, op)))
        if op == "avg":
            dst.div_(g.size)
        output.view(-1).copy_(dst)
        return output

    return g._run(run, async_op)


def all_gather(g: Group, output: torch.Tensor, input: torch.Tensor, async_op: bool):
    """pycomm.all_gather on a group across hosts: one gloo all-gather."""
    h = g._hier
    _log(g, "all_gather", output.numel() * output.element_size(), f"over gloo ({h.num_hosts} hosts)")

    def run():
        src = input.reshape(-1).clone()  # input may be output's own chunk
        h.gloo_stage("all_gather", "whole", lambda pg: pg._allgather_base(output.view(-1), src))
        return output

    return g._run(run, async_op)


def broadcast(g: Group, tensor: torch.Tensor, src: int, async_op: bool):
    """pycomm.broadcast on a group across hosts: one gloo broadcast."""
    h = g._hier
    _log(g, "broadcast", tensor.numel() * tensor.element_size(), f"over gloo ({h.num_hosts} hosts)")

    def run():
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        h.gloo_stage("broadcast", "whole", lambda pg: pg.broadcast([tensor.view(-1)], opts))
        return tensor

    return g._run(run, async_op)


def barrier(g: Group) -> None:
    """pycomm.barrier on a group across hosts: gloo's barrier."""
    h = g._hier

    def run():
        h.gloo_stage("barrier", "whole", lambda pg: pg.barrier())

    g._run(run, False)


# ---------------------------------------------------------------------------- point-to-point


def p2p(g: Group, items: list[tuple[bool, int, torch.Tensor]], async_op: bool):
    """pycomm's send/recv/isend/irecv/batch_isend_irecv on a group across hosts: gloo
    messages between group ranks, posted now in the given order (so, as on shared memory,
    messages between two ranks match in posting order).  items: (is_send, peer, tensor)."""
    h = g._hier
    tensors = [t for _, _, t in items]
    works = []
    for is_send, peer, t in items:
        data = t.view(-1).view(torch.uint8)  # bytes, like the shared-memory messages
        if is_send:
            works.append(h.gloo_stage(_p2p_what(g, True, peer), "whole",
                                      lambda pg: pg.send([data], peer, 0), wait=False))
        else:
            works.append(h.gloo_stage(_p2p_what(g, False, peer), "whole",
                                      lambda pg: pg.recv([data], peer, 0), wait=False))

    def wait_all():
        for (is_send, peer, _), w in zip(items, works):
            h.gloo_stage(_p2p_what(g, is_send, peer), "whole", lambda _: w)
        return tensors

    if not async_op:
        wait_all()
        return None
    from pycomm.collectives import Work  # imports this module

    future = concurrent.futures.Future()

    def drive():
        try:
            future.set_result(wait_all())
        except BaseException as e:  # noqa: BLE001 - delivered by Work.wait()
            future.set_exception(e)

    threading.Thread(target=drive, daemon=True, name=f"pycomm-g{g.gid}-p2p").start()
    return Work(future)


def _p2p_what(g: Group, is_send: bool, peer: int) -> str:
    return f"send to global rank {g.ranks[peer]}" if is_send else f"recv from global rank {g.ranks[peer]}"
