"""The pipeline runtime: executes the validated per-rank action lists on real stages.

Contract
--------
``Pipeline(stages, schedule, microbatches, loss_fn, group, virtual=1, checkpoint=False)`` runs on
every rank of a pipeline group (``group.rank`` is the pipeline rank ``r``, ``group.size`` the
number of ranks ``p``); ``schedule`` is any key of ``SCHEDULES``.  ``stages`` maps each model
stage this rank holds (``build_schedule(...).local_stages(r)``: ``r, r+p, ...`` for the loop
placement, ``r`` and ``2p-1-r`` for V and Chimera) to its ``nn.Module``.  A chain's first stage
takes the model input, every other stage the output of ``Schedule.prev_stage``; a chain's last
stage's output goes to ``loss_fn(output, target)``, a scalar mean over the micro-batch.  For
Chimera, stage ``p+s`` is a replica of stage ``s`` (same initial weights, the caller's copy);
after the step both hold the sum of their gradients.  For PipeDream-2BW the step computes with
the previous step's weights (see ``_use_previous_weights``).

``step(inputs, targets)`` (same tensors on every rank; only stage 0 reads ``inputs`` and the last
stage ``targets``) splits them into ``microbatches`` equal micro-batches along dim 0, runs
``add_communication(build_schedule(schedule, p, m, v)).actions[r]`` step by step, and leaves in
the parameters' ``.grad`` the gradient of the mean loss over the micro-batches (each backward is
scaled by ``1/m``), accumulated onto what was there.  It returns a :class:`StepStats` with that
mean loss (the same on every rank), this rank's measured timeline and its peak activations.

Execution of the steps (the model the schedule was validated and simulated under):

* ``F``/``B``: run the stage forward (keeping input, output and autograd graph) or backward;
  ``I``/``W``: the backward's input-gradient half (``autograd.grad`` on the stage input, graph
  kept) and weight-gradient half (``backward(inputs=parameters)``, graph freed); neighbouring
  stages on one rank hand tensors over locally;
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
``bubble_fraction`` is measured from per-stage busy times and whose ``plot`` draws it; its
``t_input``/``t_weight`` are those of stages with an input to differentiate (a chain's first
stage runs an empty I: compare with ``simulate_schedule(..., first_stage_input_grad=False)``).
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
from .actions import Action, Batch, Kind, step_ops
from .comm import add_communication
from .schedules import SCHEDULES, build_schedule
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

    __slots__ = ("x", "y", "bytes", "grad")

    def __init__(self, x, y, nbytes):
        self.x, self.y, self.bytes = x, y, nbytes
        self.grad: torch.Tensor | None = None  # the output-gradient, kept from I for W


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
        self.num_stages = self.sched.num_model_stages
        expected = self.sched.local_stages(r)
        if sorted(stages) != expected:
            raise ValueError(
                f"pipeline rank {r} of {p} with schedule {schedule!r} and virtual={virtual} holds "
                f"model stages {expected}, but stages has keys {sorted(stages)}; pass one module "
                f"per stage (see build_schedule(...).local_stages(rank))"
            )
        self.delayed = not SCHEDULES[schedule].synchronous  # PipeDream-2BW's weight versions
        self._previous: list[torch.Tensor] | None = None
        self.stages = dict(stages)
        self.loss_fn = loss_fn
        self.microbatches = microbatches
        if checkpoint is True:
            self.checkpointed = set(expected)
        elif checkpoint is False:
            self.checkpointed = set()
        else:
            self.checkpointed = set(checkpoint)
        split = {op.stage for st in self.program for op in step_ops(st) if op.kind is Kind.I}
        if self.checkpointed & split:
            raise ValueError(
                f"schedule {schedule!r} splits the backward of stages {sorted(split)} into I and W, "
                f"which would recompute a checkpointed forward twice; checkpoint only stages "
                f"{sorted(set(expected) - split)} or use a schedule with a fused backward"
            )
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
            self._acts[(self.sched.chain(i).start, i)] = xs[i]  # Chimera: two first stages

        current = self._use_previous_weights() if self.delayed else None
        for step in self.program:
            if isinstance(step, Action) and step.kind.is_compute:
                t0 = time.perf_counter()
                if step.kind is Kind.F:
                    loss = self._forward(step.stage, step.microbatch, ts)
                    if loss is not None:
                        losses.append(loss)
                else:
                    self._BACKWARDS[step.kind](self, step.stage, step.microbatch)
                timeline.append(TimedAction(self.group.rank, step, t0, time.perf_counter()))
                # Held activations as the simulator counts them: forwards whose B or I is to come.
                peak = max(peak, sum(e.grad is None for e in self._live.values()))
                peak_bytes = max(peak_bytes, sum(e.bytes for e in self._live.values()))
            else:
                self._communicate(step)
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

        if current is not None:
            self._restore_weights(current)
        if self.sched.placement == "bidirectional":
            self._sum_replica_gradients()
        # Each chain's last stage holds its micro-batches' losses; the others add zero.
        mean = torch.tensor([sum(losses) / m if losses else 0.0], dtype=torch.float64)
        if self.group.size > 1:
            pycomm.all_reduce(mean, group=self.group)
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
        if self.sched.prev_stage(s) is not None:
            x.requires_grad_(True)
        storages: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self._param_storages:
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = self._run_stage(s, x)
            nxt = self.sched.next_stage(s)
            loss = self.loss_fn(y, targets[i]) if nxt is None else None
        storages[x.untyped_storage().data_ptr()] = x.numel() * x.element_size()
        if loss is not None:
            self._live[(s, i)] = _Live(x, loss, sum(storages.values()))
            return float(loss.detach())
        self._live[(s, i)] = _Live(x, y, sum(storages.values()))
        assert nxt is not None  # not the end of a chain: the output goes on
        if self.sched.rank_of(nxt) == self.group.rank:
            self._acts[(nxt, i)] = y.detach()  # same rank: hand over, new graph per stage
        else:
            self._out[(s, i)] = y.detach().contiguous()
        return None

    def _output_and_grad(self, s: int, i: int, live: _Live):
        """What the backward starts from: the scaled loss at a chain's end, else the output and
        the gradient received for it."""
        if self.sched.next_stage(s) is None:
            return live.y / self.microbatches, None
        return live.y, self._grads.pop((s, i))

    def _send_input_grad(self, s: int, i: int, g: torch.Tensor) -> None:
        prev = self.sched.prev_stage(s)
        assert prev is not None  # only stages with a previous stage send an input-gradient
        if self.sched.rank_of(prev) == self.group.rank:
            self._grads[(prev, i)] = g
        else:
            self._gin[(s, i)] = g.contiguous()

    def _backward(self, s: int, i: int) -> None:
        """B: the whole backward, input- and weight-gradients in one autograd pass."""
        live = self._live.pop((s, i))
        out, grad = self._output_and_grad(s, i, live)
        torch.autograd.backward(out, grad)
        if self.sched.prev_stage(s) is not None:
            self._send_input_grad(s, i, live.x.grad if live.x.grad is not None else torch.zeros_like(live.x))

    def _input_backward(self, s: int, i: int) -> None:
        """I: only the gradient the previous stage waits for; the graph is kept for W.

        The two halves each walk the stage's graph, so a split backward costs one extra pass
        over the non-matmul nodes; what the schedule gains is that the previous stage gets its
        gradient a W earlier."""
        live = self._live[(s, i)]
        out, grad = self._output_and_grad(s, i, live)
        # The loss's gradient is implicit (None); a placeholder marks the I as done.
        live.y, live.grad = out, grad if grad is not None else torch.ones_like(out)
        if self.sched.prev_stage(s) is None:
            return  # the first stage has no input-gradient to send: W does all the work
        (g,) = torch.autograd.grad(out, live.x, grad, retain_graph=True)
        self._send_input_grad(s, i, g)

    def _weight_backward(self, s: int, i: int) -> None:
        """W: the parameters' gradients, accumulated into ``.grad``; frees the graph."""
        live = self._live.pop((s, i))
        params = [q for q in self.stages[s].parameters() if q.requires_grad]
        if params:
            torch.autograd.backward(live.y, live.grad, inputs=params)

    _BACKWARDS = {Kind.B: _backward, Kind.I: _input_backward, Kind.W: _weight_backward}

    # ------------------------------------------------------------------ weights

    def _params(self) -> list[torch.Tensor]:
        return [q for s in sorted(self.stages) for q in self.stages[s].parameters()]

    def _use_previous_weights(self) -> list[torch.Tensor]:
        """PipeDream-2BW: compute this step with the weights of one step ago (the first step
        with the current ones); returns the current ones to put back."""
        params = self._params()
        current = [q.data for q in params]
        if self._previous is None:
            self._previous = [t.clone() for t in current]
        for q, old in zip(params, self._previous):
            q.data = old
        return current

    def _restore_weights(self, current: list[torch.Tensor]) -> None:
        params = self._params()
        for q, cur in zip(params, current):
            q.data = cur
        # The version the next step computes with: these weights, before the optimizer step
        # that follows this one (the 1-stale update).
        self._previous = [t.clone() for t in current]

    def _sum_replica_gradients(self) -> None:
        """Chimera: stage ``s`` (down pipeline) and ``p+s`` (up pipeline) hold the same weights;
        each gets the sum of both replicas' gradients, so they stay equal under any optimizer.
        Rank ``r``'s replicas live on rank ``p-1-r``."""
        p, r = self.group.size, self.group.rank
        mine = sorted(self.stages)
        flat = [torch.cat([q.grad.reshape(-1) if q.grad is not None else torch.zeros(q.numel(), dtype=q.dtype)
                           for q in self.stages[s].parameters()]) for s in mine]
        partner = p - 1 - r  # never r: chimera needs an even p
        recv = [torch.empty_like(flat[1]), torch.empty_like(flat[0])]  # partner's, in its order
        ops = [pycomm.P2POp(pycomm.isend, f, partner, self.group) for f in flat]
        ops += [pycomm.P2POp(pycomm.irecv, t, partner, self.group) for t in recv]
        for w in pycomm.batch_isend_irecv(ops):
            w.wait()
        # The partner's stages, ascending, are the replicas of mine in reverse order.  Adding in
        # replica order (down pipeline first) gives both ranks the same bits.
        down_first = [(flat[0], recv[1]), (recv[0], flat[1])]
        sums = {mine[k]: down_first[k][0] + down_first[k][1] for k in range(2)}
        for s in mine:
            offset = 0
            for q in self.stages[s].parameters():
                g = sums[s][offset:offset + q.numel()].view_as(q)
                offset += q.numel()
                if q.grad is None:
                    q.grad = g.clone()
                else:
                    q.grad.copy_(g)

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
        me = self.group.rank
        modes = {s: mod.training for s, mod in self.stages.items()}
        x: torch.Tensor | None = None
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            tp_state = prandom.tensor_parallel_generator().get_state()
            try:
                # Chain by chain, in order: every rank walks the same global order, so the
                # blocking sends and receives below always meet.
                chains = sorted({tuple(self.sched.chain(i)) for i in range(self.microbatches)})
                for s in (s for chain in chains for s in chain):
                    if self.sched.rank_of(s) != me:
                        continue
                    prev, nxt = self.sched.prev_stage(s), self.sched.next_stage(s)
                    if prev is None:
                        x = x0
                    elif self.sched.rank_of(prev) != me:
                        src = self.sched.rank_of(prev)
                        header = torch.zeros(10, dtype=torch.int64)
                        pycomm.recv(header, src, group=self.group)
                        shape = tuple(header[2:2 + int(header[1])].tolist())
                        x = torch.empty(shape, dtype=_DTYPES[int(header[0])])
                        pycomm.recv(x, src, group=self.group)
                    assert x is not None  # stage s's input: x0, received, or computed here
                    self._shapes[s] = (tuple(x.shape), x.dtype)
                    self.stages[s].eval()
                    y = self.stages[s](x).contiguous()
                    if nxt is not None and self.sched.rank_of(nxt) != me:
                        dst = self.sched.rank_of(nxt)
                        if y.dim() > 8 or y.dtype not in _DTYPES:
                            raise ValueError(f"stage {s} outputs a {y.dim()}-d {y.dtype} tensor; the "
                                             f"pipeline passes tensors of at most 8 dims of {_DTYPES}")
                        header = torch.zeros(10, dtype=torch.int64)
                        header[0], header[1] = _DTYPES.index(y.dtype), y.dim()
                        header[2:2 + y.dim()] = torch.tensor(y.shape)
                        pycomm.send(header, dst, group=self.group)
                        pycomm.send(y, dst, group=self.group)
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
        computes = [[st for st in prog if isinstance(st, Action) and st.kind.is_compute]
                    for prog in self.sched.actions]
        n = max(len(c) for c in computes)  # ranks may run different counts (B vs I+W): pad
        rows_mine = [[t.start, t.end] for t in stats.timeline]
        rows_mine += [[0.0, 0.0]] * (n - len(rows_mine)) + [[stats.peak_activations, 0]]
        mine = torch.tensor(rows_mine, dtype=torch.float64).view(-1)
        every = torch.empty(self.group.size * mine.numel(), dtype=torch.float64)
        if self.group.size > 1:
            pycomm.all_gather(every, mine, group=self.group)
        else:
            every.copy_(mine)
        every = every.view(self.group.size, n + 1, 2)
        peaks = tuple(int(every[r, n, 0]) for r in range(self.group.size))
        t0 = min(float(every[r, 0, 0]) for r in range(self.group.size) if computes[r])
        rows: list = []
        took: dict[str, list[float]] = {}
        first_split: dict[str, list[float]] = {}  # a chain's first stage: empty I, whole-backward W
        for r in range(self.group.size):
            row = []
            for k, act in enumerate(computes[r]):
                a, b = float(every[r, k, 0]) - t0, float(every[r, k, 1]) - t0
                row.append(TimedAction(r, act, a, b))
                key = act.kind.info.duration
                assert key is not None  # a computation
                first = key in ("input", "weight") and self.sched.prev_stage(act.stage) is None
                (first_split if first else took).setdefault(key, []).append(b - a)
            rows.append(tuple(row))
        for key, times in first_split.items():
            if key not in took:  # one stage only: nothing better to go on
                took[key] = times
        makespan = max(t.end for row in rows for t in row)
        # Back to full-stage units, the simulator's convention.
        full = {k: sum(v) / len(v) / self.sched.stage_share for k, v in took.items()}
        t_input, t_weight = full.get("input"), full.get("weight")
        t_bwd = full.get("bwd", (t_input or 0.0) + (t_weight or 0.0))
        if "bwd" in full and (t_input is None) != (t_weight is None):
            t_input = t_weight = None
        return SimulationResult(
            self.sched, full["fwd"], t_bwd, tuple(rows), makespan, peaks, t_input, t_weight,
        )
