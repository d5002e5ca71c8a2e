"""Open MPI as an anchor: the same rows as `python -m bench`, timed with mpi4py under mpirun.

    python -m bench --anchor mpi        # adds Open MPI's time and busbw to every row
    mpirun -n 2 python -m pycomm.bench.mpi '{"ops": ["all_reduce"], "sizes": [8], "dtype": "float32"}'

Open MPI is an anchor, never a dependency: `available()` says whether mpirun and mpi4py
are installed and, when not, how to get them (Debian: `apt-get install openmpi-bin
libopenmpi-dev`, then `pip install mpi4py`).  Sizes and counts follow the pycomm rows
(nccl-tests' convention: the biggest buffer of the collective), rooted collectives run from
rank 0, and each time is the slowest rank's mean over the iterations, best of `repeat`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

HOW = ("Open MPI rows need mpirun and mpi4py: on Debian/Ubuntu `apt-get install openmpi-bin "
       "libopenmpi-dev`, then `pip install mpi4py` in this environment")


def available() -> tuple[bool, str]:
    if shutil.which("mpirun") is None:
        return False, "mpirun is not installed. " + HOW
    if importlib.util.find_spec("mpi4py") is None:
        return False, "mpi4py is not installed. " + HOW
    return True, ""


def version() -> str:
    """`mpirun --version`'s first line."""
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def run(ops: list[str], sizes: list[int], nprocs: int, dtype: str, iters: int | None = None,
        repeat: int = 3, timeout: float = 900) -> dict[tuple[str, int], float]:
    """{(op, bytes): seconds} for every row, measured by `nprocs` MPI processes."""
    cfg = json.dumps(dict(ops=ops, sizes=sizes, dtype=dtype, iters=iters, repeat=repeat))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl_vader_single_copy_mechanism=os.environ.get(
                   "OMPI_MCA_btl_vader_single_copy_mechanism", "cma"))  # noqa: SIM112 - Open MPI's spelling
    cmd = ["mpirun", "--oversubscribe", "-n", str(nprocs), sys.executable, "-m", "pycomm.bench.mpi", cfg]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        raise RuntimeError(f"mpirun failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            out[(r["op"], r["size"])] = r["seconds"]
    return out


def _iters(nbytes: int) -> int:
    return max(3, min(2000, int(2e8 / max(nbytes, 1) ** 0.9) // 10))


def _rank_main(cfg: dict) -> None:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    dtype = np.dtype(cfg["dtype"])
    for op in cfg["ops"]:
        for size in cfg["sizes"]:
            count = max(size // dtype.itemsize, 1)
            if op not in ("all_reduce", "reduce", "broadcast"):
                count = max(count // n, 1) * n  # whole blocks per rank, as the pycomm rows
            per = count // n
            big = np.ones(count, dtype)
            out = np.empty(count, dtype)
            small = np.ones(per, dtype)
            small_out = np.empty(per, dtype)
            fn = {
                "all_reduce": lambda: comm.Allreduce(big, out, op=MPI.SUM),
                "reduce": lambda: comm.Reduce(big, out, op=MPI.SUM, root=0),
                "broadcast": lambda: comm.Bcast(big, root=0),
                "reduce_scatter": lambda: comm.Reduce_scatter_block(big, small_out, op=MPI.SUM),
                "all_gather": lambda: comm.Allgather(small, out),
                "gather": lambda: comm.Gather(small, out, root=0),
                "scatter": lambda: comm.Scatter(big, small_out, root=0),
                "all_to_all": lambda: comm.Alltoall(big, out),
            }[op]
            iters = cfg["iters"] or _iters(count * dtype.itemsize)
            for _ in range(5):
                fn()
            best = float("inf")
            for _ in range(cfg["repeat"]):
                comm.Barrier()
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                best = min(best, comm.allreduce((time.perf_counter() - t0) / iters, op=MPI.MAX))
            if rank == 0:
                print(json.dumps(dict(op=op, size=count * dtype.itemsize, seconds=best)), flush=True)


if __name__ == "__main__":
    _rank_main(json.loads(sys.argv[1]))
