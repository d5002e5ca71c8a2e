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
    ranges = pipeline.partition(len(layers), sched.weight_stages)
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
    # activations held, counted as the simulator counts them, are the simulator's numbers
    assert tuple(r[2] for r in res) == pipeline.simulate(schedule, 2, m, virtual).peak_activations
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


def job_2bw(steps, lr):
    torch.set_num_threads(1)
    mesh = parallel.init_mesh(pp=pycomm.get_world_size())
    layers = _layers()
    stages, held = _stage_modules(layers, mesh.pp_rank, mesh.pp, "pipedream_2bw", 4, 1)
    pipe = pipeline.Pipeline(stages, "pipedream_2bw", 4, _loss, mesh.pp_group)
    params = [q for mod in stages.values() for q in mod.parameters()]
    opt = torch.optim.SGD(params, lr=lr)
    x, t = _batch()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(pipe.step(x, t).loss)
        opt.step()
    weights = {i: [q.detach().clone() for q in layer.parameters()] for pairs in held.values() for i, layer in pairs}
    return losses, weights


def test_pipedream_2bw_matches_its_delayed_update_reference(run):
    # PipeDream-2BW's rule: W(t+1) = W(t) - lr * grad f(W(t-1)), the first step with W(0).
    steps, lr, m = 4, 0.5, 4
    model = nn.Sequential(*_layers())
    x, t = _batch()
    previous = [q.detach().clone() for q in model.parameters()]
    ref_losses = []
    for _ in range(steps):
        current = [q.detach().clone() for q in model.parameters()]
        with torch.no_grad():
            for q, old in zip(model.parameters(), previous):
                q.copy_(old)
        model.zero_grad()
        loss = sum(_loss(model(xi), ti) for xi, ti in zip(x.chunk(m), t.chunk(m))) / m
        loss.backward()
        ref_losses.append(float(loss.detach()))
        with torch.no_grad():
            for q, cur in zip(model.parameters(), current):
                q.copy_(cur - lr * q.grad)
        previous = current
    res = run(2, job_2bw, steps, lr)
    seen = {}
    for losses, weights in res:
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= 1e-6 * abs(b), (losses, ref_losses)
        seen.update(weights)
    ref_weights = iter([q.detach() for q in model.parameters()])
    for i in range(N_LAYERS):
        for q in seen[i]:
            torch.testing.assert_close(q, next(ref_weights), rtol=1e-5, atol=1e-6)
    # and it is not the synchronous rule: the losses differ from plain SGD's after step 2
    sync = nn.Sequential(*_layers())
    opt = torch.optim.SGD(sync.parameters(), lr=lr)
    sync_losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(_loss(sync(xi), ti) for xi, ti in zip(x.chunk(m), t.chunk(m))) / m
        loss.backward()
        opt.step()
        sync_losses.append(float(loss.detach()))
    assert sync_losses[0] == ref_losses[0] and abs(sync_losses[2] - ref_losses[2]) > 1e-4


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


class _Sleep(torch.autograd.Function):
    """Identity that sleeps ``t_f`` in the forward and ``t_b`` in the backward, like a host
    waiting for an accelerator.  Real CPU compute on this shared 2-core machine runs twice as
    fast when one rank is alone (in the bubble) as when both compute, which no fixed-duration
    model captures; fixed durations make the comparison measure the runtime itself: the order
    it runs the lists in and the cost of its messages."""

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
    """Forward t_f; backward t_b, split as the runtime splits it: the input-gradient half (I)
    sleeps on the path to the input, the weight-gradient half (W) on the path to the weight.
    A first stage has no input-gradient to compute, so there both halves sleep in W (what any
    runtime does: its I is empty)."""

    def __init__(self, t_f, t_b, first):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.u = nn.Parameter(torch.ones(()))
        self.t_f, self.t_b, self.first = t_f, t_b, first

    def forward(self, x):
        w = _Sleep.apply(self.w, 0.0, self.t_b / 2)
        if self.first:
            x = x * _Sleep.apply(self.u, 0.0, self.t_b / 2)
        return _Sleep.apply(x, self.t_f, 0.0 if self.first else self.t_b / 2) * w


def job_bubble(schedule, m, virtual, t_f):
    torch.set_num_threads(1)
    mesh = parallel.init_mesh(pp=pycomm.get_world_size())
    sched = pipeline.build_schedule(schedule, mesh.pp, m, virtual)
    # a chunk is a share of a device's layers: it takes that share of the time (the simulator's model)
    share = sched.stage_share
    stages = {s: _TimedStage(t_f * share, 2 * t_f * share, sched.prev_stage(s) is None)
              for s in sched.local_stages(mesh.pp_rank)}
    pipe = pipeline.Pipeline(stages, schedule, m, lambda y, t: y.square().mean(), mesh.pp_group, virtual=virtual)
    x = torch.randn(m * 16, 64)
    pipe.step(x, x)  # warm-up (shape probe)
    results = []
    for _ in range(2):
        pycomm.barrier(mesh.pp_group)
        measured = pipe.measured(pipe.step(x, x))
        # the schedule the runtime ran, timed as it runs a chain's first stage (I empty)
        sim = pipeline.simulate_schedule(pipe.sched, measured.t_fwd, measured.t_bwd, t_input=measured.t_input,
                                         t_weight=measured.t_weight, first_stage_input_grad=False)
        results.append((measured.bubble_fraction, sim.bubble_fraction))
    return results


@pytest.mark.parametrize("schedule,p,m,virtual,t_f", [
    ("gpipe", 2, 4, 1, 0.1), ("1f1b", 2, 4, 1, 0.1), ("interleaved_1f1b", 2, 4, 2, 0.1),
    ("looped_bfs", 2, 4, 2, 0.1), ("zb_h1", 2, 4, 1, 0.1), ("zb_h2", 2, 4, 1, 0.1), ("zb_v", 2, 4, 1, 0.2),
    ("dualpipe_v", 4, 8, 1, 0.2),
    ("chimera", 4, 4, 1, 0.1),  # on 2 ranks Chimera has no bubble to compare with
])
def test_measured_bubble_matches_simulator(run, schedule, p, m, virtual, t_f):
    # t_f per forward: the runtime's fixed costs per action (messages, Python, ~0.4 ms) must stay
    # a small part of each chunk's time, since the simulator's messages take none.  At 0.05 s
    # interleaved 1F1B's 8 half-length chunks missed the prediction by 10-12% in about one CI
    # run in three on 2 cores (2026-11-26).  DualPipe-V's bubble is small (0.06 of the step), so
    # the same overhead is a larger share of it: at 0.1 s its timeline matched the simulator's
    # action by action and the makespan within 0.6%, but the bubble by 12%; at 0.2 s that halves.
    # ZB-V on 2 ranks (bubble 0.078) is the same case: at 0.1 s one CI run in three measured 0.087
    # in both steps, 11% over (2026-11-26), so it runs at 0.2 s too.
    # The stages sleep, so 4 processes on 2 cores keep their durations.
    res = run(p, job_bubble, schedule, m, virtual, t_f)[0]
    # Best of two steps: another process on the shared cores can only delay a message.
    errs = [abs(meas - sim) / sim for meas, sim in res]
    assert min(errs) <= 0.10, res
