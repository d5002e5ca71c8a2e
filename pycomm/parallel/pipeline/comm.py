"""The lowering pass that adds point-to-point messages to a compute-only schedule.

Contract: :func:`add_communication` takes a compute-only :class:`~.schedules.Schedule` and
returns the schedule the runtime executes: the same computations in the same order, with
``SEND_F``/``RECV_F`` (activations, to the next stage) and ``SEND_B``/``RECV_B`` (gradients, to
the previous stage, sent by whichever of B or I makes them) steps between them, including the
wrap-around from the last rank to rank 0 between interleaved chunks.  Neighbouring stages on one
rank (``stages == 1``, or the tip of a V) hand over data locally, without a message.

Execution model the result is built for: each rank runs its steps in order; a single message
step is a blocking send or receive; a :class:`~.schedules.Batch` posts all its sends and
receives at once (``batch_isend_irecv``) and waits for all of them; messages between two ranks
are matched in order (FIFO per direction, no tags); a send may block until its receive is
posted (the worst case, e.g. NCCL with large tensors).

Ordering rule
-------------
A message is exchanged in a *gap* (the point between two consecutive computations of a rank,
or before the first / after the last) of the sender and of the receiver:

1. the sender's gap is after the computation that produced the tensor, the receiver's gap is
   before the computation that consumes it;
2. among those, the pair of gaps that the two ranks reach at the *same instant* of the ideal
   timeline (the compute-only schedule run with durations ``t_fwd``/``t_bwd`` and instant
   messages), at the earliest such instant.  Rendezvous is then free: both sides are there;
   when no common instant exists the message goes right after the producer and in the
   receiver's first gap at or after that time (a blocking sender then waits for the busy
   receiver; with ``isend`` nobody waits);
3. everything a rank exchanges in one gap is one Batch (sends, then receives, each in the
   order the tensors were produced), so both ends list each pair's messages in one order.

Why not "receive just before use, send just after production" alone: in interleaved 1F1B rank 0
sends a gradient right after a backward while rank 1, busy, receives it only two computations
later, and rank 1 meanwhile blocks sending to rank 0, which is stuck in its own send: a
deadlock (the validator reports exactly this).  Exchanging at common instants makes every
rendezvous happen when both ranks are ready, in the same global order, hence no cycle of waits.
:func:`~.validate.validate` still proves it for each concrete schedule by executing it.
"""
from __future__ import annotations

import math

from .actions import Action, Batch, Kind, Schedule, ScheduleError, Step, step_ops
from .engine import execute

# The send and receive that carry each kind of data (KindInfo.carries).
_MESSAGES = {
    k.info.carries: (k, Kind(k.info.pairs_with)) for k in Kind if k.info.send
}

__all__ = ["add_communication"]


def _consumers(sched: Schedule) -> dict[Action, Action]:
    """For each computation whose result another rank needs, the computation that needs it
    (read from ``KindInfo.produces``/``consumes``: an activation feeds the next stage's forward,
    a gradient the previous stage's B or I, whichever that stage runs)."""
    by_need: dict[tuple, Action] = {}
    for prog in sched.actions:
        for step in prog:
            for b in step_ops(step):
                consumes = b.kind.info.consumes
                if consumes is None:
                    continue
                other = sched.prev_stage(b.stage) if consumes == "activation" else sched.next_stage(b.stage)
                if other is not None:
                    by_need[(consumes, other, b.microbatch)] = b
    out = {}
    for prog in sched.actions:
        for step in prog:
            for a in step_ops(step):
                produces = a.kind.info.produces
                user = by_need.get((produces, a.stage, a.microbatch)) if produces else None
                if user is not None and sched.rank_of(user.stage) != sched.rank_of(a.stage):
                    out[a] = user
    return out


def add_communication(schedule: Schedule, t_fwd: float = 1.0, t_bwd: float = 2.0, *,
                      t_input: float | None = None, t_weight: float | None = None) -> Schedule:
    """Insert messages by the module's ordering rule; the durations give the ideal timeline the
    rule aligns messages on (use the ratios you expect at run time).

    Raises :class:`ScheduleError` if the schedule already has messages or its computations
    cannot run in the given order (a dependency cycle across ranks).
    """
    if schedule.has_communication:
        raise ScheduleError(
            f"add_communication expects a compute-only schedule, but {schedule.name!r} already "
            f"has messages; lower it once"
        )
    ideal = execute(schedule, t_fwd, t_bwd, t_input=t_input, t_weight=t_weight)
    consumers = _consumers(schedule)
    where = {t.action: (r, j, t.end) for r, row in enumerate(ideal.timeline) for j, t in enumerate(row)}
    eps = 1e-9 * max(ideal.makespan, 1.0)

    # Gap j of a rank lies before its computation j: [end of j-1, start of j].
    gaps = []
    for row in ideal.timeline:
        lo = [0.0] + [t.end for t in row]
        hi = [t.start for t in row] + [math.inf]
        gaps.append((lo, hi))

    sends: dict[tuple[int, int], list[tuple[float, Action]]] = {}
    recvs: dict[tuple[int, int], list[tuple[float, Action]]] = {}
    for a, (ra, ia, produced) in where.items():
        b = consumers.get(a)
        if b is None:
            continue
        rb, ib, _ = where[b]
        (lo_a, hi_a), (lo_b, hi_b) = gaps[ra], gaps[rb]
        ja = ia + 1
        jb = 0
        while hi_b[jb] < produced - eps:
            jb += 1
        placed = None
        # Walk both gap lists in time order (interval intersection), from the production time
        # to the consumer's start; the first overlap is the earliest common instant.
        while ja < len(lo_a) and jb <= ib:
            start = max(lo_a[ja], lo_b[jb], produced)
            if start <= min(hi_a[ja], hi_b[jb]) + eps:
                placed = (ja, jb)
                break
            if hi_a[ja] < hi_b[jb]:
                ja += 1
            else:
                jb += 1
        if placed is None:
            jb = 0
            while hi_b[jb] < produced - eps:
                jb += 1
            placed = (ia + 1, jb)
        send_kind, recv_kind = _MESSAGES[a.kind.info.produces]
        sends.setdefault((ra, placed[0]), []).append((produced, Action(a.stage, send_kind, a.microbatch)))
        recvs.setdefault((rb, placed[1]), []).append((produced, Action(b.stage, recv_kind, b.microbatch)))

    lowered = []
    for r, program in enumerate(schedule.actions):
        out: list[Step] = []
        for j in range(len(program) + 1):
            # Production time orders both ends of every pair identically (FIFO matching).
            ops = [op for _, op in sorted(sends.get((r, j), []), key=lambda x: x[0])]
            ops += [op for _, op in sorted(recvs.get((r, j), []), key=lambda x: x[0])]
            if len(ops) == 1:
                out.append(ops[0])
            elif ops:
                out.append(Batch(tuple(ops)))
            if j < len(program):
                out.append(program[j])
        lowered.append(out)
    return Schedule(schedule.name, schedule.stages, schedule.microbatches, schedule.virtual, lowered,
                    schedule.placement)
