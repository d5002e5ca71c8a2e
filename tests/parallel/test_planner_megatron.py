"""The planner against Megatron-LM's weak-scaling table (Narayanan et al. 2021, Table 1; the
rows are in bench/plan_megatron.py, the comparison in docs/planner.md).

For every row the prediction at the paper's own (tp, pp, dp, batch), with full recomputation as
in the paper, is within 15% of the reported TFLOP/s per GPU.  For two rows (the search takes
seconds each on the small ones, a minute on the largest; ``python -m bench.plan_megatron``
prints all ten) the planner's own best is at least as fast by its model and keeps tensor
parallelism inside a node."""
import pytest

from pycomm.bench.plan_megatron import TABLE, best_plan, paper_prediction

_BY_NAME = {row[0]: row for row in TABLE}


@pytest.mark.parametrize("row", TABLE, ids=[r[0] for r in TABLE])
def test_prediction_at_the_papers_shape_is_within_15_percent(row):
    plan = paper_prediction(row)
    reported = row[-1]
    assert (plan.tp, plan.pp, plan.dp) == (row[5], row[6], row[7] // (row[5] * row[6]))
    assert plan.recompute == "full"
    assert plan.tflops_per_device == pytest.approx(reported, rel=0.15), plan.shape


@pytest.mark.parametrize("name", ["gpt-1.7b", "gpt-39b"])
def test_planners_best_is_as_fast_and_keeps_tensor_parallelism_in_a_node(name):
    row = _BY_NAME[name]
    paper, best = paper_prediction(row), best_plan(row)
    assert best.step_time <= paper.step_time * (1 + 1e-9)
    assert best.tp <= best.cluster.devices_per_node
    assert best.memory.total <= best.cluster.memory
