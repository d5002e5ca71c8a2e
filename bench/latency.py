"""Small-message latency: an 8-byte float32 all_reduce on 2 processes, four ways, one run.

    python -m bench latency [--nprocs 2] [--repeat 5] [--json PATH]

- pycomm.all_reduce (pycomm's own API),
- torch.distributed.all_reduce on a process group of backend "pycomm",
- torch.distributed.all_reduce on gloo (the anchor of the torch.distributed path),
- MPI_Allreduce through mpi4py under mpirun (Open MPI, where installed; bench/mpi.py).

Each figure is the slowest rank's mean over many back-to-back calls; the run repeats that
`repeat` times and prints the median and the spread.  The targets of the project's issue are
printed with the verdict: pycomm's API no slower than Open MPI, torch.distributed over pycomm
at most 1/20 of gloo's time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import pycomm
import pycomm.launch

from . import mpi as bench_mpi
from .collectives import machine

PATHS = ("pycomm.all_reduce", "dist.all_reduce (pycomm)", "dist.all_reduce (gloo)")
ITERS = {PATHS[0]: 20000, PATHS[1]: 5000, PATHS[2]: 500}


def _rank(repeat: int, store: str) -> dict | None:
    r, n = pycomm.get_rank(), pycomm.get_world_size()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=r, world_size=n)
    groups = {PATHS[1]: dist.new_group(list(range(n)), backend="pycomm"), PATHS[2]: None}
    t = torch.ones(2)  # 8 bytes
    calls = {PATHS[0]: lambda: pycomm.all_reduce(t),
             PATHS[1]: lambda: dist.all_reduce(t, group=groups[PATHS[1]]),
             PATHS[2]: lambda: dist.all_reduce(t)}
    out: dict[str, list[float]] = {p: [] for p in PATHS}
    try:
        for _ in range(repeat):
            for path, fn in calls.items():  # interleaved, so a slow moment hits every path
                iters = ITERS[path]
                for _ in range(min(1000, iters // 5)):
                    fn()
                pycomm.barrier()
                start = time.perf_counter()
                for _ in range(iters):
                    fn()
                took = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64)
                pycomm.all_reduce(took, op="max")
                out[path].append(took.item() * 1e6)
    finally:
        dist.destroy_process_group()
    return out if r == 0 else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--nprocs", "-n", type=int, default=2)
    p.add_argument("--repeat", "-r", type=int, default=5)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    info = machine()
    print(f"# 8-byte float32 all_reduce on {args.nprocs} processes, {info['cpu']} ({info['cores']} cores), "
          f"torch {info['torch']}, {info['date']}; median of {args.repeat} repeats", flush=True)
    with tempfile.TemporaryDirectory(prefix="pycomm-latency-") as tmp:
        times = pycomm.launch.run(_rank, args.nprocs, args=(args.repeat, os.path.join(tmp, "gloo")),
                                  collective_timeout=300)[0]
    ok, why = bench_mpi.available()
    if ok:
        reps = [bench_mpi.run(["all_reduce"], [8], args.nprocs, "float32", iters=20000, repeat=1)[("all_reduce", 8)]
                * 1e6 for _ in range(args.repeat)]
        times["MPI_Allreduce (Open MPI)"] = reps
        info["mpi"] = bench_mpi.version()
    else:
        print(f"# no Open MPI row: {why}")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'path':<28} {'median us':>10} {'min':>8} {'max':>8}")
    for k, v in times.items():
        print(f"{k:<28} {med[k]:10.2f} {min(v):8.2f} {max(v):8.2f}")
    mpi = med.get("MPI_Allreduce (Open MPI)")
    if mpi:
        verdict = "met" if med[PATHS[0]] <= mpi else "NOT met"
        print(f"target: pycomm.all_reduce <= Open MPI: {med[PATHS[0]]:.2f} vs {mpi:.2f} us ({verdict})")
    ratio = med[PATHS[1]] / med[PATHS[2]]
    print(f"target: torch.distributed over pycomm <= 1/20 of gloo: {ratio:.4f} = 1/{1 / ratio:.0f} "
          f"({'met' if ratio <= 1 / 20 else 'NOT met'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, nprocs=args.nprocs, times_us=times, median_us=med), f, indent=1)
        print(f"wrote {args.json}")
    return 0
