"""The planner against runs here: the tiny GPT of examples/train_gpt.py on 2 processes.

Calibrate on one process (bench/plan_check.py: FLOP/s, fixed time per block pass and per
step, from three single-process runs), predict every feasible 2-process shape, then measure
the best-predicted shape of each family (data, tensor, and pipeline parallel with each
schedule), twice, keeping each shape's faster run: the shape predicted best must measure within
20% of the fastest measured.  The full
sweep (every shape, 2 and 4 processes, rank correlation and errors) is
``python -m bench.plan_check --worlds 2 4`` (docs/planner.md)."""
from pycomm.bench import plan_check

STEPS = 6


def test_predicted_best_measures_within_20_percent_of_measured_best(run):
    def launcher(world, configs):
        return run(world, plan_check.measure_rank, configs, timeout=600)[0]

    cal = plan_check.calibrate(STEPS, launcher)
    assert cal["flops"] > 0 and cal["layer_overhead"] >= 0
    plans = plan_check.plans_for(2, cal)
    family_best = {}
    for p in plans:  # fastest first: the first of each family is its best
        family_best.setdefault((p.dp, p.tp, p.pp, p.schedule), p)
    chosen = list(family_best.values())
    assert chosen[0] is plans.best and len(chosen) >= 4
    configs = [plan_check.train_config(p, STEPS) for p in chosen]
    # each shape's faster of two runs: the machine is shared, and one disturbed run of one shape
    # must not decide the comparison
    measured = [min(a, b) for a, b in zip(launcher(2, configs), launcher(2, configs))]
    table = "\n".join(f"{p.shape}: predicted {p.step_time * 1e3:.1f} ms, measured {m * 1e3:.1f} ms"
                      for p, m in zip(chosen, measured))
    assert measured[0] <= 1.2 * min(measured), table
