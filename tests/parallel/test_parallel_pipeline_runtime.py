"""The pipeline runtime on 2 ranks: exact gradients for every schedule, uneven splits,
activation checkpointing, activations alive, measured bubble against the simulator."""
import copy
import time

import pytest
import torch
from torch import nn

import pycomm
from pycomm import parallel
from pycomm.parallel import pipeline

N_LAYERS = 5  # uneven on purpose: 3+2 stages for pp=2, 2+1+1+1 for interleaved v=2


def _layers(width=8, n=N_LAYERS, dropout=0.0):
    torch.manual_seed(0)
    out = [nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Dropout(dropout)) for _ in range(n - 1)]
    return out + [nn.Linear(width, 3)]


def _batch(n=24, width=8):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, width, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loss(y, t):
    return nn.functional.cross_entropy(y, t)


def _reference(m, dropout=0.0):
    layers = _layers(dropout=dropout)
    model = nn.Sequential(*layers)
    x, t = _batch()
    torch.manual_seed(1)
    loss = sum(_loss(model(xi), ti) for xi, ti in zip(x.chunk(m), t.chunk(m))) / m
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


def _stage_modules(layers, pp_rank, pp, schedule, m, virtual):
    """This rank's stage modules for ``schedule`` and, per stage, the layer indices it holds
    (a Chimera replica stage holds copies of its model stage's layers)."""
    sched = pipeline.build_schedule(schedule, pp, m, virtual)
    ranges = pipeline.partition(len(layers), sched.num_model_stages // (2 if sched.placement == "bidirectional" else 1))
    stages, held = {}, {}
    for s in sched.local_stages(pp_rank):
        model_stage = sched.replica_of(s)
        mods = [layers[i] if s == model_stage else copy.deepcopy(layers[i]) for i in ranges[model_stage]]
        stages[s] = nn.Sequential(*mods)
        held[s] = list(zip(ranges[model_stage], mods))
    return stages, held


def job_pipeline(schedule, m, virtual, checkpoint, dropout):
    torch.set_num_threads(1)
    mesh = parallel.init_mesh(pp=pycomm.get_world_size())
    layers = _layers(dropout=dropout)
    stages, held = _stage_modules(layers, mesh.pp_rank, mesh.pp, schedule, m, virtual)
    pipe = pipeline.Pipeline(stages, schedule, m, _loss, mesh.pp_group, virtual=virtual, checkpoint=checkpoint)
    x, t = _batch()
    torch.manual_seed(1)
    stats = pipe.step(x, t)
    grads = {}  # layer index -> gradients, from every copy of the layer on this rank
    for pairs in held.values():
        for i, layer in pairs:
            grads.setdefault(i, []).append([p.grad.clone() for p in layer.parameters()])
    return stats.loss, grads, stats.peak_activations, stats.peak_activation_bytes


SYNCHRONOUS = [name for name, spec in pipeline.SCHEDULES.items() if spec.synchronous]


def _chunks(schedule):
    return 2 if pipeline.SCHEDULES[schedule].chunks == "any" else 1


@pytest.mark.parametrize("schedule", SYNCHRONOUS)
def test_pipeline_gradients_exact(run, schedule):
    m, virtual = 4, _chunks(schedule)
    ref_loss, ref_grads = _reference(m)
    res = run(2, job_pipeline, schedule, m, virtual, False, 0.0)
    seen = {}
    for loss, grads, _, _ in res:
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
        for i, copies in grads.items():
            seen.setdefault(i, []).extend(copies)
    assert sorted(seen) == list(range(N_LAYERS))  # every layer ran
    copies = 2 if schedule == "chimera" else 1  # Chimera: both replicas hold the summed gradient
    flat_ref = iter(ref_grads)
    for i in range(N_LAYERS):
        assert len(seen[i]) == copies
        refs = [next(flat_ref) for _ in seen[i][0]]
        for grads in seen[i]:
            for g, ref in zip(grads, refs):
                torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


def test_activation_checkpointing_same_gradients_with_dropout(run):
    plain = run(2, job_pipeline, "1f1b", 4, 1, False, 0.3)
    ckpt = run(2, job_pipeline, "1f1b", 4, 1, True, 0.3)
    for (l1, g1, _, b1), (l2, g2, _, b2) in zip(plain, ckpt):
        assert l1 == l2
        for i in g1:
            for a, b in zip(g1[i][0], g2[i][0]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)  # recompute drew the same masks
        assert b2 < b1  # checkpointed stages keep only their inputs


def test_1f1b_keeps_p_activations_gpipe_keeps_m(run):
    m = 6
    gp = run(2, job_pipeline, "gpipe", m, 1, False, 0.0)
    ofob = run(2, job_pipeline, "1f1b", m, 1, False, 0.0)
    assert gp[0][2] == m and ofob[0][2] == 2 and ofob[1][2] == 1
    # measured bytes scale the same way: one micro-batch's activations per count
    per_mb = gp[0][3] / m
    assert ofob[0][3] == pytest.approx(2 * per_mb, rel=1e-6)


def test_pipeline_errors(run):
    with pytest.raises(ValueError, match="fewer micro-batches than stages for 1F1B: got microbatches=1, stages=2"):
        pipeline.build_schedule("1f1b", 2, 1)
    with pytest.raises(ValueError, match="microbatches divisible by stages.*microbatches=3, stages=2"):
        pipeline.build_schedule("interleaved_1f1b", 2, 3, 2)
    with pytest.raises(ValueError, match="cannot split 3 layers into 4 pipeline stages"):
        pipeline.partition(3, 4)
    with pytest.raises(ValueError, match="summing to the 5 layers"):
        pipeline.partition(5, 2, sizes=[2, 2])
    assert [len(r) for r in pipeline.partition(7, 3)] == [3, 2, 2]


# ----------------------------------------------------------------------------- bubble


class _Timed(torch.autograd.Function):
    """A stage of fixed duration: forward takes t_f, backward t_b (sleeping, like a host waiting
    for an accelerator).  Real CPU compute on this shared 2-core machine runs twice as fast when
    one rank is alone (in the bubble) as when both compute, which no fixed-duration model
    captures; fixed durations make the comparison measure the runtime itself: the order it runs
    the lists in and the cost of its messages."""

    @staticmethod
    def forward(ctx, x, t_f, t_b):
        ctx.t_b = t_b
        time.sleep(t_f)
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.t_b)
        return g, None, None


class _TimedStage(nn.Module):
    def __init__(self, t_f, t_b):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.t_f, self.t_b = t_f, t_b

    def forward(self, x):
        return _Timed.apply(x * self.w, self.t_f, self.t_b)


def job_bubble(schedule, m, virtual, t_f):
    torch.set_num_threads(1)
    mesh = parallel.init_mesh(pp=pycomm.get_world_size())
    # a chunk is 1/v of a device's layers: it takes 1/v of the time (the simulator's model)
    stages = {s: _TimedStage(t_f / virtual, 2 * t_f / virtual)
              for s in pipeline.local_stages(mesh.pp_rank, mesh.pp, virtual)}
    pipe = pipeline.Pipeline(stages, schedule, m, lambda y, t: y.square().mean(), mesh.pp_group, virtual=virtual)
    x = torch.randn(m * 16, 64)
    pipe.step(x, x)  # warm-up (shape probe)
    results = []
    for _ in range(2):
        pycomm.barrier(mesh.pp_group)
        measured = pipe.measured(pipe.step(x, x))
        sim = pipeline.simulate(schedule, mesh.pp, m, virtual, t_fwd=measured.t_fwd, t_bwd=measured.t_bwd)
        results.append((measured.bubble_fraction, sim.bubble_fraction))
    return results


@pytest.mark.parametrize("schedule,m,virtual", [("gpipe", 4, 1), ("1f1b", 4, 1), ("interleaved_1f1b", 4, 2)])
def test_measured_bubble_matches_simulator(run, schedule, m, virtual):
    # 0.1 s per forward: the runtime's fixed costs per action (messages, Python) stay a small
    # part of each chunk's time; at 0.05 s interleaved 1F1B's 8 half-length chunks missed
    # the prediction by 10-12% in about one CI run in three on 2 cores (2026-11-26).
    res = run(2, job_bubble, schedule, m, virtual, 0.1)[0]
    # Best of two steps: another process on the shared cores can only delay a message.
    errs = [abs(meas - sim) / sim for meas, sim in res]
    assert min(errs) <= 0.10, res
