"""The planner against Megatron-LM's weak-scaling table (Narayanan et al., SC21, Table 1).

    python -m bench.plan_megatron            # the comparison table of docs/planner.md

For each row: the planner's prediction at the paper's own (tp, pp, dp, batch) with full
activation recomputation (the paper recomputes, and counts the recomputation in its FLOPs) and
the micro-batch size and schedule it likes best for that shape (the table does not give them),
then the planner's own best shape.  tests/parallel/test_planner_megatron.py asserts the bounds.
"""
from __future__ import annotations

from pycomm.parallel import planner

# (model preset, params 1e9, heads, hidden, layers, tp, pp, GPUs, batch, TFLOP/s per GPU), as in
# Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
# Megatron-LM", Table 1 (arXiv 2104.04473; reproduced in the course slides, shared/seeds/004).
TABLE = [
    ("gpt-1.7b", 1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    ("gpt-3.6b", 3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    ("gpt-7.5b", 7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    ("gpt-18b", 18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    ("gpt-39b", 39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    ("gpt-76b", 76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    ("gpt-145b", 145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    ("gpt-310b", 310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    ("gpt-530b", 529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    ("gpt-1t", 1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]

# Megatron-LM of 2021 all-reduced the gradients after the backward pass (no bucket overlap).
MEGATRON_OVERLAP = False


def paper_prediction(row) -> planner.Plan:
    """The planner's fastest plan at the paper's (tp, pp, dp), full recomputation, no ZeRO."""
    name, _, _, _, _, tp, pp, gpus, batch, _ = row
    cluster = planner.get_cluster("a100x8", gpus // 8)
    plans = planner.search(planner.get_model(name), cluster, batch, tp=tp, pp=pp, recompute=["full"], zero=[0],
                           keep=1, overlap_grad_reduce=MEGATRON_OVERLAP)
    return plans.best


def best_plan(row) -> planner.Plan:
    """The planner's own best shape for the row's model, GPUs and batch."""
    name, *_, gpus, batch, _ = row
    return planner.search(planner.get_model(name), planner.get_cluster("a100x8", gpus // 8), batch, keep=1,
                          overlap_grad_reduce=MEGATRON_OVERLAP).best


def main() -> None:
    print("| model | params (B) | tp | pp | dp | batch | paper TFLOP/s | predicted | error | planner's best "
          "(its shape) | best TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in TABLE:
        p = paper_prediction(row)
        b = best_plan(row)
        err = p.tflops_per_device / row[-1] - 1
        print(f"| {row[0]} | {row[1]} | {row[5]} | {row[6]} | {row[7] // (row[5] * row[6])} | {row[8]} | {row[9]} "
              f"| {p.tflops_per_device:.1f} ({p.schedule}{f' v={p.virtual}' if p.virtual > 1 else ''}, "
              f"b={p.micro_batch}) | {err:+.1%} | {b.shape} | {b.tflops_per_device:.1f} "
              f"({b.step_time / p.step_time:.3f}x time) |", flush=True)


if __name__ == "__main__":
    main()
