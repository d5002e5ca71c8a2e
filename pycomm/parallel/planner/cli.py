"""``python -m pycomm.parallel.plan``: the planner from the command line.

    python -m pycomm.parallel.plan --model gpt-175b --cluster a100x8 --nodes 128 --global-batch 1536
    python -m pycomm.parallel.plan --config job.json --explain --plot frontier.png
    python -m pycomm.parallel.plan --layers 32 --hidden 4096 --heads 32 --vocab 32000 --seq 4096 \\
        --cluster h100x8 --nodes 4 --global-batch 512 --json plans.json

A ``--config`` file (JSON, or YAML when PyYAML is installed) holds the same options with
underscores (``{"model": "gpt-175b", "cluster": "a100x8", "nodes": 128, "global_batch": 1536}``,
or ``"model": {"layers": ..., "hidden": ...}``); flags given on the command line win.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:  # optional: only for YAML --config files
    import yaml
except ImportError:  # pragma: no cover
    yaml = None

from .cluster import CLUSTERS, get_cluster
from .model import MODELS, Model, get_model
from .search import RECOMPUTE, plan

__all__ = ["main", "build_parser"]

_SHAPE = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pycomm.parallel.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="JSON (or YAML) file with these options")
    p.add_argument("--model", help=f"preset: {', '.join(MODELS)}")
    for name in _SHAPE:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"model {name} (overrides the preset)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--cluster", help=f"preset: {', '.join(CLUSTERS)}, local")
    p.add_argument("--nodes", type=int, help="nodes (processes for --cluster local)")
    p.add_argument("--global-batch", type=int, help="sequences per step")
    p.add_argument("--tp", type=int, nargs="+", help="only these tensor-parallel sizes")
    p.add_argument("--pp", type=int, nargs="+", help="only these pipeline sizes")
    p.add_argument("--schedules", nargs="+", help="only these pipeline schedules")
    p.add_argument("--recompute", nargs="+", choices=RECOMPUTE, help="only these recomputation modes")
    p.add_argument("--zero", type=int, nargs="+", choices=(0, 1), help="only these ZeRO stages")
    p.add_argument("--max-micro-batch", type=int, help="largest micro-batch (sequences) tried; default 8")
    p.add_argument("--top", type=int, default=10, help="rows of the table")
    p.add_argument("--explain", action="store_true", help="print the best plan's formulas with the numbers in")
    p.add_argument("--plot", help="write the frontier (step time against memory) to this PNG")
    p.add_argument("--json", help="write the ranked plans to this JSON file")
    return p


def _load_config(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        if yaml is None:
            raise SystemExit(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); or use JSON")
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a mapping of options, got {type(data).__name__}")
    return data


def _options(args: argparse.Namespace) -> dict:
    opts = _load_config(args.config) if args.config else {}
    opts = {k.replace("-", "_"): v for k, v in opts.items()}
    for key, value in vars(args).items():
        if value is not None and key != "config":
            opts[key] = value
    return opts


def _model(opts: dict) -> Model:
    spec = opts.get("model")
    shape = {k: opts[k] for k in _SHAPE if opts.get(k) is not None}
    if isinstance(spec, dict):
        shape = {**spec, **shape}
        spec = None
    base = get_model(spec).__dict__ if spec else {}
    fields = {**{k: base[k] for k in (*_SHAPE, "dtype", "name") if k in base}, **shape}
    if opts.get("dtype"):
        fields["dtype"] = opts["dtype"]
    missing = [k for k in ("layers", "hidden", "heads", "vocab", "seq") if k not in fields]
    if missing:
        raise SystemExit(f"no model: give --model PRESET ({', '.join(MODELS)}) or the shape; missing {missing}")
    return Model(**fields)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = _options(args)
    try:
        model = _model(opts)
        cluster = get_cluster(opts.get("cluster", "a100x8"), int(opts.get("nodes", 1)))
        if "global_batch" not in opts:
            raise SystemExit("--global-batch is required (sequences per optimizer step)")
        search = {k: opts[k] for k in ("tp", "pp", "schedules", "recompute", "zero", "max_micro_batch") if k in opts}
        plans = plan(model, cluster, int(opts["global_batch"]), **search)
        best = plans.best
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plans.table(int(opts.get("top", 10))))
    if opts.get("explain"):
        print()
        print(plans.explain())
    else:
        print(f"\nbest: {best.shape}  (--explain prints the formulas)")
    if opts.get("plot"):
        print(f"frontier written to {plans.plot(opts['plot'])}")
    if opts.get("json"):
        rows = [dict(dp=p.dp, tp=p.tp, pp=p.pp, schedule=p.schedule, virtual=p.virtual, micro_batch=p.micro_batch,
                     microbatches=p.microbatches, recompute=p.recompute, zero=p.zero, step_time=p.step_time,
                     tokens_per_s=p.tokens_per_s, memory=p.memory.total, mfu=p.mfu,
                     breakdown=dict(compute=p.time.compute, recompute=p.time.recompute, tp=p.time.tp_comm,
                                    pp=p.time.pp_comm, dp=p.time.dp_comm, bubble=p.time.bubble,
                                    shared=p.time.shared))
                for p in plans.plans]
        Path(opts["json"]).write_text(json.dumps(rows, indent=1))
        print(f"{len(rows)} plans written to {opts['json']}")
    return 0
