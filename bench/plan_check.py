"""The planner against runs on this machine: examples/train_gpt.py's tiny GPT, every feasible shape.

    python -m bench.plan_check                      # 2 processes (minutes)
    python -m bench.plan_check --worlds 2 4 --steps 12 --repeat 2

1. Calibrate on one process (the machine's numbers for this model, nothing from the shapes):
   step times at (batch 16, 1 micro-batch), (16, 4) and (32, 1) give the achievable FLOP/s,
   the fixed time per block pass and the fixed time per step (three equations, three unknowns);
   α, β, γ come from ``pycomm tune``'s file (or pycomm's defaults).
2. Plan every feasible shape of the tiny GPT on ``world`` processes that train_gpt.py can run
   (tp, pp in {1, 2}, gpipe / 1f1b / interleaved with v=2, full recomputation = --checkpoint,
   ZeRO-1 = --zero), then run each for ``--steps`` steps in one launch and take the median step
   time (slowest rank).
3. Print the table, the rank correlation (Spearman) and the mean absolute error.

tests/parallel/test_planner_measured.py runs a small version (2 processes, a few shapes) in
``make test``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

import pycomm
import pycomm.launch
from pycomm.parallel import planner

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import train_gpt  # noqa: E402

BATCH = 16
MODEL = planner.get_model("tiny")
# What train_gpt.py can run: its --checkpoint is full recomputation of every stage, and its
# interleaved schedule takes --virtual (2 by default).
SEARCH = dict(tp=[1, 2], pp=[1, 2], recompute=["none", "full"], virtual=[1, 2], keep=10_000,
              overlap_grad_reduce=False)  # train_gpt all-reduces after the last micro-batch


def train_config(plan: planner.Plan, steps: int) -> train_gpt.TrainConfig:
    return train_gpt.TrainConfig(
        dp=plan.dp, tp=plan.tp, pp=plan.pp, schedule=plan.schedule if plan.pp > 1 else "1f1b",
        microbatches=plan.microbatches, virtual=plan.virtual if plan.virtual > 1 else 2, batch=plan.global_batch,
        zero=bool(plan.zero), checkpoint=plan.recompute == "full", steps=steps, quiet=True, kernels="torch")


def _median_step(times: list[float]) -> float:
    return statistics.median(times[2:] if len(times) > 4 else times)


def measure_rank(configs: list[train_gpt.TrainConfig]) -> list[float]:
    """On every rank: train each config in turn; the median step time of the slowest rank."""
    out = []
    for tc in configs:
        res = train_gpt.train(tc)
        t = max(_median_step(res["step_times"]), 0.0)
        if pycomm.get_world_size() > 1:
            buf = torch.tensor([t], dtype=torch.float64)
            pycomm.all_reduce(buf, op="max")
            t = float(buf)
        out.append(t)
    return out


def calibrate(steps: int, launcher=None, rounds: int = 2) -> dict:
    """One process: (flops, layer_overhead, step_overhead) of the tiny GPT on this machine.
    Each of the three runs keeps its fastest of `rounds` (a shared VM has slow spells of
    seconds that would otherwise skew one of them and the fit with it)."""
    runs = [(16, 1), (16, 4), (32, 1)]
    configs = [train_gpt.TrainConfig(batch=b, microbatches=m, steps=steps, quiet=True, kernels="torch")
               for b, m in runs]
    rows = [(launcher or _launch)(1, configs) for _ in range(rounds)]
    (t1, t4, t32) = (min(col) for col in zip(*rows))
    if t32 <= t1 or t4 <= t1:
        raise RuntimeError(
            f"plan_check: the calibration runs are inconsistent (batch 16: {t1 * 1e3:.1f} ms, 16 in 4 "
            f"micro-batches: {t4 * 1e3:.1f} ms, batch 32: {t32 * 1e3:.1f} ms; more work must take longer): "
            "the machine was too noisy, run it again when it is quieter")
    # T(B, m) = step_overhead + 3·l·m·layer_overhead + FLOPs(B)/F   (planner.timing's model, pp=1)
    per_mb = max((t4 - t1) / 3, 0.0)
    flops16 = MODEL.iteration_flops(16, "none")
    compute16 = max(t32 - t1, 1e-9)  # FLOPs double from B=16 to 32 at one micro-batch
    flops = flops16 / compute16
    step_overhead = max(t1 - per_mb - compute16, 0.0)
    return dict(flops=flops, layer_overhead=per_mb / (3 * MODEL.layers), step_overhead=step_overhead,
                measured=dict(zip(["b16m1", "b16m4", "b32m1"], (t1, t4, t32))))


def _launch(world: int, configs: list) -> list[float]:
    return pycomm.launch.run(measure_rank, world, args=(configs,), collective_timeout=300)[0]


def plans_for(world: int, cal: dict) -> planner.Plans:
    cluster = planner.local_cluster(world, flops=cal["flops"], layer_overhead=cal["layer_overhead"])
    return planner.search(MODEL, cluster, BATCH, step_overhead=cal["step_overhead"], **SEARCH)


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 0.0


def sweep(world: int, steps: int, cal: dict, repeat: int = 1, launcher=None,
          families: bool = False) -> list[tuple[planner.Plan, float]]:
    """(plan, measured seconds) for every feasible shape on ``world`` processes; with
    ``repeat`` > 1, the minimum over repeats of each shape's median (least disturbed)."""
    plans = list(plans_for(world, cal))
    if families:  # the best-predicted shape of each (dp, tp, pp, schedule): the CI test's set
        firsts: dict = {}
        for p in plans:
            firsts.setdefault((p.dp, p.tp, p.pp, p.schedule), p)
        plans = list(firsts.values())
    configs = [train_config(p, steps) for p in plans]
    best = [float("inf")] * len(plans)
    for _ in range(repeat):
        for i, t in enumerate((launcher or _launch)(world, configs)):
            best[i] = min(best[i], t)
    return list(zip(plans, best))


def report(world: int, rows: list[tuple[planner.Plan, float]]) -> str:
    pred = [p.step_time for p, _ in rows]
    meas = [m for _, m in rows]
    errors = [abs(p / m - 1) for p, m in zip(pred, meas)]
    chosen = min(range(len(rows)), key=lambda i: pred[i])
    fastest = min(range(len(rows)), key=lambda i: meas[i])
    lines = [f"### {world} processes ({len(rows)} shapes)", "",
             "| shape | predicted ms | measured ms | error |", "|---|---|---|---|"]
    for p, m in sorted(rows, key=lambda x: x[1]):
        lines.append(f"| {p.shape} | {p.step_time * 1e3:.2f} | {m * 1e3:.2f} | {p.step_time / m - 1:+.0%} |")
    lines += ["", f"Spearman rank correlation {spearman(pred, meas):.2f}; mean absolute error "
              f"{statistics.fmean(errors):.0%}, median {statistics.median(errors):.0%}; the predicted best "
              f"({rows[chosen][0].shape}) measured {meas[chosen] * 1e3:.2f} ms, "
              f"{meas[chosen] / meas[fastest] - 1:+.0%} from the measured best ({rows[fastest][0].shape}, "
              f"{meas[fastest] * 1e3:.2f} ms)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=1, help="sweeps per world; each shape keeps its fastest")
    ap.add_argument("--families", action="store_true",
                    help="only the best-predicted shape of each (dp, tp, pp, schedule), as the CI test")
    a = ap.parse_args(argv)
    print(f"{datetime.date.today()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    cal = calibrate(a.steps)
    print(f"calibration (1 process): {cal}", flush=True)
    for world in a.worlds:
        rows = sweep(world, a.steps, cal, a.repeat, families=a.families)
        print(report(world, rows), flush=True)
    print(f"({time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
