"""Process groups: start-up, subgroups and shut-down.

A group is a set of ranks with its own communicator (pycomm._C.Communicator) over its own
shared-memory segments.  A group whose ranks are on several hosts (host identity: the boot
id, or $PYCOMM_HOST_ID) is built by pycomm._hierarchy instead: shared memory among the
members on each host, gloo between hosts.  Start-up goes through a torch.distributed Store:

1. rank 0 of the job draws a random token; every segment name contains it, the group id
   and the rank, so two groups or two jobs on one host never collide;
2. each rank creates its segment (mode 0600) under a name every rank derives from the
   token, the group and the rank, and everyone maps everyone's, refusing a segment that is
   not the job user's own with mode 0600 (a name is never read from the store, which other
   local users may be able to write);
3. once all have mapped, each rank removes its segment's name, so nothing is left in
   /dev/shm even if a process is killed later.  A name left by a process killed during
   step 2 is removed by the next start-up on that host (see _reap_stale_segments).

``init_process_group()`` with no arguments uses torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), or, if torch.distributed is already initialised, its rank,
world size and store.
"""
from __future__ import annotations

import concurrent.futures
import datetime
import os
import re
import secrets
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.distributed as dist

from pycomm import _C, tuning
from pycomm.errors import CommError, CommTimeoutError

if TYPE_CHECKING:
    from pycomm import _hierarchy

DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)
_SEGMENT_RE = re.compile(r"^pycomm-[0-9a-f]{16}-[a-z0-9]+-r\d+$")
_TOKEN_RE = re.compile(r"^[0-9a-f]{16}$")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ValueError(f"{name}={os.environ[name]!r} is not an integer") from None


@dataclass(eq=False)
class Group:
    """A group of ranks.  Members run collectives on it; other ranks hold a placeholder
    (``rank == -1``) so that every rank can call ``new_group`` with the same arguments."""

    ranks: tuple[int, ...]
    """global ranks of the members, in group-rank order"""
    rank: int
    """this process's rank in the group, -1 if it is not a member"""
    gid: int
    timeout: float
    """seconds any one collective may wait for a peer"""
    model: tuning.CostModel
    _comm: _C.Communicator | None = field(default=None, repr=False)
    """the shared-memory communicator of a group on one host (None across hosts)"""
    _hier: "_hierarchy.Hierarchy | None" = field(default=None, repr=False)
    """a group across hosts: its per-host communicator and gloo groups (pycomm._hierarchy)"""
    _gpu: object = field(default=None, repr=False)
    """CUDA resources, made by the group's first collective on CUDA tensors (pycomm._gpu)"""
    _executor: concurrent.futures.ThreadPoolExecutor | None = field(default=None, repr=False)
    _last: concurrent.futures.Future | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def _run(self, fn, async_op: bool):
        """Runs fn() now (async_op=False) or on the group's worker thread, in call order."""
        from pycomm.collectives import Work

        with self._lock:
            if self._comm is None and self._hier is None:
                raise RuntimeError("pycomm: this group was destroyed; call init_process_group again")
            if async_op:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        max_workers=1, thread_name_prefix=f"pycomm-g{self.gid}"
                    )
                self._last = self._executor.submit(fn)
                return Work(self._last)
            pending = self._last
        if pending is not None:
            # Collectives must run in the order they were called: let queued async ones
            # finish (their errors belong to their own Work.wait()).
            concurrent.futures.wait([pending])
        fn()
        return None

    def _shutdown(self):
        with self._lock:
            ex, self._executor = self._executor, None
            self._comm = None
            hier, self._hier = self._hier, None
        if ex is not None:
            ex.shutdown(wait=True)
        if self._gpu is not None:
            from pycomm import _gpu

            _gpu.close(self)
        if hier is not None:
            hier.release()


@dataclass
class _World:
    store: dist.Store
    rank: int
    size: int
    generation: int
    token: str
    timeout: float
    model: tuning.CostModel
    hosts: tuple[str, ...]
    """host identity of each global rank"""
    world: Group | None = None
    groups: list[Group] = field(default_factory=list)
    next_gid: int = 0


_world: _World | None = None


def is_initialized() -> bool:
    return _world is not None


def _require() -> _World:
    if _world is None:
        raise RuntimeError("pycomm is not initialised: call pycomm.init_process_group() first")
    return _world


def _make_store(rank: int, world_size: int, init_method: str | None, timeout: datetime.timedelta):
    if init_method is None or init_method == "env://":
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port:
            raise ValueError(
                "pycomm.init_process_group: no init_method and MASTER_ADDR/MASTER_PORT are not "
                "set; run under torchrun, or pass init_method='tcp://host:port' or 'file:///path'"
            )
        # torchrun's agent already serves the store on MASTER_PORT: connect as clients.
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        return dist.TCPStore(addr, int(port), world_size, rank == 0 and not agent, timeout=timeout)
    url = urllib.parse.urlparse(init_method)
    if url.scheme == "tcp":
        if not url.hostname or not url.port:
            raise ValueError(f"init_method {init_method!r} needs a host and a port: 'tcp://host:port'")
        return dist.TCPStore(url.hostname, url.port, world_size, rank == 0, timeout=timeout)
    if url.scheme == "file":
        path = urllib.parse.unquote(url.path)
        if not path:
            raise ValueError(f"init_method {init_method!r} needs a path: 'file:///path/to/file'")
        _private_file(path, init_method)
        store = dist.FileStore(path, world_size)
        store.set_timeout(timeout)
        return store
    raise ValueError(f"init_method {init_method!r}: use 'env://', 'tcp://host:port' or 'file:///path'")


def _private_file(path: str, init_method: str) -> None:
    """Creates the file store's file readable by this user only (torch would create it 0644,
    letting any local user read the job's token), or checks that an existing one is ours
    and private.  A missing folder is an error now, not a wait for the timeout."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"init_method {init_method!r}: the folder {folder} does not exist; "
                         "create it first or pass a path in an existing folder")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:  # removed between the two calls (a finished job): retry
            return _private_file(path, init_method)
        except OSError as e:
            raise ValueError(f"init_method {init_method!r}: cannot open {path}: {e}") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PermissionError(
                f"init_method {init_method!r}: {path} is owned by uid {st.st_uid} with mode "
                f"{st.st_mode & 0o777:04o}; pycomm's file store must belong to this user "
                f"(uid {os.geteuid()}) with mode 0600, or other local users could read or write "
                "the job's rendezvous. Remove it, or use a path in a folder only you can write"
            ) from None
    except OSError as e:
        raise ValueError(f"init_method {init_method!r}: cannot create {path}: {e}") from None
    else:
        os.close(fd)


def _host_identity() -> str:
    """Ranks share memory only if they share a kernel: the boot id says so, the hostname
    makes messages readable.  PYCOMM_HOST_ID overrides both (tests of multi-host code)."""
    if os.environ.get("PYCOMM_HOST_ID"):
        return os.environ["PYCOMM_HOST_ID"]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def _reap_stale_segments() -> None:
    """Removes /dev/shm names left by pycomm processes that died during start-up (after
    start-up no names exist).  Only our own user's, only of processes that are gone (the
    pid and start time in the segment's header say so)."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for name in names:
        if _SEGMENT_RE.match(name):
            _C.ShmTransport.reap_if_stale("/" + name)


def _segment_name(token: str, label: str, rank: int) -> str:
    """Where rank `rank` of the group labelled `label` keeps its segment.  Every rank derives
    every name itself: a name read back from the store could be another user's."""
    return f"/pycomm-{token}-{label}-r{rank}"


def _wait_keys(store: dist.Store, keys: dict[str, int], timeout: float, what: str) -> None:
    """store.wait, but a time-out names the ranks that never arrived."""
    try:
        store.wait(list(keys), datetime.timedelta(seconds=timeout))
    except Exception as e:  # noqa: BLE001 - stores raise several types on time-out
        missing = []
        for k, r in keys.items():
            try:
                if not store.check([k]):
                    missing.append(r)
            except Exception:  # noqa: BLE001
                missing.append(r)
        who = ", ".join(f"rank {r}" for r in missing) or "some rank"
        raise CommTimeoutError(
            f"pycomm: timed out after {timeout:.1f} s waiting for {who} to {what}"
        ) from e


def _shm_transport(store: dist.Store, prefix: str, rank: int, ranks: tuple[int, ...], token: str,
                   timeout: float, label: str) -> _C.ShmTransport:
    """The shared-memory set-up of one group (see the module docstring); every member
    calls it with the same prefix, token and label.  `ranks` (global ranks) name peers in
    errors."""
    size = len(ranks)
    names = [_segment_name(token, label, r) for r in range(size)]
    name = names[rank]
    transport = _C.ShmTransport(
        rank, size, name,
        slot_bytes=_env_int("PYCOMM_SHM_SLOT_BYTES", 256 * 1024),
        slots=_env_int("PYCOMM_SHM_SLOTS", 4),
        lanes=3,  # two for the double binary tree, one for point-to-point messages
    )
    try:
        store.set(f"{prefix}created/{rank}", "1")
        _wait_keys(store, {f"{prefix}created/{r}": ranks[r] for r in range(size)}, timeout,
                   f"join group {label}")
        transport.attach(names, timeout)
        store.set(f"{prefix}attached/{rank}", "1")
        _wait_keys(store, {f"{prefix}attached/{r}": ranks[r] for r in range(size)}, timeout,
                   f"map group {label}'s shared memory")
    finally:
        transport.unlink()  # mapped by everyone, or failed: either way the name goes
    return transport


def _rendezvous(store: dist.Store, prefix: str, rank: int, ranks: tuple[int, ...], token: str,
                timeout: float, label: str) -> _C.Communicator:
    """A communicator over _shm_transport(...)."""
    return _C.Communicator(_shm_transport(store, prefix, rank, ranks, token, timeout, label))


def _start(store: dist.Store, key: str, rank: int, size: int, timeout: float,
           one_host: bool = False) -> tuple[str, tuning.CostModel, tuple[str, ...]]:
    """What every group of one start-up shares, agreed through the store under `key`: the
    token in segment names, rank 0's cost model (so all ranks pick alike) and each rank's
    host.  one_host=True (the torch.distributed backend, which has no path between hosts)
    refuses ranks on several hosts, naming them."""
    if rank == 0:
        _reap_stale_segments()
        store.set(key + "token", secrets.token_hex(8))
        store.set(key + "model", tuning.load().to_json())
    store.set(key + f"host/{rank}", _host_identity())
    _wait_keys(store, {key + f"host/{r}": r for r in range(size)}, timeout, "start pycomm")
    hosts = tuple(store.get(key + f"host/{r}").decode(errors="replace")[:256] for r in range(size))
    if one_host and len(set(hosts)) > 1:
        where = "; ".join(f"rank {r}: {h.split('/')[0]}" for r, h in enumerate(hosts))
        raise CommError(
            'pycomm: the torch.distributed backend "pycomm" moves data over shared memory and '
            "needs every rank of a process group on one host, but " + where + '. Across hosts, '
            'use torch.distributed\'s own backends (init_process_group("cpu:gloo,cuda:nccl")), '
            "or pycomm.init_process_group(), whose groups span hosts (shared memory inside a "
            "host, gloo between hosts)."
        )
    token = store.get(key + "token").decode(errors="replace")
    if not _TOKEN_RE.match(token):
        raise CommError(f"pycomm: the rendezvous store holds {token[:40]!r} as the job's token, "
                        "not 16 hex digits: something other than this job's rank 0 wrote it")
    return token, tuning.CostModel.from_json(store.get(key + "model").decode(errors="replace")), hosts


def _connect(w: _World, ranks: tuple[int, ...], gid: int) -> Group:
    """Builds group `gid` over `ranks` (global ranks).  Every rank of the world calls it."""
    group = Group(ranks=ranks, rank=ranks.index(w.rank) if w.rank in ranks else -1, gid=gid,
                  timeout=w.timeout, model=w.model)
    if group.rank < 0:
        return group
    prefix = f"pycomm/{w.generation}/g{gid}/"
    hosts = tuple(w.hosts[r] for r in ranks)
    if len(set(hosts)) == 1:
        group._comm = _rendezvous(w.store, prefix, group.rank, ranks, w.token, w.timeout, f"g{gid}")
    else:
        from pycomm import _hierarchy  # imports this module

        group._hier = _hierarchy.connect(w.store, prefix, group, hosts, w.token)
    return group


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
    shared memory inside each host and gloo between hosts (pycomm._hierarchy).
    """
    global _world
    if _world is not None:
        raise RuntimeError("pycomm is already initialised; call pycomm.destroy_process_group() first")
    if timeout is None:
        timeout = (datetime.timedelta(seconds=float(os.environ["PYCOMM_TIMEOUT"]))
                   if os.environ.get("PYCOMM_TIMEOUT") else DEFAULT_TIMEOUT)
    if not isinstance(timeout, datetime.timedelta):
        raise TypeError(f"timeout must be a datetime.timedelta, not {type(timeout).__name__}")
    if timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")

    if rank is None and world_size is None and init_method is None and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        store = dist.PrefixStore("pycomm-over-torch/", dist.distributed_c10d._get_default_store())
    else:
        if rank is None:
            rank = _env_int("RANK", -1)
        if world_size is None:
            world_size = _env_int("WORLD_SIZE", -1)
        if rank < 0 or world_size < 1:
            raise ValueError(
                "pycomm.init_process_group: pass rank= and world_size=, or set RANK and "
                "WORLD_SIZE (torchrun does)"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        store = _make_store(rank, world_size, init_method, timeout)
    store.set_timeout(timeout)
    seconds = timeout.total_seconds()

    # A store may outlive one pycomm session (torch.distributed's, a reused file): count
    # start-ups so that each gets fresh keys.
    generation = (store.add("pycomm/starts", 1) - 1) // world_size
    token, model, hosts = _start(store, f"pycomm/{generation}/", rank, world_size, seconds)
    w = _World(store=store, rank=rank, size=world_size, generation=generation, token=token,
               timeout=seconds, model=model, hosts=hosts)
    w.world = _connect(w, tuple(range(world_size)), 0)
    w.groups.append(w.world)
    w.next_gid = 1
    _world = w
    return w.world


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
    group = _connect(w, tuple(members), w.next_gid)
    w.next_gid += 1
    w.groups.append(group)
    return group


def group_or_world(group: Group | None) -> Group:
    """The group to run on; raises if pycomm is not initialised or we are not a member."""
    g = _require().world if group is None else group
    if not isinstance(g, Group):
        raise TypeError(f"group must be a pycomm Group from new_group(), not {type(g).__name__}")
    if g.rank < 0:
        raise ValueError(f"this rank ({_require().rank}) is not a member of group {g.gid} (ranks {list(g.ranks)})")
    return g


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
    """Waits for queued async collectives, then releases every group's shared memory.
    Safe to call after a failure and when pycomm was never initialised."""
    global _world
    w, _world = _world, None
    if w is None:
        return
    for g in w.groups:
        g._shutdown()
