"""The planner's formulas, search and interfaces (pycomm.parallel.planner, python -m
pycomm.parallel.plan).  The checks against Megatron-LM's table and against runs on this
machine are test_planner_megatron.py and test_planner_measured.py."""
import argparse
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from pycomm.parallel import pipeline, planner
from pycomm.parallel.planner import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable


def test_iteration_flops_is_narayanans_formula():
    m = planner.get_model("gpt-175b")
    B, s, l, h, V = 1536, m.seq, m.layers, m.hidden, m.vocab
    expected = 96 * B * s * l * h**2 * (1 + s / (6 * h) + V / (16 * l * h))
    assert m.iteration_flops(B, "full") == pytest.approx(expected, rel=1e-12)
    assert m.iteration_flops(B, "none") == pytest.approx(expected - 24 * B * s * l * h**2 * (1 + s / (6 * h)), rel=1e-12)
    # GPT-3 has 175B parameters (12·l·h² plus embeddings)
    assert m.params() == pytest.approx(175e9, rel=0.01)


def test_activation_memory_is_korthikantis_table():
    m = planner.get_model("gpt-1t")
    s, b, h, a = m.seq, 1, m.hidden, m.heads
    sbh = s * b * h
    act = planner.activation_bytes_per_layer
    assert act(m, b, 1, "none") == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert act(m, b, 8, "none") == pytest.approx(sbh * (10 + 24 / 8 + 5 * a * s / (h * 8)))
    assert act(m, b, 8, "none", sequence_parallel=True) == pytest.approx(sbh * (34 + 5 * a * s / h) / 8)
    assert act(m, b, 8, "selective") == pytest.approx(sbh * (10 + 24 / 8))
    assert act(m, b, 8, "selective", sequence_parallel=True) == pytest.approx(34 * sbh / 8)
    assert act(m, b, 8, "full") == pytest.approx(2 * sbh)
    with pytest.raises(ValueError, match="recompute"):
        act(m, b, 8, "some")


def test_bubble_comes_from_the_simulator():
    """1F1B's idle time is (p-1)(t_f+t_b) whatever m: the simulator's, exact and extrapolated."""
    for p, m in [(4, 8), (8, 64), (8, 1000)]:
        span, held = planner.pipeline_makespan("1f1b", p, m, 1, 1.0, 2.0)
        assert span == pytest.approx((m + p - 1) * 3.0)
        assert held == pytest.approx(min(p, m))
    span, held = planner.pipeline_makespan("gpipe", 4, 40, 1, 1.0, 2.0)
    assert held == pytest.approx(40)  # GPipe keeps every micro-batch
    exact = pipeline.simulate_schedule(pipeline.build_schedule("interleaved_1f1b", 4, 8, 2), 1.0, 2.0).makespan
    assert planner.pipeline_makespan("interleaved_1f1b", 4, 8, 2, 1.0, 2.0)[0] == pytest.approx(exact)
    with pytest.raises(planner.timing.PipelineShapeError):
        planner.pipeline_makespan("interleaved_1f1b", 4, 6, 2, 1.0, 2.0)  # m not a multiple of p


def test_split_backward_timed_as_a_runtime_runs_it():
    """A chain's first stage has no input gradient: ZB-H1's I is empty there, so on two stages it
    gains nothing over 1F1B (what the runtime measures); on four the later stages' I still help."""
    one, zb = (planner.pipeline_makespan(n, 2, 4, 1, 1.0, 2.0)[0] for n in ("1f1b", "zb_h1"))
    assert zb == pytest.approx(one)
    one, zb = (planner.pipeline_makespan(n, 4, 8, 1, 1.0, 2.0)[0] for n in ("1f1b", "zb_h1"))
    assert zb < one


def test_processes_sharing_cores():
    """4 processes on 2 cores: the step is max(work + bubble, work x 4/2); with a core each it is
    work + bubble.  So a pipeline's idle time is cheap when the cores are oversubscribed."""
    model = planner.get_model("tiny")
    dedicated = planner.local_cluster(2, flops=1e10, layer_overhead=1e-3)
    shared = dataclasses.replace(dedicated, devices_per_node=4, cores_per_node=2, peak_flops=5e9)
    for cluster, dp, factor in ((dedicated, 1, 1), (shared, 2, 2)):
        t = planner.estimate(model, cluster, 8, dp=dp, tp=1, pp=2, micro_batch=4, schedule="gpipe").time
        assert t.bubble > 0
        assert t.total == pytest.approx(max(t.work + t.bubble, t.work * factor))
        assert (t.shared > 0) == (cluster is shared)


def test_search_ranks_feasible_shapes_and_prunes_by_memory():
    model, cluster = planner.get_model("gpt-7.5b"), planner.get_cluster("a100x8", 2)
    plans = planner.plan(model, cluster, 32, keep=30, virtual=(1, 2))
    assert len(plans) >= 30
    times = [p.step_time for p in plans]
    assert times == sorted(times)
    for p in plans:
        assert p.dp * p.tp * p.pp == 16 and p.memory.total <= cluster.memory
        assert p.step_time == pytest.approx(sum([p.time.compute, p.time.recompute, p.time.tp_comm, p.time.pp_comm,
                                                 p.time.dp_comm, p.time.bubble, p.time.other, p.time.shared]))
    assert plans.rejected["out of memory"] > 0  # 7.5B with Adam does not fit one 80 GB device unsharded
    # the plans not simulated have a lower bound slower than the 30th: none of them can be faster
    full = planner.plan(model, cluster, 32, keep=100_000, virtual=(1, 2))
    assert full.best.step_time == pytest.approx(plans.best.step_time)
    front = full.frontier()
    assert front[0] is full.best
    assert all(a.memory.total > b.memory.total for a, b in zip(front, front[1:]))


def test_recomputation_and_zero_trade_time_for_memory():
    model, cluster = planner.get_model("gpt-7.5b"), planner.get_cluster("a100x8", 4)
    kw = dict(dp=8, tp=4, pp=1, micro_batch=4)
    none, full = (planner.estimate(model, cluster, 128, recompute=r, **kw) for r in ("none", "full"))
    assert full.step_time > none.step_time and full.memory.activations < none.memory.activations
    z1 = planner.estimate(model, cluster, 128, recompute="none", zero=1, **kw)
    assert z1.memory.optimizer == pytest.approx(none.memory.optimizer / 8)


def test_no_recomputation_under_a_split_backward():
    """The runtime refuses a checkpointed stage under a schedule that splits the backward into
    I and W (the forward would be recomputed twice): the planner never offers the pair."""
    assert {n for n, s in pipeline.SCHEDULES.items() if s.splits_backward()} >= {"zb_h1", "zb_h2", "zb_v"}
    assert not pipeline.SCHEDULES["1f1b"].splits_backward()
    model, cluster = planner.get_model("tiny"), planner.local_cluster(2)
    plans = planner.plan(model, cluster, 8, keep=100_000, schedules=("zb_h1", "1f1b"))
    assert not [p for p in plans if p.schedule == "zb_h1" and p.recompute != "none"]
    assert [p for p in plans if p.schedule == "zb_h1"] and plans.rejected["recomputation under a split backward (I and W)"]
    with pytest.raises(ValueError, match="splits the backward"):
        planner.estimate(model, cluster, 8, dp=1, tp=1, pp=2, micro_batch=1, schedule="zb_h1", recompute="full")


def test_tensor_parallel_across_nodes_costs_more():
    model, cluster = planner.get_model("gpt-39b"), planner.get_cluster("a100x8", 4)
    inside = planner.estimate(model, cluster, 64, dp=2, tp=8, pp=2, micro_batch=1, recompute="full")
    across = planner.estimate(model, cluster, 64, dp=1, tp=16, pp=2, micro_batch=1, recompute="full")
    assert across.time.tp_comm > 4 * inside.time.tp_comm


def test_bad_input_names_the_argument():
    model, cluster = planner.get_model("tiny"), planner.local_cluster(2)
    with pytest.raises(ValueError, match="global_batch"):
        planner.plan(model, cluster, 0)
    with pytest.raises(ValueError, match="dp\\*tp\\*pp"):
        planner.estimate(model, cluster, 16, dp=2, tp=2, pp=1, micro_batch=1)
    with pytest.raises(ValueError, match="unknown model preset"):
        planner.get_model("gpt-9")
    with pytest.raises(ValueError, match="unknown cluster preset"):
        planner.get_cluster("tpu")
    with pytest.raises(ValueError, match="heads"):
        planner.Model(layers=2, hidden=30, heads=4, vocab=10, seq=8)
    with pytest.raises(ValueError, match="no parallel shape"):
        assert planner.plan("gpt-1t", "a100x8", 8).best  # one node cannot hold a trillion parameters


def test_model_from_hf_style_config_and_module():
    class Config:
        num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads = 32, 4096, 32, 8
        intermediate_size, vocab_size, max_position_embeddings = 14336, 128256, 8192

    class Module:
        config = Config()

    m = planner.model_from(Module(), seq=4096)
    assert (m.layers, m.hidden, m.kv_heads, m.ffn, m.seq) == (32, 4096, 8, 14336, 4096)
    assert planner.model_from({"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257,
                               "n_positions": 1024}).params() == pytest.approx(124e6 + 50257 * 768, rel=0.02)  # GPT-2, head untied
    with pytest.raises(ValueError, match="missing"):
        planner.model_from(object())


def test_plan_is_callable_whether_or_not_the_module_was_imported():
    code = ("import pycomm.parallel as p; a = p.plan('tiny', 'local', 16, nodes=2).best.dp; "
            "import pycomm.parallel.plan; import pycomm; "
            "b = pycomm.parallel.plan('tiny', 'local', 16, nodes=2).best.dp; print(a, b)")
    out = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    a, b = out.stdout.split()
    assert a == b and a in ("1", "2")


def test_cli_prints_ranked_table_and_explanation(tmp_path):
    """``python -m pycomm.parallel.plan`` with a JSON config, --explain, --json and --plot."""
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps({"model": "gpt-175b", "cluster": "a100x8", "nodes": 16, "global_batch": 256,
                               "tp": [8], "pp": [8, 16]}))
    out = subprocess.run([PY, "-m", "pycomm.parallel.plan", "--config", str(cfg), "--explain", "--top", "3",
                          "--json", str(tmp_path / "p.json"), "--plot", str(tmp_path / "f.png")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "96·256·2048·96·12288²" in out.stdout  # the formula with its numbers
    assert "bubble" in out.stdout and "Korthikanti" in out.stdout
    rows = json.loads((tmp_path / "p.json").read_text())
    assert rows[0]["tp"] == 8 and rows[0]["pp"] in (8, 16)
    assert (tmp_path / "f.png").stat().st_size > 1000



def test_cli_refuses_what_cannot_fit(capsys):
    assert cli.main(["--model", "gpt-1t", "--cluster", "a100x8", "--global-batch", "8"]) == 2
    assert "no parallel shape" in capsys.readouterr().err


def test_train_gpt_plan_auto_takes_the_planners_best(capsys):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_gpt

    tc = train_gpt.parse_args(["--plan", "auto", "--nprocs", "2", "--batch", "16"])
    out = capsys.readouterr().out
    assert "running the planner's choice" in out
    assert tc.dp * tc.tp * tc.pp == 2 and tc.batch == 16
    best = train_gpt.planned(argparse.Namespace(nprocs=2, plan_flops=train_gpt.PLAN_FLOPS,
                                                plan_overhead=train_gpt.PLAN_OVERHEAD, batch=16),
                             train_gpt.GPTConfig()).best
    assert (tc.dp, tc.tp, tc.pp, tc.microbatches, tc.zero) == (best.dp, best.tp, best.pp, best.microbatches,
                                                              bool(best.zero))
