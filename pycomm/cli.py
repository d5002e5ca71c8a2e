"""The `pycomm` command.

    pycomm bench [options]     the collectives benchmark (same as python -m bench)
    pycomm tune [--nprocs N] [--output PATH]
                               measure alpha, beta, gamma on this machine and save them
    pycomm model               print the cost model in use, its formulas and where the tree wins
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import pycomm
import pycomm.launch
from pycomm import tuning
from pycomm._settings import Settings


def measure_rank(sizes: list[int], iters_budget: float) -> list[dict] | None:
    """On every rank: time ring all_gather and ring all_reduce over `sizes` (bytes)."""
    p = pycomm.get_world_size()
    rows = []
    for nbytes in sizes:
        count = max(nbytes // 4, p)
        count -= count % p
        for coll in ("all_gather", "all_reduce"):
            buf = torch.ones(count)
            block = torch.ones(count // p)
            fn = ((lambda: pycomm.all_reduce(buf, algorithm="ring")) if coll == "all_reduce"
                  else (lambda: pycomm.all_gather(buf, block, algorithm="ring")))
            for _ in range(3):
                fn()
            iters = max(3, min(500, int(iters_budget / max(count * 4 * 2e-10, 2e-5))))
            pycomm.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            t = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
            pycomm.all_reduce(t, op="max")
            rows.append(dict(collective=coll, bytes=count * 4, seconds=t.item()))
    return rows if pycomm.get_rank() == 0 else None


def tune(nprocs: int = 2, path: os.PathLike | str | None = None,
         max_bytes: int = 16 << 20) -> tuple[tuning.CostModel, Path]:
    """Measures this machine on `nprocs` local processes, fits the model and saves it."""
    sizes, s = [], 8
    while s <= max_bytes:
        sizes.append(s)
        s *= 4
    # The slot path and the single-copy path, each forced, fit their own alpha and beta.
    rows = pycomm.launch.run(measure_rank, nprocs, args=(sizes, 0.05), collective_timeout=120,
                             env={"PYCOMM_SHM_SINGLE_COPY": "never"})[0]
    copy_rows = pycomm.launch.run(measure_rank, nprocs, args=(sizes, 0.05), collective_timeout=120,
                                  env={"PYCOMM_SHM_SINGLE_COPY": "always"})[0]
    out = Path(path) if path else tuning.default_path(Settings.from_env().tune_file)
    model = tuning.fit_single_copy(tuning.fit(rows, nprocs, source=str(out)), copy_rows, nprocs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": {"alpha": model.alpha, "beta": model.beta, "gamma": model.gamma,
                  "copy_alpha": model.copy_alpha, "copy_beta": model.copy_beta},
        "single_copy_measurements": copy_rows,
        "nprocs": nprocs, "host": platform.node(), "cpus": os.cpu_count(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "measurements": rows,
    }, indent=1))
    return model, out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        # pycomm.bench: bench/ in a checkout, inside the package once installed.
        return importlib.import_module("pycomm.bench.collectives").main(argv[1:])
    parser = argparse.ArgumentParser(prog="pycomm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="the collectives benchmark (see pycomm bench --help)")
    t = sub.add_parser("tune", help="measure the cost model's constants on this machine")
    t.add_argument("--nprocs", "-n", type=int, default=2, help="local processes (default 2)")
    t.add_argument("--output", "-o", default=None,
                   help="where to save (default $PYCOMM_TUNE_FILE or ~/.cache/pycomm/tune.json)")
    sub.add_parser("model", help="print the cost model in use")
    args = parser.parse_args(argv)

    if args.command == "tune":
        print(f"measuring ring all_gather and all_reduce on {args.nprocs} processes...", flush=True)
        model, path = tune(args.nprocs, args.output)
        print(model.table())
        print(f"saved to {path} (used by every later run; PYCOMM_TUNE_FILE picks another file)")
        return 0
    print(tuning.load(Settings.from_env().tune_file).table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
