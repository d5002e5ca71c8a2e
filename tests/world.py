"""A pool of worker processes per world size, reused across tests.

Starting a Python process with torch costs seconds on a 2-core machine, so each world size
gets `n` long-lived workers.  ``pool.run(fn, *args)`` runs ``fn(*args)`` (an importable,
module-level function) on every worker with pycomm initialised, and returns the results in
rank order.  Every job has a deadline; a worker that hangs or dies takes the pool down
(killed, restarted on next use) and the test fails with the ranks' tracebacks.  After a job
that failed, or one that broke the process group on purpose (``fresh=True``), the next job
starts a new process group.
"""
from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import pickle
import signal
import tempfile
import threading
import time
import traceback

_epoch = None  # in a worker: the process group generation it is initialised for
_gloo_epoch = None


def gloo():
    """In a worker: torch.distributed with gloo over the same ranks (initialised once per
    process-group generation), for comparisons."""
    global _gloo_epoch
    import torch.distributed as dist

    if _gloo_epoch != _epoch:
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("gloo", init_method=f"file://{_store_dir}/gloo-{_epoch}",
                                rank=_rank, world_size=_size,
                                timeout=datetime.timedelta(seconds=60))
        _gloo_epoch = _epoch
    return dist


def torch_group(backend: str):
    """In a worker: a torch.distributed group over all ranks with `backend` (gloo as the
    default group, set up by gloo()); one per backend and process-group generation."""
    dist = gloo()
    key = (backend, _epoch)
    if key not in _torch_groups:
        _torch_groups[key] = dist.new_group(list(range(_size)), backend=backend)
    return _torch_groups[key]


_torch_groups = {}


def _serve(rank, size, conn, store_dir):
    global _epoch, _rank, _size, _store_dir
    _rank, _size, _store_dir = rank, size, store_dir
    import pycomm

    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        if msg is None:
            break
        epoch, pg_timeout, fn, args = msg
        global _pg_timeout
        _pg_timeout = pg_timeout
        try:
            if epoch != _epoch:
                pycomm.destroy_process_group()
                pycomm.init_process_group(rank, size, init_method=f"file://{store_dir}/pg-{epoch}",
                                          timeout=datetime.timedelta(seconds=pg_timeout))
                _epoch = epoch
            reply = (True, fn(*args))
        except BaseException as e:  # noqa: BLE001 - reported to the test
            reply = (False, f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            conn.send((False, f"rank {rank}: result not picklable: {e}"))
    pycomm.destroy_process_group()


def catch(fn) -> tuple[str | None, str]:
    """(type name, message) of the exception fn() raises, or (None, "") if it returns: what a
    job hands back to its test about an expected failure."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return type(e).__name__, str(e)
    return None, ""


def until_killed(victim: bool, fn, delay: float = 0.3, limit: float = 30.0) -> tuple[str | None, str, float]:
    """Kills this process with SIGKILL `delay` seconds from now if it is the `victim`, and
    calls fn() until it raises or `limit` seconds pass: (type name, message, seconds after
    the kill that the failure was noticed).  What a survivor of a killed peer checks."""
    if victim:
        threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    start = time.monotonic()
    while True:
        etype, msg = catch(fn)
        if etype or time.monotonic() - start > limit:
            return etype, msg, time.monotonic() - start - delay


class WorkerDied(RuntimeError):
    pass


class Pool:
    def __init__(self, size: int):
        self.size = size
        self.procs = []
        self.conns = []
        self.epoch = 0
        self.pg_timeout = None
        self.dirty = True
        self._tmp = None

    def _start(self):
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory(prefix=f"pycomm-pool{self.size}-")
        for r in range(self.size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(r, self.size, child, self._tmp.name), daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self.dirty = True

    def close(self):
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        for c in self.conns:
            c.close()
        self.procs, self.conns = [], []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def pids(self):
        return [p.pid for p in self.procs]

    def run(self, fn, *args, timeout: float = 120.0, pg_timeout: float = 30.0, fresh: bool = False,
            may_die=()):
        """fn(*args) on every rank; results in rank order.  fresh=True: start a new process
        group for this job and after it (for jobs that break the group on purpose).
        may_die: ranks allowed to exit during the job (their result is None); the pool is
        restarted afterwards."""
        if not self.procs:
            self._start()
        if fresh or self.dirty or pg_timeout != self.pg_timeout:
            self.epoch += 1
            self.pg_timeout = pg_timeout
        self.dirty = fresh
        for c in self.conns:
            c.send((self.epoch, pg_timeout, fn, args))
        results, errors, dead = [None] * self.size, [], []
        deadline = time.monotonic() + timeout
        pending = set(range(self.size))
        while pending:
            for r in sorted(pending):
                conn = self.conns[r]
                if conn.poll(0.01):
                    try:
                        ok, value = conn.recv()
                    except EOFError:
                        dead.append(r)
                        pending.discard(r)
                        continue
                    pending.discard(r)
                    if ok:
                        results[r] = value
                    else:
                        errors.append(value)
                elif not self.procs[r].is_alive():
                    dead.append(r)
                    pending.discard(r)
            if pending and time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"ranks {sorted(pending)} did not finish within {timeout} s "
                                   f"(others: {errors})")
        if dead:
            self.close()  # a dead worker breaks the pool; the next run starts a new one
            unexpected = [r for r in dead if r not in may_die]
            if unexpected:
                raise WorkerDied(f"workers of ranks {unexpected} died; errors: {errors}")
        if errors:
            self.dirty = True
            raise AssertionError("\n".join(errors))
        return results


_restarts = 0
_pg_timeout = 30.0


def restart(timeout: float | None = None):
    """In a worker: a new pycomm process group over the same ranks, so that it reads the
    environment as it is now (groups read PYCOMM_* settings when they are built).  Its
    timeout is the running job's pg_timeout unless given."""
    global _restarts
    timeout = _pg_timeout if timeout is None else timeout
    import pycomm

    _restarts += 1
    pycomm.destroy_process_group()
    return pycomm.init_process_group(_rank, _size,
                                     init_method=f"file://{_store_dir}/restart-{_epoch}-{_restarts}",
                                     timeout=datetime.timedelta(seconds=timeout))


@contextlib.contextmanager
def scoped_env(**values):
    """In a worker: os.environ with `values` set, restored afterwards (workers are reused
    by later tests)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def segments():
    """pycomm's names in /dev/shm (there should be none outside start-up)."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("pycomm-"))
