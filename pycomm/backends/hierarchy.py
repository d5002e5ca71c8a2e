"""HierarchyBackend: CPU tensors of a group whose members are on several hosts.

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
world store.  The gloo groups are ``torch.distributed.ProcessGroupGloo`` objects built
straight from the store: torch.distributed need not be initialised.  Every gloo group has
the group's timeout.

all_reduce, L ranks on each of H hosts, n elements:

1. reduce_scatter over shm among the L local ranks: local index i ends with shard i of
   ceil(n / L) elements (the buffer is padded to L shards);
2. all_reduce of shard i over gloo among the H ranks of local index i;
3. all_gather over shm among the L local ranks.

Only n / L elements per rank cross hosts, and each host sends them on L connections at once.
The shared-memory stages use pycomm's algorithms, chosen by the cost model for L ranks (or
by ``algorithm=``/$PYCOMM_ALGO).  Results are bitwise identical on every rank: each shard is
reduced on one host by one rank, reduced across hosts by gloo (whose result is the same on
its ranks) and copied unchanged.  L == 1 is the gloo step alone; unequal counts per host fall
back to one gloo all-reduce over ``whole``.

The other collectives and point-to-point (with tags, and receives from any source) run over
``whole``: correct, not hierarchical.

Failures.  A failing stage raises CommError (CommTimeoutError for a time-out) naming the
operation, the stage, the transport and the global ranks involved.  The rank then tells its
peers, as the shared-memory transport does: it aborts its local communicator (its host's
ranks stop at once) and releases its gloo groups (their peers on other hosts see the
connection close at once).  After a failure the group is unusable; later calls say so.
"""
from __future__ import annotations

import concurrent.futures
import datetime
import threading
import traceback

import torch
import torch.distributed as dist

from pycomm import _C, _rendezvous
from pycomm._codes import ALGORITHMS, COLLECTIVES, DTYPES, Op
from pycomm.backends import Backend, P2PItem
from pycomm.errors import CommError, CommTimeoutError
from pycomm.work import Work

_GLOO_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "prod": dist.ReduceOp.PRODUCT,
             "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "band": dist.ReduceOp.BAND,
             "bor": dist.ReduceOp.BOR, "bxor": dist.ReduceOp.BXOR}


def _layout(hosts: tuple[str, ...]) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """Group ranks on each host, and the hosts' names, hosts ordered by lowest group rank."""
    order: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        order.setdefault(h, []).append(r)
    return tuple(tuple(m) for m in order.values()), tuple(h.split("/")[0] for h in order)


def _gloo(store: dist.Store, prefix: str, rank: int, size: int, timeout: float) -> dist.ProcessGroupGloo:
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size,
                                 datetime.timedelta(seconds=timeout))


def _opts(cls, **fields):
    opts = cls()
    for k, v in fields.items():
        setattr(opts, k, v)
    return opts


class HierarchyBackend(Backend):
    name = "gloo"
    inline = True

    def __init__(self, group, store: dist.Store, prefix: str, token: str):
        """Builds this member's side of `group` (whose `hosts` span several hosts); every
        member calls it with the group's store prefix."""
        super().__init__(group)
        self.ranks = group.ranks
        self.host_members, self.host_names = _layout(group.hosts)
        self.host = next(i for i, m in enumerate(self.host_members) if group.rank in m)
        self.local_index = self.host_members[self.host].index(group.rank)
        sizes = {len(m) for m in self.host_members}
        self.per_host: int | None = sizes.pop() if len(sizes) == 1 else None
        """L when every host has L members, else None (no hierarchical all-reduce)"""
        self.local: _C.Communicator | None = None
        self.cross: dist.ProcessGroupGloo | None = None
        self.whole: dist.ProcessGroupGloo | None = None
        self.failed: str | None = None
        """why the group failed: it cannot be used again"""
        self.released = False
        self._transport: _C.ShmTransport | None = None
        self._lock = threading.Lock()
        # Everyone arrives before the gloo groups connect, so a missing rank is named here
        # rather than in a store time-out.
        store.set(f"{prefix}joined/{group.rank}", "1")
        _rendezvous.wait_keys(store, {f"{prefix}joined/{r}": group.ranks[r] for r in range(group.size)},
                              group.timeout, f"join group {group.gid} (across hosts)")
        try:
            if self.per_host is not None and self.per_host > 1:
                members = self.host_members[self.host]
                self._transport = _rendezvous.shm_transport(
                    store, f"{prefix}h{self.host}/", self.local_index,
                    tuple(self.global_ranks(members)), token, group.timeout,
                    f"g{group.gid}h{self.host}", group.settings, group.model, group.host_procs)
                self.local = _C.Communicator(self._transport)
                self.cross = _gloo(store, f"{prefix}x{self.local_index}/", self.host, self.num_hosts,
                                   group.timeout)
            self.whole = _gloo(store, f"{prefix}gloo/", group.rank, group.size, group.timeout)
            if self.per_host == 1:
                self.cross = self.whole  # one rank per host: the same ranks in the same order
        except CommError:
            self.close()
            raise
        except RuntimeError as e:
            self.close()
            raise CommError(f"pycomm: could not connect group {group.gid} across hosts "
                            f"(global ranks {list(group.ranks)}) over gloo: {e}") from e

    @property
    def num_hosts(self) -> int:
        return len(self.host_members)

    def global_ranks(self, group_ranks) -> list[int]:
        return [self.ranks[r] for r in group_ranks]

    def cross_members(self) -> tuple[int, ...]:
        """Group ranks of the cross-host gloo group of this rank's local index."""
        return tuple(m[self.local_index] for m in self.host_members)

    def leave(self, reason: str) -> None:
        # Across hosts the closing gloo connections tell the peers; on this host, the flag.
        t = self._transport
        if t is not None:
            t.leave(reason)

    def gone(self) -> dict[int, str]:
        """Only this host's members can be seen (pids); ranks on other hosts are found by
        pycomm.shrink's bounded wait."""
        t = self._transport
        if t is None:
            return {}
        members = self.host_members[self.host]
        return {members[r]: f"global rank {self.ranks[members[r]]}: {why}" for r, why in t.gone()}

    def close(self) -> None:
        """Drops the communicators: the gloo groups close their connections."""
        with self._lock:
            self.local = self.cross = self.whole = None
            self._transport = None
            self.released = True

    # ------------------------------------------------------------------ failures

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
            msg = (f"pycomm: group {self.group.gid} across hosts, {what} over shared memory among "
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
            msg = (f"pycomm: group {self.group.gid} across hosts, {what} over gloo among global "
                   f"ranks {members} {how} on rank {self.ranks[self.rank]}: {e}")
            raise self.fail(CommTimeoutError if timed_out else CommError, msg) from None

    # ------------------------------------------------------------------ policy hooks

    def pick(self, collective: str, algorithm: str, nbytes: int) -> str:
        # The shared-memory stages choose for the L local ranks (all_reduce, below); the
        # rest is gloo's.
        if self.group.settings.debug and collective != "all_reduce":
            self.log(collective, nbytes, f"over gloo ({self.num_hosts} hosts)")
        return algorithm

    # ------------------------------------------------------------------ collectives

    def _all_reduce(self, buf: torch.Tensor, op: Op, algorithm: str) -> None:
        n, L = buf.numel(), self.per_host
        if L is None:
            counts = ", ".join(str(len(m)) for m in self.host_members)
            self._debug(buf, f"over gloo ({self.num_hosts} hosts with {counts} ranks: unequal, so "
                             "not hierarchical)")
            self.gloo_stage("all_reduce", "whole",
                            lambda pg: pg.allreduce([buf.view(-1)], _opts(dist.AllreduceOptions,
                                                                           reduceOp=_GLOO_OPS[op.name])))
            return
        shard = -(-n // L)
        if L * shard == n:
            work = buf.view(-1)  # reduce in place: no copy
        else:
            work = torch.empty(L * shard, dtype=buf.dtype)
            work[:n].copy_(buf.view(-1))
            work[n:].zero_()
        mine = work[self.local_index * shard:(self.local_index + 1) * shard]
        nbytes = work.numel() * work.element_size()
        if L == 1:
            self._debug(buf, f"hierarchical: all_reduce over gloo ({self.num_hosts} hosts, 1 rank each)")
        else:
            # The stages are a reduce_scatter and an all_gather, which have no exchange.
            stages = "auto" if algorithm == "exchange" else algorithm
            rs = self.group.pick("reduce_scatter", stages, nbytes, L)
            ag = self.group.pick("all_gather", stages, nbytes, L)
            self._debug(buf, f"hierarchical: reduce_scatter {rs} over shm ({L} ranks) + all_reduce "
                             f"over gloo ({self.num_hosts} hosts) + all_gather {ag} over shm")
            dt = DTYPES[work.dtype]
            self.shm_stage("all_reduce stage 1/3 (reduce_scatter)", lambda c: c.collective(
                COLLECTIVES["reduce_scatter"], ALGORITHMS[rs], mine.data_ptr(), work.data_ptr(), shard,
                dt, op.code, -1, self.timeout))
        stage = "all_reduce stage 2/3 (all_reduce of this rank's shard)" if L > 1 else "all_reduce"
        self.gloo_stage(stage, "cross", lambda pg: pg.allreduce(
            [mine], _opts(dist.AllreduceOptions, reduceOp=_GLOO_OPS[op.name])))
        if L > 1:
            self.shm_stage("all_reduce stage 3/3 (all_gather)", lambda c: c.collective(
                COLLECTIVES["all_gather"], ALGORITHMS[ag], work.data_ptr(), mine.data_ptr(), shard,
                DTYPES[work.dtype], 0, -1, self.timeout))
        if work.data_ptr() != buf.data_ptr():
            buf.view(-1).copy_(work[:n])

    def _debug(self, buf: torch.Tensor, how: str) -> None:
        if self.group.settings.debug:
            self.log("all_reduce", buf.numel() * buf.element_size(), how)

    def _reduce_scatter(self, out, inp, op, algo):
        in_place = out.data_ptr() == inp.data_ptr() + self.rank * out.numel() * out.element_size()
        src = inp.reshape(-1).clone() if in_place else inp.reshape(-1)
        # gloo may write its output while it still reads its input: never let them overlap.
        dst = torch.empty(out.numel(), dtype=out.dtype)
        self.gloo_stage("reduce_scatter", "whole", lambda pg: pg._reduce_scatter_base(
            dst, src, _opts(dist.ReduceScatterOptions, reduceOp=_GLOO_OPS[op.name])))
        out.view(-1).copy_(dst)

    def _all_gather(self, out, inp, algo):
        src = inp.reshape(-1).clone()  # inp may be out's own chunk
        self.gloo_stage("all_gather", "whole", lambda pg: pg._allgather_base(out.view(-1), src))

    def _broadcast(self, buf, root, algo):
        self.gloo_stage("broadcast", "whole", lambda pg: pg.broadcast(
            [buf.view(-1)], _opts(dist.BroadcastOptions, rootRank=root, rootTensor=0)))

    def _reduce(self, out, inp, root, op, algo):
        # gloo reduces in place on every rank: only the root's result may land in `out`.
        buf = out if self.rank == root else inp.clone()
        if buf.data_ptr() != inp.data_ptr():
            buf.copy_(inp)
        self.gloo_stage("reduce", "whole", lambda pg: pg.reduce(
            [buf.view(-1)], _opts(dist.ReduceOptions, rootRank=root, rootTensor=0,
                                  reduceOp=_GLOO_OPS[op.name])))

    def _gather(self, out, inp, root, algo):
        n = inp.numel()
        outs = [[out.view(-1)[r * n:(r + 1) * n] for r in range(self.size)]] if out is not None else []
        self.gloo_stage("gather", "whole", lambda pg: pg.gather(
            outs, [inp.view(-1)], _opts(dist.GatherOptions, rootRank=root)))

    def _scatter(self, out, inp, root, algo):
        n = out.numel()
        ins = [[inp.view(-1)[r * n:(r + 1) * n] for r in range(self.size)]] if inp is not None else []
        self.gloo_stage("scatter", "whole", lambda pg: pg.scatter(
            [out.view(-1)], ins, _opts(dist.ScatterOptions, rootRank=root)))

    def _all_to_all(self, out, inp, out_counts, in_counts):
        self.gloo_stage("all_to_all", "whole", lambda pg: pg.alltoall_base(
            out.view(-1), inp.view(-1), out_counts, in_counts, dist.AllToAllOptions()))

    def _barrier(self) -> None:
        self.gloo_stage("barrier", "whole", lambda pg: pg.barrier())

    # ------------------------------------------------------------------ point-to-point

    def _p2p(self, items: list[P2PItem]) -> Work:
        """gloo messages between group ranks, posted now in the given order, with their tags
        (peer -1: a receive from any source)."""
        works = []
        for is_send, peer, t, tag in items:
            data = t.view(-1).view(torch.uint8)  # bytes, like the shared-memory messages
            what = self._p2p_what(is_send, peer)
            if is_send:
                works.append(self.gloo_stage(what, "whole", lambda pg: pg.send([data], peer, tag), wait=False))
            elif peer < 0:
                works.append(self.gloo_stage(what, "whole", lambda pg: pg.recv_anysource([data], tag),
                                             wait=False))
            else:
                works.append(self.gloo_stage(what, "whole", lambda pg: pg.recv([data], peer, tag), wait=False))
        tensors = [t for _, _, t, _ in items]
        future: concurrent.futures.Future = concurrent.futures.Future()
        result = Work(future, tuple(tensors))

        def drive():
            try:
                for (is_send, peer, _, _), w in zip(items, works):
                    self.gloo_stage(self._p2p_what(is_send, peer), "whole", lambda _: w)
                    if not is_send and peer < 0:
                        result.source_rank = w._source_rank()
                future.set_result(tensors)
            except BaseException as e:  # noqa: BLE001 - delivered by Work.wait()
                future.set_exception(e)

        threading.Thread(target=drive, daemon=True, name=f"pycomm-g{self.group.gid}-p2p").start()
        return result

    def _p2p_what(self, is_send: bool, peer: int) -> str:
        if peer < 0:
            return "recv from any rank"
        return f"send to global rank {self.ranks[peer]}" if is_send else f"recv from global rank {self.ranks[peer]}"
