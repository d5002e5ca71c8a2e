"""Slow spells of the machine, told apart from pycomm's own: alternates, round after round and
each in fresh processes, pycomm's all_reduce and Open MPI's of the same size, and prints each
round's time next to the other's.

    python -m bench modes [--size 1M] [--rounds 6] [--algorithm tree] [--json PATH]

On a shared VM a row of `python -m bench` can run 3-4x slower than its neighbours for a
spell of seconds.  If pycomm's rounds and Open MPI's rounds slow down in the same spells,
the machine is the cause; if only pycomm's do, pycomm is.  Each round also reads the
machine's steal time (/proc/stat: time the hypervisor gave this VM's vCPUs to someone else).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import pycomm
import pycomm.launch

from . import mpi as bench_mpi
from .collectives import machine, parse_size


def _loop(count: int, algorithm: str, iters: int) -> float:
    """One rank's mean seconds per all_reduce (the slowest rank's, on every rank)."""
    t = torch.ones(count)
    for _ in range(max(1, iters // 10)):
        pycomm.all_reduce(t, algorithm=algorithm)
    pycomm.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        pycomm.all_reduce(t, algorithm=algorithm)
    took = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64)
    pycomm.all_reduce(took, op="max")
    return took.item()


def _steal_ticks() -> int:
    """The machine's steal time so far, in clock ticks (0 where /proc/stat lacks it)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) if len(fields) > 8 else 0
    except OSError:
        return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench modes", description=__doc__.splitlines()[0])
    ap.add_argument("--size", "-b", default="1M", help="bytes of the float32 all_reduce (default 1M)")
    ap.add_argument("--rounds", "-r", type=int, default=6)
    ap.add_argument("--algorithm", "-a", default="tree")
    ap.add_argument("--nprocs", "-n", type=int, default=2)
    ap.add_argument("--iters", "-i", type=int, default=0, help="calls per round (default: by size)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    nbytes = parse_size(args.size)
    count = max(1, nbytes // 4)
    iters = args.iters or max(50, min(20000, int(2e9 / max(nbytes, 1))))
    ok, why = bench_mpi.available()
    info = machine()
    print(f"# {args.rounds} rounds of a {nbytes} B float32 all_reduce on {args.nprocs} processes, "
          f"{iters} calls each: pycomm ({args.algorithm}) then Open MPI, fresh processes every time; "
          f"{info['cpu']} ({info['cores']} cores), {info['date']}", flush=True)
    if not ok:
        print(f"# no Open MPI: {why}", flush=True)
    print(f"# {'round':>5} {'pycomm us':>10} {'mpi us':>10} {'steal %':>8}", flush=True)
    rounds = []
    for i in range(args.rounds):
        s0, t0 = _steal_ticks(), time.monotonic()
        ours = pycomm.launch.run(_loop, args.nprocs, args=(count, args.algorithm, iters))[0]
        theirs = (bench_mpi.run(["all_reduce"], [nbytes], args.nprocs, "float32", iters=iters, repeat=1)
                  .get(("all_reduce", nbytes)) if ok else None)
        seconds = max(1e-9, time.monotonic() - t0) * (info["cores"] or 1)
        steal = (_steal_ticks() - s0) / os.sysconf("SC_CLK_TCK") / seconds * 100
        rounds.append(dict(pycomm_us=ours * 1e6, mpi_us=theirs * 1e6 if theirs else None, steal_pct=steal))
        mpi_text = f"{theirs * 1e6:10.1f}" if theirs else f"{'-':>10}"
        print(f"  {i + 1:5d} {ours * 1e6:10.1f} {mpi_text} {steal:8.1f}", flush=True)
    ours_all = [r["pycomm_us"] for r in rounds]
    print(f"# pycomm: median {statistics.median(ours_all):.1f} us, "
          f"slowest/fastest {max(ours_all) / min(ours_all):.1f}x", flush=True)
    theirs_all = [r["mpi_us"] for r in rounds if r["mpi_us"]]
    if theirs_all:
        print(f"# Open MPI: median {statistics.median(theirs_all):.1f} us, "
              f"slowest/fastest {max(theirs_all) / min(theirs_all):.1f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, size=nbytes, algorithm=args.algorithm, iters=iters, rounds=rounds),
                      f, indent=1)
        print(f"wrote {args.json}")
    return 0
