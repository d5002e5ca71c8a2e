"""The pipeline runtime: executes the validated per-rank action lists on real stages.

Contract
--------
``Pipeline(stages, schedule, microbatches, loss_fn, group, virtual=1, checkpoint=False)`` runs on
every rank of a pipeline group (``group.rank`` is the pipeline rank ``r``, ``group.size`` the
number of ranks ``p``).  ``stages`` maps each model stage this rank holds (``r, r+p, ...``, see
``stages.local_stages``) to its ``nn.Module``.  Stage 0 takes the model input, stage ``s`` the
output of stage ``s-1``; the last stage's output goes to ``loss_fn(output, target)``, a scalar
mean over the micro-batch.

``step(inputs, targets)`` (same tensors on every rank; only stage 0 reads ``inputs`` and the last
stage ``targets``) splits them into ``microbatches`` equal micro-batches along dim 0, runs
``add_communication(build_schedule(schedule, p, m, v)).actions[r]`` step by step, and leaves in
the parameters' ``.grad`` the gradient of the mean loss over the micro-batches (each backward is
scaled by ``1/m``), accumulated onto what was there.  It returns a :class:`StepStats` with that
mean loss (the same on every rank), this rank's measured timeline and its peak activations.

Execution of the steps (the model the schedule was validated and simulated under):

* ``F``/``B``: run the stage forward (keeping input, output and autograd graph) or backward;
  neighbouring stages on one rank hand tensors over locally;
* a single ``SEND_F``/``SEND_B``: ``pycomm.isend``, waited for at the end of the step (the tensor
  stays referenced until then, so its buffer is never reused early): a send never holds its
  rank back, which is what the simulator assumes;
* a single ``RECV_F``/``RECV_B``: blocking ``pycomm.recv``;
* a ``Batch``: ``pycomm.batch_isend_irecv`` of all its messages, then wait for all.

Receive buffers need shapes.  The first step with a new input shape runs a *shape probe*: the
stages, in model order, run micro-batch 0 under ``no_grad`` in eval mode with forked RNG (so the
probe changes no random stream) and pass the output shape and data along the chain, blocking.
All micro-batches must then have that shape.

Activation checkpointing (``checkpoint=True``, or a set of model stages): the stage keeps only
its input and recomputes its forward during the backward, with both random streams restored
(``parallel.random``), so dropout masks are the same as in the first forward.

Measurement: each F/B is timed with ``time.perf_counter`` (one clock for all processes of a
host).  :meth:`Pipeline.measured` gathers all ranks' timelines into a
:class:`~.simulate.SimulationResult` (times in seconds from the first start) whose
``bubble_fraction`` is measured from per-stage busy times and whose ``plot`` draws it.
Activations alive are counted per (stage, micro-batch) like the simulator's
``peak_activations``, and in bytes: the stage input plus the tensors autograd saved for the
backward (parameters excluded).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

import pycomm
from pycomm.distributed import Group

from .. import random as prandom
from .comm import add_communication
from .schedules import Action, Batch, Kind, build_schedule
from .simulate import SimulationResult, TimedAction
from .validate import validate

__all__ = ["Pipeline", "StepStats"]

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32]


@dataclass
class StepStats:
    """What one ``Pipeline.step`` measured on this rank."""

    loss: float
    """Mean loss over the micro-batches (broadcast from the last stage to every rank)."""
    timeline: list[TimedAction] = field(repr=False)
    """This rank's computations, start/end in ``time.perf_counter`` seconds."""
    peak_activations: int = 0
    """Most (stage, micro-batch) forwards alive at once on this rank."""
    peak_activation_bytes: int = 0
    """Most bytes of kept activations (stage inputs + saved tensors) at once on this rank."""


class _Live:
    """What a forward keeps until its backward."""

    __slots__ = ("x", "y", "bytes")

    def __init__(self, x, y, nbytes):
        self.x, self.y, self.bytes = x, y, nbytes


class Pipeline:
    """Runs one schedule's action lists for this pipeline rank (see module docstring)."""

    def __init__(self, stages: Mapping[int, nn.Module], schedule: str, microbatches: int,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], group: Group,
                 virtual: int = 1, checkpoint: bool | Iterable[int] = False):
        self.group = group
        p, r = group.size, group.rank
        self.sched = add_communication(build_schedule(schedule, p, microbatches, virtual))
        validate(self.sched)
        self.program = self.sched.actions[r]
        self.num_stages = p * virtual
        expected = sorted(s for s in range(self.num_stages) if s % p == r)
        if sorted(stages) != expected:
            raise ValueError(
                f"pipeline rank {r} of {p} with virtual={virtual} holds model stages {expected}, "
                f"but stages has keys {sorted(stages)}; pass one module per stage (see "
                f"parallel.pipeline.local_stages)"
            )
        self.stages = dict(stages)
        self.loss_fn = loss_fn
        self.microbatches = microbatches
        if checkpoint is True:
            self.checkpointed = set(expected)
        elif checkpoint is False:
            self.checkpointed = set()
        else:
            self.checkpointed = set(checkpoint)
        self._shapes: dict[int, tuple] = {}
        self._probe_key: tuple | None = None
        self._param_storages = {q.untyped_storage().data_ptr()
                                for mod in self.stages.values() for q in mod.parameters()}
        self.last_stats: StepStats | None = None

    # ------------------------------------------------------------------ one step

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        m = self.microbatches
        if inputs.shape[0] % m or targets.shape[0] % m:
            raise ValueError(
                f"the batch ({inputs.shape[0]} samples) must split into microbatches={m} equal "
                f"micro-batches; use a batch size that is a multiple of {m}"
            )
        xs, ts = inputs.chunk(m), targets.chunk(m)
        key = (tuple(xs[0].shape), xs[0].dtype)
        if key != self._probe_key:
            self._probe(xs[0])
            self._probe_key = key

        self._acts: dict[tuple[int, int], torch.Tensor] = {}   # inputs of F, by (stage, mb)
        self._grads: dict[tuple[int, int], torch.Tensor] = {}  # output grads for B
        self._out: dict[tuple[int, int], torch.Tensor] = {}    # outputs waiting for SEND_F
        self._gin: dict[tuple[int, int], torch.Tensor] = {}    # input grads waiting for SEND_B
        self._live: dict[tuple[int, int], _Live] = {}
        self._pending: list[tuple[pycomm.Work, torch.Tensor]] = []
        losses, timeline = [], []
        peak, peak_bytes = 0, 0
        for i in range(m):
            self._acts[(0, i)] = xs[i]

        for step in self.program:
            if isinstance(step, Action) and step.kind.is_compute:
                t0 = time.perf_counter()
                if step.kind is Kind.F:
                    loss = self._forward(step.stage, step.microbatch, ts)
                    if loss is not None:
                        losses.append(loss)
                else:
                    self._backward(step.stage, step.microbatch)
                timeline.append(TimedAction(self.group.rank, step, t0, time.perf_counter()))
                peak = max(peak, len(self._live))
                peak_bytes = max(peak_bytes, sum(e.bytes for e in self._live.values()))
            else:
                self._communicate(step)
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

        mean = torch.tensor([sum(losses) / m if losses else 0.0], dtype=torch.float64)
        if self.group.size > 1:
            pycomm.broadcast(mean, (self.num_stages - 1) % self.group.size, group=self.group)
        self.last_stats = StepStats(float(mean), timeline, peak, peak_bytes)
        return self.last_stats

    # ------------------------------------------------------------------ computations

    def _run_stage(self, s: int, x: torch.Tensor) -> torch.Tensor:
        mod = self.stages[s]
        if s not in self.checkpointed:
            return mod(x)
        saved = prandom.get_rng_state()
        first = [True]

        def run(inp):
            # Recompute with the random streams of the first forward, then put them back.
            if first[0]:
                first[0] = False
                return mod(inp)
            now = prandom.get_rng_state()
            prandom.set_rng_state(saved)
            try:
                return mod(inp)
            finally:
                prandom.set_rng_state(now)

        return _torch_checkpoint(run, x, use_reentrant=False, preserve_rng_state=False)

    def _forward(self, s: int, i: int, targets) -> float | None:
        x = self._acts.pop((s, i))
        if s > 0:
            x.requires_grad_(True)
        storages: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self._param_storages:
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = self._run_stage(s, x)
            loss = self.loss_fn(y, targets[i]) if s == self.num_stages - 1 else None
        storages[x.untyped_storage().data_ptr()] = x.numel() * x.element_size()
        if loss is not None:
            self._live[(s, i)] = _Live(x, loss, sum(storages.values()))
            return float(loss.detach())
        self._live[(s, i)] = _Live(x, y, sum(storages.values()))
        if self.sched.rank_of(s + 1) == self.group.rank:
            self._acts[(s + 1, i)] = y.detach()  # same rank: hand over, new graph per stage
        else:
            self._out[(s, i)] = y.detach().contiguous()
        return None

    def _backward(self, s: int, i: int) -> None:
        live = self._live.pop((s, i))
        if s == self.num_stages - 1:
            (live.y / self.microbatches).backward()
        else:
            torch.autograd.backward(live.y, self._grads.pop((s, i)))
        if s == 0:
            return
        g = live.x.grad if live.x.grad is not None else torch.zeros_like(live.x)
        if self.sched.rank_of(s - 1) == self.group.rank:
            self._grads[(s - 1, i)] = g
        else:
            self._gin[(s, i)] = g.contiguous()

    # ------------------------------------------------------------------ messages

    def _p2p(self, op: Action) -> tuple[object, torch.Tensor, int]:
        """(isend/irecv, tensor, peer) for one message; receive buffers are allocated here."""
        peer = self.sched.peer(op)
        assert peer is not None  # op is a message
        s, i = op.stage, op.microbatch
        if op.kind is Kind.SEND_F:
            return pycomm.isend, self._out.pop((s, i)), peer
        if op.kind is Kind.SEND_B:
            return pycomm.isend, self._gin.pop((s, i)), peer
        if op.kind is Kind.RECV_F:
            shape, dtype = self._shapes[s]
            buf = torch.empty(shape, dtype=dtype)
            self._acts[(s, i)] = buf
            return pycomm.irecv, buf, peer
        buf = torch.empty_like(self._live[(s, i)].y)
        self._grads[(s, i)] = buf
        return pycomm.irecv, buf, peer

    def _communicate(self, step) -> None:
        if isinstance(step, Batch):
            ops = [self._p2p(op) for op in step.ops]
            works = pycomm.batch_isend_irecv([pycomm.P2POp(f, t, peer, self.group) for f, t, peer in ops])
            for w in works:
                w.wait()
            return
        fn, t, peer = self._p2p(step)
        if fn is pycomm.isend:
            self._pending.append((pycomm.isend(t, peer, group=self.group), t))
            # Drop finished sends early so their tensors can be freed.
            self._pending = [(w, x) for w, x in self._pending if not w.is_completed()]
        else:
            pycomm.recv(t, peer, group=self.group)

    # ------------------------------------------------------------------ shape probe

    def _probe(self, x0: torch.Tensor) -> None:
        """Learn the input shape of every stage this rank receives (module docstring)."""
        p, me = self.group.size, self.group.rank
        modes = {s: mod.training for s, mod in self.stages.items()}
        x: torch.Tensor | None = None
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            tp_state = prandom.tensor_parallel_generator().get_state()
            try:
                for s in range(self.num_stages):
                    if s % p != me:
                        continue
                    if s == 0:
                        x = x0
                    elif (s - 1) % p != me:
                        header = torch.zeros(10, dtype=torch.int64)
                        pycomm.recv(header, (s - 1) % p, group=self.group)
                        shape = tuple(header[2:2 + int(header[1])].tolist())
                        x = torch.empty(shape, dtype=_DTYPES[int(header[0])])
                        pycomm.recv(x, (s - 1) % p, group=self.group)
                    assert x is not None  # stage s's input: x0, received, or computed here
                    self._shapes[s] = (tuple(x.shape), x.dtype)
                    self.stages[s].eval()
                    y = self.stages[s](x).contiguous()
                    if s + 1 < self.num_stages and (s + 1) % p != me:
                        if y.dim() > 8 or y.dtype not in _DTYPES:
                            raise ValueError(f"stage {s} outputs a {y.dim()}-d {y.dtype} tensor; the "
                                             f"pipeline passes tensors of at most 8 dims of {_DTYPES}")
                        header = torch.zeros(10, dtype=torch.int64)
                        header[0], header[1] = _DTYPES.index(y.dtype), y.dim()
                        header[2:2 + y.dim()] = torch.tensor(y.shape)
                        pycomm.send(header, (s + 1) % p, group=self.group)
                        pycomm.send(y, (s + 1) % p, group=self.group)
                    x = y
            finally:
                prandom.tensor_parallel_generator().set_state(tp_state)
                for s, mod in self.stages.items():
                    mod.train(modes[s])

    # ------------------------------------------------------------------ measurement

    def measured(self, stats: StepStats | None = None) -> SimulationResult:
        """All ranks' timelines of a step as a SimulationResult (collective over the group)."""
        stats = stats or self.last_stats
        if stats is None:
            raise RuntimeError("Pipeline.measured: run step() first")
        n = len(stats.timeline)
        mine = torch.tensor([[t.start, t.end] for t in stats.timeline] + [[stats.peak_activations, 0]],
                            dtype=torch.float64).view(-1)
        every = torch.empty(self.group.size * mine.numel(), dtype=torch.float64)
        if self.group.size > 1:
            pycomm.all_gather(every, mine, group=self.group)
        else:
            every.copy_(mine)
        every = every.view(self.group.size, n + 1, 2)
        peaks = tuple(int(every[r, n, 0]) for r in range(self.group.size))
        every = every[:, :n]
        t0 = float(every[..., 0].min())
        rows: list = []
        fwd: list = []
        bwd: list = []
        computes = [[st for st in prog if isinstance(st, Action) and st.kind.is_compute]
                    for prog in self.sched.actions]
        for r in range(self.group.size):
            row = []
            for k, act in enumerate(computes[r]):
                a, b = float(every[r, k, 0]) - t0, float(every[r, k, 1]) - t0
                row.append(TimedAction(r, act, a, b))
                (fwd if act.kind is Kind.F else bwd).append(b - a)
            rows.append(tuple(row))
        makespan = max(t.end for row in rows for t in row)
        v = self.sched.virtual
        return SimulationResult(
            self.sched, v * sum(fwd) / len(fwd), v * sum(bwd) / len(bwd), tuple(rows), makespan,
            peaks,
        )
