"""The `pycomm` command.

    pycomm bench [options]     the collectives benchmark (same as python -m bench)
    pycomm tune [--nprocs N] [--output PATH]
                               measure alpha, beta, gamma on this machine and save them
    pycomm model               print the cost model in use and where the tree wins
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from bench import collectives

        return collectives.main(argv[1:])
    parser = argparse.ArgumentParser(prog="pycomm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="the collectives benchmark (see pycomm bench --help)")
    t = sub.add_parser("tune", help="measure the cost model's constants on this machine")
    t.add_argument("--nprocs", "-n", type=int, default=2, help="local processes (default 2)")
    t.add_argument("--output", "-o", default=None,
                   help="where to save (default $PYCOMM_TUNE_FILE or ~/.cache/pycomm/tune.json)")
    sub.add_parser("model", help="print the cost model in use")
    args = parser.parse_args(argv)

    from pycomm import tuning

    if args.command == "tune":
        print(f"measuring ring all_gather and all_reduce on {args.nprocs} processes...", flush=True)
        model, path = tuning.tune(args.nprocs, args.output)
        print(model.table())
        print(f"saved to {path} (used by every later run; PYCOMM_TUNE_FILE picks another file)")
        return 0
    print(tuning.load().table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
