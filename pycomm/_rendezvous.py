"""Rendezvous: what the ranks of a group agree on through a torch.distributed Store.

1. rank 0 of a start-up draws a random token; every segment name contains it, the group's
   label and the rank, so two groups or two jobs on one host never collide;
2. each rank creates its segment (mode 0600) under a name every rank derives from the
   token, the label and the rank, and everyone maps everyone's, refusing a segment that is
   not the job user's own with mode 0600 (a name is never read from the store, which other
   local users may be able to write: README, Security);
3. once all have mapped, each rank removes its segment's name, so nothing is left in
   /dev/shm even if a process is killed later.  A name left by a process killed during
   step 2 is removed by the next start-up on that host (reap_stale_segments).

Everything read back from the store is validated before use.
"""
from __future__ import annotations

import datetime
import os
import re
import secrets
import socket
import urllib.parse

import torch.distributed as dist

from pycomm import _C, tuning
from pycomm._settings import Settings
from pycomm.errors import CommError, CommTimeoutError

_SEGMENT_RE = re.compile(r"^pycomm-[0-9a-f]{16}-[a-z0-9]+-r\d+$")
NEVER = tuning.NEVER
TOKEN_RE = re.compile(r"^[0-9a-f]{16}$")
LAYOUT_RE = re.compile(r"^[0-9]{1,12},[0-9]{1,6}$")  # a rank's shared-memory layout: slot bytes, slots


def make_store(rank: int, world_size: int, init_method: str | None, timeout: datetime.timedelta):
    if init_method is None or init_method == "env://":
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port:
            raise ValueError(
                "pycomm.init_process_group: no init_method and MASTER_ADDR/MASTER_PORT are not "
                "set; run under torchrun, or pass init_method='tcp://host:port' or 'file:///path'"
            )
        # torchrun's agent already serves the store on MASTER_PORT: connect as clients.
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        return _tcp_store(addr, int(port), world_size, rank == 0 and not agent, timeout)
    url = urllib.parse.urlparse(init_method)
    if url.scheme == "tcp":
        if not url.hostname or not url.port:
            raise ValueError(f"init_method {init_method!r} needs a host and a port: 'tcp://host:port'")
        return _tcp_store(url.hostname, url.port, world_size, rank == 0, timeout)
    if url.scheme == "file":
        path = urllib.parse.unquote(url.path)
        if not path:
            raise ValueError(f"init_method {init_method!r} needs a path: 'file:///path/to/file'")
        _private_file(path, init_method)
        store = dist.FileStore(path, world_size)
        store.set_timeout(timeout)
        return store
    raise ValueError(f"init_method {init_method!r}: use 'env://', 'tcp://host:port' or 'file:///path'")


def _tcp_store(host: str, port: int, world_size: int, master: bool,
               timeout: datetime.timedelta) -> dist.TCPStore:
    """A TCP store that does not wait for the other ranks itself: start-up waits for their
    keys instead (agree()), so a rank that never comes is named."""
    try:
        return dist.TCPStore(host, port, world_size, master, timeout=timeout, wait_for_workers=False)
    except (RuntimeError, OSError) as e:
        who = "serve" if master else "reach rank 0's"
        raise CommError(f"pycomm: could not {who} rendezvous store at {host}:{port} within "
                        f"{timeout.total_seconds():.1f} s: {e}") from e


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


def host_identity(settings: Settings) -> str:
    """Ranks share memory only if they share a kernel: the boot id says so, the hostname
    makes messages readable.  PYCOMM_HOST_ID overrides both (tests of multi-host code)."""
    if settings.host_id:
        return settings.host_id
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def reap_stale_segments() -> None:
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


def segment_name(token: str, label: str, rank: int) -> str:
    """Where rank `rank` of the group labelled `label` keeps its segment.  Every rank derives
    every name itself: a name read back from the store could be another user's."""
    return f"/pycomm-{token}-{label}-r{rank}"


def wait_keys(store: dist.Store, keys: dict[str, int], timeout: float, what: str) -> None:
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


def single_copy_from(settings: Settings, model: tuning.CostModel) -> int:
    """Smallest send that goes single-copy (PYCOMM_SHM_SINGLE_COPY; 'auto': the cost
    model's crossover); NEVER for none."""
    if settings.shm_single_copy == "never":
        return NEVER
    if settings.shm_single_copy == "always":
        return 1
    return model.single_copy_from()


def reduce_threads(settings: Settings, host_procs: int, cores: int | None = None) -> int:
    """Threads a rank reduces with (PYCOMM_SHM_REDUCE_THREADS; 0: auto).  Auto shares the
    cores this process may run on among the job's `host_procs` processes on its host and
    never oversubscribes: 2 ranks on 2 cores reduce on one thread each, 2 on 16 on eight
    (at most eight: by then memory bandwidth, not cores, bounds a reduction)."""
    if settings.shm_reduce_threads > 0:
        return min(settings.shm_reduce_threads, 256)
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, host_procs)))


def shm_transport(store: dist.Store, prefix: str, rank: int, ranks: tuple[int, ...], token: str,
                  timeout: float, label: str, settings: Settings,
                  model: tuning.CostModel, host_procs: int = 1) -> _C.ShmTransport:
    """The shared-memory set-up of one group (see the module docstring); every member
    calls it with the same prefix, token and label.  `ranks` (global ranks) name peers in
    errors; `host_procs`: the job's processes on this host (what its cores are shared by)."""
    size = len(ranks)
    names = [segment_name(token, label, r) for r in range(size)]
    name = names[rank]
    transport = _C.ShmTransport(
        rank, size, name,
        slot_bytes=settings.shm_slot_bytes,
        slots=settings.shm_slots,
        lanes=3,  # two for the double binary tree, one for point-to-point messages
    )
    transport.set_single_copy(single_copy_from(settings, model))
    transport.set_reduce_threads(reduce_threads(settings, host_procs))
    mine = (settings.shm_slot_bytes, settings.shm_slots)
    layout = f"{mine[0]},{mine[1]}"
    try:
        # Each rank's layout travels with its "created" key, so that every rank, not only the
        # first to map a peer's segment, reports ranks started with other PYCOMM_SHM_* settings.
        store.set(f"{prefix}created/{rank}", layout)
        wait_keys(store, {f"{prefix}created/{r}": ranks[r] for r in range(size)}, timeout,
                  f"join group {label}")
        for r in range(size):
            theirs = store.get(f"{prefix}created/{r}").decode(errors="replace")
            # A value of another shape is not a rank's layout (the store is open to anyone who
            # can reach it): attach() then checks the segment itself, owner and all.
            if theirs != layout and LAYOUT_RE.match(theirs):
                slot_bytes, _, slots = theirs.partition(",")
                raise CommError(
                    f"pycomm: rank {ranks[r]} runs with PYCOMM_SHM_SLOT_BYTES={slot_bytes} and "
                    f"PYCOMM_SHM_SLOTS={slots} but rank {ranks[rank]} with {mine[0]} and {mine[1]}; "
                    "every rank must use the same PYCOMM_SHM_* settings")
        transport.attach(names, timeout)
        store.set(f"{prefix}attached/{rank}", "1")
        wait_keys(store, {f"{prefix}attached/{r}": ranks[r] for r in range(size)}, timeout,
                  f"map group {label}'s shared memory")
    finally:
        transport.unlink()  # mapped by everyone, or failed: either way the name goes
    return transport


def agree(store: dist.Store, key: str, rank: int, size: int, timeout: float,
          settings: Settings) -> tuple[str, tuning.CostModel, tuple[str, ...]]:
    """What every group of one start-up shares, agreed through the store under `key`: the
    token in segment names, rank 0's cost model (so all ranks pick alike) and each rank's
    host."""
    if rank == 0:
        reap_stale_segments()
        store.set(key + "token", secrets.token_hex(8))
        store.set(key + "model", tuning.load(settings.tune_file).to_json())
    store.set(key + f"host/{rank}", host_identity(settings))
    wait_keys(store, {key + f"host/{r}": r for r in range(size)}, timeout, "start pycomm")
    hosts = tuple(store.get(key + f"host/{r}").decode(errors="replace")[:256] for r in range(size))
    token = store.get(key + "token").decode(errors="replace")
    if not TOKEN_RE.match(token):
        raise CommError(f"pycomm: the rendezvous store holds {token[:40]!r} as the job's token, "
                        "not 16 hex digits: something other than this job's rank 0 wrote it")
    return token, tuning.CostModel.from_json(store.get(key + "model").decode(errors="replace")), hosts


