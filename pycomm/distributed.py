"""Process groups: start-up, subgroups and shut-down.

``init_process_group()`` with no arguments uses torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), or, if torch.distributed is already initialised, its rank,
world size and store.  Start-up agrees through a torch.distributed Store on a token, rank 0's
cost model and every rank's host (pycomm._rendezvous).

Every group is built here, once, with its backends (pycomm.backends): shared memory when
its members share a host, the hierarchy (shared memory inside a host, gloo between hosts)
when they do not, and a CUDA backend for CUDA tensors.  The torch.distributed backend
(pycomm.c10d) builds its groups with the same function.

Leaving and shrinking.  A rank that leaves while alive (destroy_process_group, process exit,
torch's abort) says so in its shared memory, so peers that still need it fail at once
instead of waiting out the timeout.  After a failure, ``shrink`` agrees among the survivors
on a new group without the lost ranks (see its docstring for the protocol).
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import secrets
import time
import weakref
from dataclasses import dataclass, field

import torch.distributed as dist

from pycomm import _rendezvous, tuning
from pycomm._settings import MAX_TIMEOUT, Settings, clamp_timeout
from pycomm.backends import Backend
from pycomm.backends.cuda import CudaBackend
from pycomm.backends.hierarchy import HierarchyBackend
from pycomm.backends.shm import ShmBackend
from pycomm.errors import CommError, CommTimeoutError
from pycomm.group import Group

DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)


@dataclass(eq=False)
class Context:
    """What the groups of one start-up share (agreed through the store under `key`)."""

    store: dist.Store
    key: str
    rank: int
    """this process's rank in the start-up's world"""
    size: int
    token: str
    timeout: float
    model: tuning.CostModel
    hosts: tuple[str, ...]
    """host identity of each rank of the world"""
    settings: Settings
    groups: list[Group] = field(default_factory=list)
    next_gid: int = 0

    @classmethod
    def start(cls, store: dist.Store, key: str, rank: int, size: int, timeout: float,
              settings: Settings) -> Context:
        token, model, hosts = _rendezvous.agree(store, key, rank, size, timeout, settings)
        return cls(store, key, rank, size, token, timeout, model, hosts, settings)

    def __post_init__(self):
        _live.add(self)

    def group(self, ranks: tuple[int, ...]) -> Group:
        """Builds the next group over `ranks` (ranks of this world).  Every rank of the world
        calls it, for the same groups in the same order."""
        gid, self.next_gid = self.next_gid, self.next_gid + 1
        return self._build(ranks, gid, f"{self.key}g{gid}/", self.token)

    def _build(self, ranks: tuple[int, ...], gid: int, prefix: str, token: str) -> Group:
        """The group over `ranks`, agreed under store prefix `prefix`, its segments named
        with `token` (a shrunk group keeps its gid under a fresh token and prefix)."""
        g = Group(ranks=ranks, rank=ranks.index(self.rank) if self.rank in ranks else -1, gid=gid,
                  timeout=self.timeout, model=self.model, settings=self.settings,
                  hosts=tuple(self.hosts[r] for r in ranks), key=prefix,
                  host_procs=self.hosts.count(self.hosts[self.rank]))
        self.groups.append(g)
        if g.rank < 0:
            return g
        cpu: Backend
        if len(set(g.hosts)) == 1:
            transport = _rendezvous.shm_transport(self.store, prefix, g.rank, ranks, token,
                                                  self.timeout, f"g{gid}", self.settings, self.model,
                                                  g.host_procs)
            cpu = ShmBackend(g, transport)
            barrier = cpu._barrier
        else:
            cpu = HierarchyBackend(g, self.store, prefix, token)
            barrier = None
        g.backends = {"cpu": cpu, "cuda": CudaBackend(g, self.store, prefix, barrier)}
        if isinstance(cpu, ShmBackend):
            g.native = cpu.native
        return g

    def leave(self, reason: str) -> None:
        """Tells every group's peers that this rank leaves, without waiting for anything
        (process exit, torch's abort); close() releases the resources."""
        for g in self.groups:
            g.leave(reason)

    def close(self, reason: str = "destroy_process_group") -> None:
        _live.discard(self)
        for g in self.groups:
            g.close(reason)


# Every context not yet closed, so that a process that exits without destroying its groups
# still tells its peers (process exit is not a failure they should wait out).
_live: weakref.WeakSet[Context] = weakref.WeakSet()


@atexit.register
def _leave_at_exit() -> None:
    for ctx in list(_live):
        ctx.leave("process exit")


_world: Context | None = None


def is_initialized() -> bool:
    return _world is not None


def _require() -> Context:
    if _world is None:
        raise RuntimeError("pycomm is not initialised: call pycomm.init_process_group() first")
    return _world


def _timeout(timeout, settings: Settings) -> float:
    if timeout is None:
        return settings.timeout if settings.timeout is not None else DEFAULT_TIMEOUT.total_seconds()
    if not isinstance(timeout, datetime.timedelta):
        raise TypeError(f"timeout must be a datetime.timedelta, not {type(timeout).__name__}")
    return clamp_timeout(timeout.total_seconds(), "timeout")


def _int_env(name: str) -> int:
    """RANK or WORLD_SIZE (torchrun's variables), -1 when unset."""
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else -1
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def init_process_group(rank: int | None = None, world_size: int | None = None,
                       init_method: str | None = None,
                       timeout: datetime.timedelta | None = None) -> Group:
    """Starts pycomm on this process and returns the world group.

    rank, world_size: default to $RANK and $WORLD_SIZE (torchrun sets them), or to
    torch.distributed's when it is initialised and nothing else is given.
    init_method: "env://" (default: $MASTER_ADDR, $MASTER_PORT), "tcp://host:port" or
    "file:///path".  timeout: how long any collective (and start-up) may wait for a peer
    before raising CommTimeoutError naming it; default 5 minutes, or $PYCOMM_TIMEOUT seconds.
    The ranks may be on several hosts (torchrun --nnodes N): groups that span hosts use
    shared memory inside each host and gloo between hosts.
    """
    global _world
    if _world is not None:
        raise RuntimeError("pycomm is already initialised; call pycomm.destroy_process_group() first")
    settings = Settings.from_env()
    seconds = _timeout(timeout, settings)
    store_timeout = datetime.timedelta(seconds=min(seconds, MAX_TIMEOUT.total_seconds()))

    if rank is None and world_size is None and init_method is None and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        store = dist.PrefixStore("pycomm-over-torch/", dist.distributed_c10d._get_default_store())
    else:
        if rank is None:
            rank = _int_env("RANK")
        if world_size is None:
            world_size = _int_env("WORLD_SIZE")
        for name, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"pycomm.init_process_group: {name} must be an int, not {value!r}")
        if rank < 0 or world_size < 1:
            raise ValueError(
                "pycomm.init_process_group: pass rank= and world_size=, or set RANK and "
                "WORLD_SIZE (torchrun does)"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        store = _rendezvous.make_store(rank, world_size, init_method, store_timeout)
    store.set_timeout(store_timeout)

    # A store may outlive one pycomm session (torch.distributed's, a reused file): count
    # start-ups so that each gets fresh keys.
    generation = (store.add("pycomm/starts", 1) - 1) // world_size
    ctx = Context.start(store, f"pycomm/{generation}/", rank, world_size, seconds, settings)
    try:
        world = ctx.group(tuple(range(world_size)))
    except BaseException:
        ctx.close()
        raise
    _world = ctx
    return world


def new_group(ranks) -> Group:
    """A group of the given global ranks.  Like torch.distributed.new_group, every rank of
    the world calls it, with the same ranks, in the same order as other new_group calls;
    ranks outside the group get a placeholder whose rank is -1.  A group on one host is
    pure shared memory, whatever the world spans; one across hosts is hierarchical."""
    w = _require()
    try:
        members = sorted(int(r) for r in ranks)
    except TypeError:
        raise TypeError(f"new_group takes an iterable of ranks, not {type(ranks).__name__}") from None
    if not members:
        raise ValueError("new_group needs at least one rank")
    if len(set(members)) != len(members):
        raise ValueError(f"new_group: ranks {members} contain duplicates")
    bad = [r for r in members if not 0 <= r < w.size]
    if bad:
        raise ValueError(f"new_group: ranks {bad} are not in the world of {w.size}")
    return w.group(tuple(members))


def group_or_world(group: Group | None) -> Group:
    """The group to run on; raises if pycomm is not initialised or we are not a member."""
    if group is None:
        return (_world or _require()).groups[0]
    if not isinstance(group, Group):
        raise TypeError(f"group must be a pycomm Group from new_group(), not {type(group).__name__}")
    if group.rank < 0:
        raise ValueError(f"this rank is not a member of group {group.gid} (ranks {list(group.ranks)})")
    return group


def get_rank(group: Group | None = None) -> int:
    """This process's rank in `group` (the world by default); -1 if not a member."""
    w = _require()
    return w.rank if group is None else group.rank


def get_world_size(group: Group | None = None) -> int:
    w = _require()
    return w.size if group is None else group.size


def get_cost_model() -> tuning.CostModel:
    """The cost model every rank of this job uses for algorithm="auto"."""
    return _require().model


def destroy_process_group() -> None:
    """Waits for queued async collectives, then releases every group's resources.  Safe to
    call after a failure and when pycomm was never initialised."""
    global _world
    w, _world = _world, None
    if w is not None:
        w.close()


# ---------------------------------------------------------------------------- shrink


def shrink(group: Group | None = None, exclude=None,
           timeout: datetime.timedelta | None = None) -> Group:
    """After a CommError, a group of the survivors of `group` (default: the world), ranks
    renumbered 0..n-1 in their old order; like NCCL's ncclCommShrink and ULFM's
    MPI_Comm_shrink.  Every survivor calls it; ranks that exited, left the group or are
    stopped by a signal are left out at once, and so are the ranks in `exclude` (ranks of
    `group`).  `timeout` (default: the group's) bounds the wait for the others.

    Protocol, through the rendezvous store under the old group's prefix:

    1. each survivor sets ``shrink/alive/<old rank>``;
    2. it waits until every rank it cannot see gone has done so, or someone has decided, or
       `timeout` passes;
    3. it proposes the members (the ranks that said alive, minus the gone and excluded) and
       a fresh segment token with a compare-and-set on ``shrink/decision``: the first
       proposal wins and every survivor reads that one, so all build the same group even if
       their views differed (a rank that arrives after the decision is told it was left out);
    4. the members build the new group (new shared memory under the new token), and each
       releases the old group (its peers see it leave).

    Shrinking the world replaces it: get_rank and get_world_size follow, every group of the
    old world is released (they were numbered in it), and new_group takes ranks of the new
    world.  The cost model carries over.  A shrunk subgroup keeps its gid.  What a lost rank
    held (optimizer shards, pipeline stages, tensor shards) is gone: data parallelism can go
    on because every replica holds everything (docs/parallel.md).  The store must survive:
    with a TCP store served by rank 0's process (``tcp://``, plain ``env://``) rank 0's
    death takes it along; torchrun's agent store and file stores survive any rank.
    """
    global _world
    w = _require()
    old = group_or_world(group)
    if old.closed:
        raise RuntimeError("pycomm.shrink: this group was destroyed or shrunk already; shrink the "
                           "group that the last shrink returned")
    drop = _exclusions("shrink", exclude, old)
    seconds = old.timeout if timeout is None else _timeout(timeout, w.settings)
    members, token = _agree_survivors(w.store, old, drop, seconds)
    rank = members.index(old.rank)
    retired = list(w.groups) if old is w.groups[0] else [old]
    for g in retired:  # peers still blocked in them (on this rank) fail now, not at their timeout
        g.leave("shrink")
    if old is w.groups[0]:
        ctx = Context(w.store, f"{old.key}shrink/world/", rank, len(members), token, w.timeout,
                      w.model, tuple(w.hosts[r] for r in members), w.settings)
        try:
            new = ctx.group(tuple(range(len(members))))
        except BaseException:
            ctx.close("shrink failed")
            raise
        _world = ctx
        w.close("shrink")
    else:
        new = w._build(tuple(old.ranks[m] for m in members), old.gid, f"{old.key}shrink/group/", token)
        w.groups.remove(old)
        old.close("shrink")
    return new


def _exclusions(fn: str, exclude, g: Group) -> set[int]:
    if exclude is None:
        return set()
    try:
        drop = {int(r) for r in exclude}
    except TypeError:
        raise TypeError(f"pycomm.{fn}: exclude takes an iterable of ranks, not {type(exclude).__name__}") from None
    bad = sorted(r for r in drop if not 0 <= r < g.size)
    if bad:
        raise ValueError(f"pycomm.{fn}: exclude names ranks {bad}, not ranks of the group (0..{g.size - 1})")
    if g.rank in drop:
        raise ValueError(f"pycomm.{fn}: exclude names this rank ({g.rank}); a rank that leaves calls "
                         "destroy_process_group() instead")
    return drop


def _agree_survivors(store: dist.Store, old: Group, drop: set[int], timeout: float) -> tuple[list[int], str]:
    """Steps 1-3 of shrink's protocol: (members as ranks of `old`, the new group's token)."""
    key = f"{old.key}shrink/"
    store.set(f"{key}alive/{old.rank}", "1")
    decision = f"{key}decision"
    deadline = time.monotonic() + timeout
    while True:
        gone = old.gone()
        expected = [r for r in range(old.size) if r not in drop and r not in gone]
        present = [r for r in expected if r == old.rank or store.check([f"{key}alive/{r}"])]
        if len(present) == len(expected) or store.check([decision]) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    proposal = json.dumps({"members": present, "token": secrets.token_hex(8)})
    raw = store.compare_set(decision, "", proposal)
    try:
        agreed = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        members, token = [int(r) for r in agreed["members"]], str(agreed["token"])
        if not _rendezvous.TOKEN_RE.match(token) or sorted(set(members)) != members or \
                any(not 0 <= r < old.size for r in members):
            raise ValueError(agreed)
    except (ValueError, KeyError, TypeError) as e:
        raise CommError(f"pycomm.shrink: the rendezvous store holds {raw[:80]!r} as group {old.gid}'s "
                        "shrink decision, which is not a list of ranks and a token: something other "
                        "than this job wrote it") from e
    if old.rank not in members:
        raise CommTimeoutError(
            f"pycomm.shrink: rank {old.rank} of group {old.gid} was left out: the survivors agreed on "
            f"ranks {members} of the old group without it (a rank that is stopped, or that does not "
            f"arrive within {timeout:.1f} s, is left out). It cannot join them; exit, or start a new job")
    return members, token
