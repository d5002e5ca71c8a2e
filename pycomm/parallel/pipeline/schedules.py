"""Pipeline-parallel schedules: one function per schedule, and the registry that names them.

Contract
--------
Each schedule function returns a compute-only :class:`~.actions.Schedule` (the data model, the
action kinds F/B/I/W and the placements are in ``actions.py``).  ``comm.add_communication`` is
the separate lowering pass that inserts the messages; ``validate.validate`` checks the result;
``simulate`` times it; ``runtime.Pipeline`` runs it.

:data:`SCHEDULES` is the one registry: name -> :class:`ScheduleSpec` (its builder, how many
model chunks per rank it takes, whether it is synchronous, a one-line summary).
:func:`build_schedule`, the table command and ``examples/train_gpt.py`` read only the registry,
so adding a schedule is its function plus one registry row.

Schedules whose order follows a paper's hand-made figure are written out directly (GPipe, 1F1B,
interleaved 1F1B, looped BFS, ZB-V and DualPipe-V, the last two as in
``torch.distributed.pipelining``).  ZB-H1, ZB-H2 and Chimera come from :func:`_list_schedule`,
the greedy list scheduler of the zero-bubble paper's heuristic (each rank, whenever it is free,
runs a backward if one is ready, else a forward if its activation budget allows, else a pending
weight-gradient): their difference is the activation budget per rank and the placement.
"""
from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .actions import (
    KIND_INFO,
    Action,
    Batch,
    Kind,
    Schedule,
    ScheduleError,
    Step,
    format_program,
    parse_program,
    parse_step,
    step_ops,
)

__all__ = [
    "Kind",
    "KIND_INFO",
    "Action",
    "Batch",
    "Step",
    "Schedule",
    "ScheduleError",
    "ScheduleSpec",
    "SCHEDULES",
    "gpipe",
    "one_f_one_b",
    "interleaved_1f1b",
    "looped_bfs",
    "zb_h1",
    "zb_h2",
    "zb_v",
    "dualpipe_v",
    "chimera",
    "pipedream_2bw",
    "build_schedule",
    "parse_step",
    "format_program",
    "parse_program",
    "step_ops",
]


def _check_common(name: str, stages: int, microbatches: int, virtual: int) -> None:
    for arg, value in (("stages", stages), ("microbatches", microbatches), ("virtual", virtual)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name}: {arg} must be an int, got {value!r}")
    if stages < 1:
        raise ValueError(f"{name}: stages must be >= 1 (one per pipeline rank), got stages={stages}")
    if microbatches < 1:
        raise ValueError(f"{name}: microbatches must be >= 1, got microbatches={microbatches}")
    if virtual < 1:
        raise ValueError(
            f"{name}: virtual (model chunks per device) must be >= 1, got virtual={virtual}; "
            f"use virtual=1 for no interleaving"
        )


def gpipe(stages: int, microbatches: int) -> Schedule:
    """GPipe: every rank runs all forwards, then all backwards (ascending micro-batch order, as
    ``torch.distributed.pipelining.ScheduleGPipe``).  Peak activations: all ``m`` micro-batches."""
    _check_common("gpipe", stages, microbatches, 1)
    p, m = stages, microbatches
    actions = [
        [Action(r, Kind.F, i) for i in range(m)] + [Action(r, Kind.B, i) for i in range(m)]
        for r in range(p)
    ]
    return Schedule("gpipe", p, m, 1, actions)


def one_f_one_b(stages: int, microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush, Megatron's non-interleaved schedule).

    Rank ``r`` runs ``p-1-r`` warm-up forwards, then alternates one forward and one backward,
    then drains the remaining backwards.  At most ``p-r`` micro-batches are in flight on rank
    ``r``, instead of GPipe's ``m``; the bubble is the same as GPipe's.
    """
    _check_common("1f1b", stages, microbatches, 1)
    p, m = stages, microbatches
    if m < p:
        raise ValueError(
            f"fewer micro-batches than stages for 1F1B: got microbatches={m}, stages={p}; "
            f"use microbatches >= {p} (more also shrinks the bubble) or the 'gpipe' schedule"
        )
    actions = []
    for r in range(p):
        warmup = p - 1 - r
        prog = [Action(r, Kind.F, i) for i in range(warmup)]
        for i in range(m - warmup):
            prog += [Action(r, Kind.F, warmup + i), Action(r, Kind.B, i)]
        prog += [Action(r, Kind.B, i) for i in range(m - warmup, m)]
        actions.append(prog)
    return Schedule("1f1b", p, m, 1, actions)


def interleaved_1f1b(stages: int, microbatches: int, virtual: int = 2) -> Schedule:
    """Megatron's interleaved 1F1B with ``virtual`` model chunks per rank.

    Rank ``r`` holds model stages ``r, r+p, ..., r+(v-1)p``.  Its forwards walk micro-batches in
    groups of ``p``: for each group, chunk 0 on the ``p`` micro-batches, then chunk 1, ...;
    backwards walk the same way with the chunks reversed.  Warm-up is
    ``2(p-1-r) + (v-1)p`` forwards (Megatron ``get_pp_rank_microbatches``), then one forward and
    one backward alternate.  The bubble shrinks by ``v`` (each chunk's work is 1/v of a stage)
    at the price of ``v`` times more messages.  With ``virtual=1`` this is exactly 1F1B, as in
    Megatron, which dispatches v=1 to its non-interleaved schedule.
    """
    _check_common("interleaved_1f1b", stages, microbatches, virtual)
    p, m, v = stages, microbatches, virtual
    if m % p != 0:
        lo, hi = (m // p) * p, (m // p + 1) * p
        hint = f"{lo} or {hi}" if lo > 0 else f"{hi}"
        raise ValueError(
            f"interleaved_1f1b needs microbatches divisible by stages (micro-batches go through "
            f"the chunks in groups of p): got microbatches={m}, stages={p}; use a multiple of "
            f"{p}, e.g. {hint}"
        )
    if v == 1:
        return Schedule("interleaved_1f1b", p, m, 1, one_f_one_b(p, m).actions)

    total = m * v  # forwards (and backwards) per rank

    def fwd(r: int, i: int) -> Action:
        chunk = (i // p) % v
        return Action(chunk * p + r, Kind.F, (i // (p * v)) * p + i % p)

    def bwd(r: int, i: int) -> Action:
        chunk = v - 1 - (i // p) % v
        return Action(chunk * p + r, Kind.B, (i // (p * v)) * p + i % p)

    actions = []
    for r in range(p):
        warmup = min(2 * (p - 1 - r) + (v - 1) * p, total)
        prog = [fwd(r, i) for i in range(warmup)]
        for i in range(total - warmup):
            prog += [fwd(r, warmup + i), bwd(r, i)]
        prog += [bwd(r, i) for i in range(total - warmup, total)]
        actions.append(prog)
    return Schedule("interleaved_1f1b", p, m, v, actions)


def looped_bfs(stages: int, microbatches: int, virtual: int = 2) -> Schedule:
    """Looped BFS (Lamy-Poirier, "Breadth-First Pipeline Parallelism", 2022), as
    ``torch.distributed.pipelining.ScheduleLoopedBFS``: each rank runs all micro-batches through
    its first chunk, then its second, ... (breadth first), then the backwards chunk by chunk in
    reverse.  GPipe's memory (all ``m`` micro-batches per chunk) for fewer, larger hand-overs;
    the bubble is GPipe's divided by ``v`` once ``m >= p``."""
    _check_common("looped_bfs", stages, microbatches, virtual)
    p, m, v = stages, microbatches, virtual
    actions = []
    for r in range(p):
        mine = [c * p + r for c in range(v)]
        prog = [Action(s, Kind.F, i) for s in mine for i in range(m)]
        prog += [Action(s, Kind.B, i) for s in reversed(mine) for i in reversed(range(m))]
        actions.append(prog)
    return Schedule("looped_bfs", p, m, v, actions)


# Unit durations the greedy schedules are built for: the zero-bubble paper's T_F = T_B = T_W
# (B there is our I).  The simulator can then time them with any durations.
_BUILD_TIME = {Kind.F: 1.0, Kind.I: 1.0, Kind.W: 1.0, Kind.B: 2.0}


def _list_schedule(name: str, p: int, m: int, placement: str, virtual: int,
                   budget: Callable[[int], int], split: bool, forward_first: bool = False) -> Schedule:
    """Greedy list scheduling in simulated time (module docstring): whenever a rank is free it
    runs the oldest ready backward (I if ``split``, else B), else the next forward of a stage
    holding fewer than ``budget(k)`` micro-batches' activations (``k``: the stage's position in
    its chain), else the oldest pending W."""
    skel = Schedule(name, p, m, virtual, [[] for _ in range(p)], placement)
    nstages = skel.num_model_stages
    fwd_order = {s: deque(i for i in range(m) if s in skel.chain(i)) for s in range(nstages)}
    bwd_order: dict[int, deque[int]] = {s: deque() for s in range(nstages)}
    end: dict[tuple[Kind, int, int], float] = {}
    clock, held = [0.0] * p, [0] * nstages
    weights: list[deque[Action]] = [deque() for _ in range(p)]
    programs: list[list[Action]] = [[] for _ in range(p)]
    back = Kind.I if split else Kind.B
    left = [sum(len(fwd_order[s]) for s in skel.local_stages(r)) * (3 if split else 2) for r in range(p)]

    def ready(key: tuple[Kind, int, int], t: float) -> bool:
        return key in end and end[key] <= t

    def choose(r: int, t: float) -> Action | None:
        first, then = (forwards, backwards) if forward_first else (backwards, forwards)
        return first(r, t) or then(r, t) or (weights[r].popleft() if weights[r] else None)

    def backwards(r: int, t: float) -> Action | None:
        # Backward first: it unblocks the previous stage and frees memory.  Among stages, the
        # gradient that arrived first.
        cands = []
        for s in skel.local_stages(r):
            if bwd_order[s]:
                i = bwd_order[s][0]
                nxt = skel.next_stage(s)
                key = (Kind.F, s, i) if nxt is None else (back, nxt, i)
                if ready((Kind.F, s, i), t) and ready(key, t):
                    cands.append((end[key], -s, Action(s, back, i)))
        if cands:
            pick = min(cands)[2]
            bwd_order[pick.stage].popleft()
            if split:
                weights[r].append(Action(pick.stage, Kind.W, pick.microbatch))
            return pick
        return None

    def forwards(r: int, t: float) -> Action | None:
        cands = []
        for s in skel.local_stages(r):
            if fwd_order[s] and held[s] < budget(s - skel.chain(fwd_order[s][0]).start):
                i = fwd_order[s][0]
                prv = skel.prev_stage(s)
                if prv is None or ready((Kind.F, prv, i), t):
                    cands.append((0.0 if prv is None else end[(Kind.F, prv, i)], s, Action(s, Kind.F, i)))
        if cands:
            pick = min(cands)[2]
            fwd_order[pick.stage].popleft()
            bwd_order[pick.stage].append(pick.microbatch)
            return pick
        return None

    while any(left):
        t = min(clock[q] for q in range(p) if left[q])
        now = [q for q in range(p) if left[q] and clock[q] == t]
        progressed = False
        for r in now:
            pick = choose(r, t)
            if pick is None:
                continue
            held[pick.stage] += KIND_INFO[pick.kind].activations
            clock[r] = t + _BUILD_TIME[pick.kind]
            end[(pick.kind, pick.stage, pick.microbatch)] = clock[r]
            programs[r].append(pick)
            left[r] -= 1
            progressed = True
        if progressed:
            continue
        # Nobody can act at t: wait for the next computation to end.
        later = [e for e in end.values() if e > t] + [clock[q] for q in range(p) if left[q] and clock[q] > t]
        if not later:
            raise ScheduleError(
                f"{name}: ranks {now} can run nothing within their activation budgets "
                f"(stages={p}, microbatches={m}); raise the budget"
            )
        for r in now:
            clock[r] = min(later)
    return Schedule(name, p, m, virtual, programs, placement)


def zb_h1(stages: int, microbatches: int) -> Schedule:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): 1F1B with the backward
    split into I and W and the W passes moved into the bubbles, at 1F1B's activation memory
    (rank ``r`` holds at most ``p-r`` micro-batches).  Bubble with T_F = T_I = T_W:
    ``(p-1)(T_F + T_I - T_W)`` per rank, a third of 1F1B's ``(p-1)(T_F + T_I + T_W)``."""
    _check_common("zb_h1", stages, microbatches, 1)
    p, m = stages, microbatches
    return _list_schedule("zb_h1", p, m, "loop", 1, lambda k: p - k, split=True)


def zb_h2(stages: int, microbatches: int) -> Schedule:
    """ZB-H2 (same paper): more warm-up forwards so that rank ``r`` may hold ``2(p-r)-1``
    micro-batches, about twice 1F1B's memory, which fills the warm-up bubble too: with
    ``T_F = T_I = T_W`` only the unavoidable ramp at the start and end is left."""
    _check_common("zb_h2", stages, microbatches, 1)
    p, m = stages, microbatches
    return _list_schedule("zb_h2", p, m, "loop", 1, lambda k: 2 * (p - k) - 1, split=True)


def chimera(stages: int, microbatches: int) -> Schedule:
    """Chimera (Li and Hoefler, SC21): two replicas of the ``p``-stage model run as two
    pipelines in opposite directions (placement ``"bidirectional"``: rank ``r`` holds stage
    ``r`` of the down pipeline and stage ``p-1-r`` of the up pipeline); the first half of the
    micro-batches goes down, the second half up, and each rank fills one pipeline's bubbles
    with the other's work.  After the step, each stage's gradient is summed over its two
    replicas (the runtime does it; ``Schedule.replica_of``).  Needs an even ``p`` and an even
    ``m``, as in the paper; activations held per rank: at most ``p`` micro-batches' worth of
    half-model stages, 1F1B's memory."""
    _check_common("chimera", stages, microbatches, 1)
    p, m = stages, microbatches
    if p % 2 or m % 2:
        raise ValueError(
            f"chimera pairs each down-pipeline stage with an up-pipeline stage and splits the "
            f"micro-batches in two halves: needs even stages and microbatches, got stages={p}, "
            f"microbatches={m}; use e.g. stages={p + p % 2}, microbatches={m + m % 2}"
        )
    return _list_schedule("chimera", p, m, "bidirectional", 2, lambda k: p - k, split=False, forward_first=True)


def zb_v(stages: int, microbatches: int) -> Schedule:
    """ZB-V (the zero-bubble paper's V-shaped schedule, section 6), as
    ``torch.distributed.pipelining.ScheduleZBVZeroBubble``: two chunks per rank placed in a V
    (rank ``r`` holds stages ``r`` and ``2p-1-r``, so the first and last stage are both on rank
    0), with I/W split.  Zero bubble with T_F = T_I = T_W once ``m >= 2p-1``, at 1F1B's peak
    activation memory in full-stage units (``2p`` half-stage chunks on rank 0)."""
    _check_common("zb_v", stages, microbatches, 2)
    p, m = stages, microbatches
    n = max(2 * p - 1, m)  # built for enough micro-batches, the extra ones dropped below
    actions = []
    for r in range(p):
        s0, s1 = r, 2 * p - 1 - r
        ops: list[Action] = []
        f0 = f1 = b0 = b1 = 0
        for _ in range(2 * (p - r) - 1):
            ops.append(Action(s0, Kind.F, f0))
            f0 += 1
        for _ in range(r):
            ops += [Action(s1, Kind.F, f1), Action(s0, Kind.F, f0)]
            f1, f0 = f1 + 1, f0 + 1
        for _ in range(p - r):
            ops += [Action(s1, Kind.F, f1), Action(s1, Kind.I, b1), Action(s1, Kind.W, b1)]
            f1, b1 = f1 + 1, b1 + 1
        while f1 < f0 or f0 < n:
            if f0 < n:
                ops.append(Action(s0, Kind.F, f0))
                f0 += 1
            ops += [Action(s0, Kind.I, b0), Action(s0, Kind.W, b0)]
            ops += [Action(s1, Kind.F, f1), Action(s1, Kind.I, b1), Action(s1, Kind.W, b1)]
            b0, f1, b1 = b0 + 1, f1 + 1, b1 + 1
        w0, w1 = b0, b1
        for _ in range(r):
            ops += [Action(s0, Kind.I, b0), Action(s1, Kind.I, b1)]
            b0, b1 = b0 + 1, b1 + 1
        for _ in range(p - r):
            ops += [Action(s0, Kind.I, b0), Action(s0, Kind.W, w0)]
            b0, w0 = b0 + 1, w0 + 1
        ops += [Action(s1, Kind.W, i) for i in range(w1, b1)]
        ops += [Action(s0, Kind.W, i) for i in range(w0, b0)]
        actions.append([a for a in ops if a.microbatch < m])
    return Schedule("zb_v", p, m, 2, actions, "v")


def dualpipe_v(stages: int, microbatches: int) -> Schedule:
    """DualPipe-V: the V-shaped, one-copy form of DeepSeek-V3's DualPipe, as
    ``torch.distributed.pipelining.ScheduleDualPipeV`` (from deepseek-ai/DualPipe).  V placement
    like ZB-V; in its main phase each rank pairs a forward of one chunk with a full backward of
    the other (DeepSeek overlaps the pair's computation with its communication; here the two run
    one after the other), and the tail splits backwards into I and W to fill the drain.  Needs
    ``m >= 2p``."""
    _check_common("dualpipe_v", stages, microbatches, 2)
    p, m = stages, microbatches
    if m < 2 * p:
        raise ValueError(
            f"dualpipe_v needs at least as many micro-batches as model stages (2 per rank): got "
            f"microbatches={m}, stages={p}; use microbatches >= {2 * p}"
        )
    actions = []
    for r in range(p):
        s0, s1 = r, 2 * p - 1 - r
        ops: list[Action] = []
        count: dict[tuple[int, Kind], int] = {}
        pending_w: deque[tuple[int, int]] = deque()

        def add(stage: int, kind: Kind) -> None:
            # A full backward and an I share one counter: both are "the next backward".
            key = (stage, Kind.I if kind is Kind.B else kind)
            i = count.get(key, 0)
            ops.append(Action(stage, kind, i))
            count[key] = i + 1
            if kind is Kind.I:
                pending_w.append((stage, i))

        def add_w() -> None:
            if pending_w:
                stage, i = pending_w.popleft()
                ops.append(Action(stage, Kind.W, i))

        for _ in range(2 * (p - r - 1)):
            add(s0, Kind.F)
        for _ in range(r + 1):
            add(s0, Kind.F)
            add(s1, Kind.F)
        for _ in range(p - r - 1):
            add(s1, Kind.I)
            add_w()
            add(s1, Kind.F)
        for _ in range(m - 2 * p + r + 1):
            # F0 with B1, then F1 with B0 (the overlapped pairs)
            add(s0, Kind.F)
            add(s1, Kind.B)
            add(s1, Kind.F)
            add(s0, Kind.B)
        for _ in range(p - r - 1):
            add(s1, Kind.B)
            add(s1, Kind.F)
            add(s0, Kind.B)
        zb = False
        for k in range(r + 1):
            if k == (r + 1) // 2 and r % 2 == 1:
                zb = True
            add(s1, Kind.I if zb else Kind.B)
            if k == (r + 1) // 2 and r % 2 == 0:
                zb = True
            add(s0, Kind.I if zb else Kind.B)
        for _ in range(p - r - 1):
            add_w()
            add(s0, Kind.I if zb else Kind.B)
        for _ in range(r + 1):
            add_w()
        while pending_w:
            add_w()
        actions.append(ops)
    return Schedule("dualpipe_v", p, m, 2, actions, "v")


def pipedream_2bw(stages: int, microbatches: int) -> Schedule:
    """PipeDream-2BW (Narayanan et al., ICML 2021): 1F1B without a flush between optimizer
    steps.  Within one step its order is 1F1B's; the difference is across steps: the next step's
    warm-up forwards start while this step's backwards drain, which is allowed because each
    stage keeps two weight versions and the update is one step stale
    (``W(t+1) = W(t) - lr * grad f(W(t-1))``).  The simulator times one step in isolation (the
    1F1B bubble, which the overlap with the neighbouring steps removes in steady state); the
    runtime applies the delayed update (``Pipeline(..., schedule="pipedream_2bw")``)."""
    _check_common("pipedream_2bw", stages, microbatches, 1)
    s = one_f_one_b(stages, microbatches)
    return Schedule("pipedream_2bw", s.stages, s.microbatches, 1, s.actions)


@dataclass(frozen=True)
class ScheduleSpec:
    """One row of the registry."""

    build: Callable[[int, int, int], Schedule]
    """``build(stages, microbatches, virtual)`` -> the compute-only schedule."""
    chunks: str
    """Model chunks per rank: ``"one"`` (virtual must be 1), ``"any"`` (virtual >= 1 chosen by
    the caller) or ``"two"`` (always 2, in a V or two pipelines; virtual may be 1 or 2)."""
    synchronous: bool
    """True when a step computes the serial model's gradient (a flush at the end)."""
    summary: str
    """One line for tables and ``--help``."""

    def virtual_for(self, virtual: int) -> int:
        """The chunk count the schedule builds for a requested ``virtual``."""
        return 2 if self.chunks == "two" else virtual

    def splits_backward(self) -> bool:
        """Whether it runs the backward as separate I and W actions (the zero-bubble
        schedules): a stage whose forward is recomputed (activation checkpointing) cannot run
        under it, as the runtime says, and the planner does not offer the pair."""
        return _splits_backward(self)


@functools.cache
def _splits_backward(spec: ScheduleSpec) -> bool:
    s = spec.build(2, 4, spec.virtual_for(1))
    return any(op.kind is Kind.I for program in s.actions for step in program for op in step_ops(step))


def _one(fn: Callable[[int, int], Schedule]) -> Callable[[int, int, int], Schedule]:
    return lambda p, m, v: fn(p, m)


SCHEDULES: Mapping[str, ScheduleSpec] = MappingProxyType({
    "gpipe": ScheduleSpec(_one(gpipe), "one", True, "all forwards, then all backwards"),
    "1f1b": ScheduleSpec(_one(one_f_one_b), "one", True, "one forward, one backward (PipeDream-flush)"),
    "interleaved_1f1b": ScheduleSpec(interleaved_1f1b, "any", True, "Megatron's 1F1B over v chunks per rank"),
    "looped_bfs": ScheduleSpec(looped_bfs, "any", True, "breadth first over v chunks per rank"),
    "zb_h1": ScheduleSpec(_one(zb_h1), "one", True, "zero bubble, W in the bubbles, 1F1B memory"),
    "zb_h2": ScheduleSpec(_one(zb_h2), "one", True, "zero bubble, longer warm-up, 2x memory"),
    "zb_v": ScheduleSpec(lambda p, m, v: zb_v(p, m), "two", True, "zero bubble, two chunks in a V"),
    "dualpipe_v": ScheduleSpec(lambda p, m, v: dualpipe_v(p, m), "two", True,
                               "DeepSeek's DualPipe folded into a V"),
    "chimera": ScheduleSpec(lambda p, m, v: chimera(p, m), "two", True,
                            "two pipelines in opposite directions, replicas summed"),
    "pipedream_2bw": ScheduleSpec(_one(pipedream_2bw), "one", False,
                                  "asynchronous 1F1B, two weight versions, 1-stale update"),
})
"""Every schedule by name; iterating yields the names.  The one place a schedule is registered."""


def build_schedule(name: str, stages: int, microbatches: int, virtual: int = 1) -> Schedule:
    """The compute-only schedule called ``name`` (a key of :data:`SCHEDULES`)."""
    spec = SCHEDULES.get(name)
    if spec is None:
        raise ValueError(f"unknown pipeline schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")
    if spec.chunks != "any" and virtual != 1:
        if isinstance(virtual, int) and virtual < 1:
            _check_common(name, stages, microbatches, virtual)
        if not (spec.chunks == "two" and virtual == 2):
            many = [n for n, s in SCHEDULES.items() if s.chunks == "any"]
            held = "one model chunk" if spec.chunks == "one" else "two model chunks"
            raise ValueError(
                f"{name!r} holds {held} per device, got virtual={virtual!r}; use "
                f"virtual=1, or one of {', '.join(repr(n) for n in many)} for {virtual} chunks per device"
            )
    return spec.build(stages, microbatches, virtual)
