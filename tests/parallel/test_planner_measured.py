"""The planner against runs here: the tiny GPT of examples/train_gpt.py on 2 and 4 processes.

Calibrate on one process (bench/plan_check.py: FLOP/s, fixed time per block pass and per
step, from three single-process runs), predict every feasible shape, then measure the
best-predicted shape of each family (data, tensor, and pipeline parallel with each schedule)
two or three times, keeping each shape's fastest run: the shape predicted best must measure
within 20% of the fastest measured.  4 processes share the 2 cores: identical schedules (GPipe
and looped BFS at one micro-batch) measured 13% apart in one sweep, so that world gets a third
run.  The full sweep (every shape, rank correlation and errors) is
``python -m bench.plan_check --worlds 2 4`` (docs/planner.md)."""
import pytest

from pycomm.bench import plan_check

STEPS = 6


@pytest.fixture(scope="module")
def calibration(pools):  # once for both worlds (pools: the session's rank processes, conftest.py)
    cal = plan_check.calibrate(STEPS, lambda world, configs: pools(world).run(plan_check.measure_rank, configs,
                                                                              timeout=600)[0])
    assert cal["flops"] > 0 and cal["layer_overhead"] >= 0
    return cal


@pytest.mark.parametrize("world, runs", [(2, 2), (4, 3)])
def test_predicted_best_measures_within_20_percent_of_measured_best(run, calibration, world, runs):
    plans = plan_check.plans_for(world, calibration)
    family_best = {}
    for p in plans:  # fastest first: the first of each family is its best
        family_best.setdefault((p.dp, p.tp, p.pp, p.schedule), p)
    chosen = list(family_best.values())
    assert chosen[0] is plans.best and len(chosen) >= 4
    # The predicted best is measured `runs` times in each run, the others once: the fastest of a
    # dozen shapes (several of them the same schedule, e.g. GPipe and looped BFS at one
    # micro-batch) is an extreme of many noisy samples, and one shape's few samples would be
    # judged against it (2026-11-26: GPipe 64 ms against the identical looped BFS's 51 ms on 4
    # processes sharing 2 cores).
    configs = [plan_check.train_config(p, STEPS) for p in [chosen[0]] * (runs - 1) + chosen]
    # each shape's fastest run: the machine is shared, and one disturbed run of one shape must
    # not decide the comparison
    samples = [min(ts) for ts in zip(*(run(world, plan_check.measure_rank, configs, timeout=600)[0]
                                        for _ in range(runs)))]
    measured = [min(samples[:runs])] + samples[runs:]
    table = "\n".join(f"{p.shape}: predicted {p.step_time * 1e3:.1f} ms, measured {m * 1e3:.1f} ms"
                      for p, m in zip(chosen, measured))
    assert measured[0] <= 1.2 * min(measured), table
