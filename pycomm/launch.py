"""Run a function on N local processes with pycomm initialised: the launcher behind
`pycomm bench`, `pycomm tune` and the examples (under torchrun they are not needed).

    results = pycomm.launch.run(fn, nprocs=4, args=(...))   # fn(*args) on each rank

Each process calls ``pycomm.init_process_group`` over a fresh file store, runs ``fn`` and
sends back its return value.  If any rank raises, the others are stopped and the first
error is raised here with the rank's traceback; nothing outlives the call.  A rank named in
``may_die`` may exit without a result (its result is None): the others go on, as after
``pycomm.shrink()`` (the file store survives any rank).
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
import time
import traceback

import pycomm


class RankError(RuntimeError):
    """A rank raised: ``rank`` says which, the message carries its traceback."""

    def __init__(self, rank: int, text: str):
        super().__init__(f"rank {rank} failed:\n{text}")
        self.rank = rank


def _worker(rank, nprocs, store_path, timeout_s, fn, args, env, queue, hosts):
    os.environ.update(env)
    local = rank % (nprocs // hosts)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(local)})
    if hosts > 1:  # pretend: contiguous blocks of ranks on each "host"
        os.environ["PYCOMM_HOST_ID"] = f"simulated-host-{rank // (nprocs // hosts)}"
    try:
        pycomm.init_process_group(rank, nprocs, init_method=f"file://{store_path}",
                                  timeout=datetime.timedelta(seconds=timeout_s))
        try:
            result = fn(*args)
        finally:
            pycomm.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        queue.put((rank, False, traceback.format_exc()))


def run(fn, nprocs: int, args: tuple = (), timeout: float | None = None,
        collective_timeout: float = 60.0, env: dict[str, str] | None = None,
        hosts: int = 1, may_die=()) -> list:
    """fn(*args) on ranks 0..nprocs-1; returns their results in rank order.

    fn must be importable (a module-level function).  timeout bounds the whole run
    (default: none); collective_timeout is the process group's timeout.  hosts > 1
    simulates that many hosts (ranks in contiguous blocks, each block its own
    PYCOMM_HOST_ID), which runs the multi-host code paths on one machine.  may_die: ranks
    allowed to exit without a result (fault-tolerance demonstrations); theirs is None.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be at least 1, got {nprocs}")
    if hosts < 1 or nprocs % hosts:
        raise ValueError(f"hosts={hosts} must divide nprocs={nprocs}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="pycomm-launch-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(r, nprocs, store, collective_timeout, fn, args, dict(env or {}), queue,
                                   hosts))
                 for r in range(nprocs)]
        for p in procs:
            p.start()
        results: dict[int, object] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while len(results) < nprocs:
                try:
                    rank, ok, value = queue.get(timeout=0.5)
                except Exception:  # queue.Empty
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                    for r in dead:
                        if r not in may_die:
                            raise RankError(r, f"process exited with code {procs[r].exitcode}") from None
                        results[r] = None
                    if deadline is not None and time.monotonic() > deadline:
                        missing = [r for r in range(nprocs) if r not in results]
                        raise TimeoutError(f"pycomm.launch.run: ranks {missing} did not finish "
                                           f"within {timeout} s") from None
                    continue
                if not ok:
                    raise RankError(rank, value)
                results[rank] = value
        finally:
            for p in procs:
                p.join(timeout=5 if len(results) == nprocs else 0.1)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            queue.close()
        return [results[r] for r in range(nprocs)]
