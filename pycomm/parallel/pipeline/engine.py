"""The execution engine shared by the validator and the simulator: runs per-rank step lists
with their data dependencies and message matching (see simulate.py for the time model, and
validate.py for the blocking-send check).  It imports only the schedules, so the validator,
the simulator and the communication pass can all use it without importing each other.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .schedules import Action, Batch, Kind, Schedule, ScheduleError, step_ops

__all__ = ["TimedAction", "Execution", "execute"]


@dataclass(frozen=True)
class TimedAction:
    """One computation as it ran in the simulation."""

    rank: int
    """Device that ran it."""
    action: Action
    """The F or B action."""
    start: float
    """Start time (same unit as t_fwd/t_bwd)."""
    end: float
    """End time."""


@dataclass(frozen=True)
class Execution:
    """Raw outcome of :func:`execute`."""

    timeline: tuple[tuple[TimedAction, ...], ...]
    """Per rank, its computations in execution order."""
    makespan: float
    """Time the last rank finishes."""
    peak_activations: tuple[int, ...]
    """Per rank, the most forwards alive (run, backward not yet run) at once."""


def _payload(op: Action) -> tuple[str, int, int]:
    """What a message carries, as (direction, producing stage, micro-batch): equal on both ends."""
    if op.kind is Kind.SEND_F:
        return ("activation", op.stage, op.microbatch)
    if op.kind is Kind.RECV_F:
        return ("activation", op.stage - 1, op.microbatch)
    if op.kind is Kind.SEND_B:
        return ("gradient", op.stage, op.microbatch)
    return ("gradient", op.stage + 1, op.microbatch)


def _pair_messages(sched: Schedule) -> dict[tuple[int, int, int], tuple[int, int]]:
    """Match the k-th send from a to b with the k-th receive on b from a (FIFO channels).

    Returns ``(rank, step, op index) -> (peer rank, peer step)``.
    """
    nstages = sched.num_model_stages
    sends: dict[tuple[int, int], list] = {}
    recvs: dict[tuple[int, int], list] = {}
    for r, program in enumerate(sched.actions):
        for k, step in enumerate(program):
            for i, op in enumerate(step_ops(step)):
                if op.kind.is_compute:
                    if isinstance(step, Batch):
                        raise ScheduleError(f"rank {r}, step {k} '{step}': a batch cannot hold computation '{op}'")
                    continue
                neighbour = op.stage + (1 if op.kind in (Kind.SEND_F, Kind.RECV_B) else -1)
                if not 0 <= neighbour < nstages:
                    raise ScheduleError(
                        f"rank {r}, step {k} '{op}': stage {op.stage} has no neighbour stage "
                        f"{neighbour} to exchange with (model stages 0..{nstages - 1}); remove it"
                    )
                peer = sched.peer(op)
                assert peer is not None  # op is a message
                if peer == r:
                    raise ScheduleError(
                        f"rank {r}, step {k} '{op}': stages {op.stage} and {neighbour} are both on "
                        f"rank {r}, the data is handed over locally; remove the message"
                    )
                if op.kind.is_send:
                    sends.setdefault((r, peer), []).append((k, i, op))
                else:
                    recvs.setdefault((peer, r), []).append((k, i, op))
    partner: dict[tuple[int, int, int], tuple[int, int]] = {}
    for chan in sorted(set(sends) | set(recvs)):
        a, b = chan
        s_list, r_list = sends.get(chan, []), recvs.get(chan, [])
        for n, ((ks, is_, s_op), (kr, ir, r_op)) in enumerate(zip(s_list, r_list)):
            if _payload(s_op) != _payload(r_op):
                raise ScheduleError(
                    f"mismatched messages from rank {a} to rank {b}: rank {a}'s message #{n} is "
                    f"'{s_op}' (step {ks}) but rank {b}'s receive #{n} from rank {a} is '{r_op}' "
                    f"(step {kr}); messages between two ranks are matched in order, so both must "
                    f"list them in the same order"
                )
            partner[(a, ks, is_)] = (b, kr)
            partner[(b, kr, ir)] = (a, ks)
        if len(s_list) != len(r_list):
            n = min(len(s_list), len(r_list))
            if len(s_list) > n:
                k, _, op = s_list[n]
                raise ScheduleError(
                    f"rank {a}, step {k} '{op}' sends to rank {b}, which has no matching receive "
                    f"({len(s_list)} sends, {len(r_list)} receives); add "
                    f"'{_matching(op)}' to rank {b} or drop the send"
                )
            k, _, op = r_list[n]
            raise ScheduleError(
                f"rank {b}, step {k} '{op}' receives from rank {a}, which never sends it "
                f"({len(s_list)} sends, {len(r_list)} receives); add '{_matching(op)}' to rank "
                f"{a} or drop the receive"
            )
    return partner


def _matching(op: Action) -> Action:
    other = {
        Kind.SEND_F: (Kind.RECV_F, 1),
        Kind.RECV_F: (Kind.SEND_F, -1),
        Kind.SEND_B: (Kind.RECV_B, -1),
        Kind.RECV_B: (Kind.SEND_B, 1),
    }[op.kind]
    return Action(op.stage + other[1], other[0], op.microbatch)


def execute(
    schedule: Schedule, t_fwd: float = 1.0, t_bwd: float = 2.0, blocking_sends: bool = False
) -> Execution:
    """Run ``schedule`` in simulated time; raise :class:`ScheduleError` on a hang or on data used
    before it exists.  See the module docstring for the time and message model;
    ``blocking_sends=True`` is the validator's worst case (a send waits for its receive)."""
    for name, t in (("t_fwd", t_fwd), ("t_bwd", t_bwd)):
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"{name} must be a positive finite duration, got {t!r}")
    sched, programs = schedule, schedule.actions
    p, v, last = schedule.stages, schedule.virtual, schedule.num_model_stages - 1
    lowered = schedule.has_communication
    partner = _pair_messages(schedule) if lowered else {}
    duration = {Kind.F: t_fwd / v, Kind.B: t_bwd / v}

    pc = [0] * p
    clock = [0.0] * p
    arrive: dict[tuple[int, int], float] = {}
    finished: dict[tuple[Kind, int, int], float] = {}  # compute -> end time (ideal mode)
    have: list[dict[tuple, float]] = [{} for _ in range(p)]  # data present on each rank
    live: list[set] = [set() for _ in range(p)]
    peak = [0] * p
    timeline: list[list[TimedAction]] = [[] for _ in range(p)]

    def need(r: int, k: int, act: Action) -> tuple | None:
        """Data key the computation waits for beyond its own rank's order, or None."""
        if act.kind is Kind.F:
            return None if act.stage == 0 else ("activation", act.stage - 1, act.microbatch)
        if act.stage == last:
            return None  # the loss is computed from this stage's own forward
        return ("gradient", act.stage + 1, act.microbatch)

    def describe(r: int) -> str:
        if pc[r] >= len(programs[r]):
            return f"rank {r} has finished"
        return f"rank {r} is at step {pc[r]} '{programs[r][pc[r]]}'"

    def try_compute(r: int, k: int, act: Action) -> float | None:
        """Start time of a computation, None to wait, or raise if it can never run."""
        if act.kind is Kind.B and (Kind.F, act.stage, act.microbatch) not in have[r]:
            raise ScheduleError(
                f"rank {r}, step {k} '{act}': its forward '{Action(act.stage, Kind.F, act.microbatch)}' "
                f"has not run on rank {r}; run the forward first"
            )
        key = need(r, k, act)
        if key is None:
            return clock[r]
        if key in have[r]:
            return max(clock[r], have[r][key])
        producer = Action(key[1], Kind.F if key[0] == "activation" else Kind.B, key[2])
        if sched.rank_of(key[1]) == r or lowered:
            how = (
                f"'{producer}' has not run on rank {r} yet; run it earlier"
                if sched.rank_of(key[1]) == r
                else f"it was never received; add "
                f"'{Action(act.stage, Kind.RECV_F if key[0] == 'activation' else Kind.RECV_B, act.microbatch)}' "
                f"before it"
            )
            raise ScheduleError(
                f"rank {r}, step {k} '{act}' needs the {key[0]} of stage {key[1]} for micro-batch "
                f"{key[2]}, but {how}"
            )
        done = finished.get((producer.kind, producer.stage, producer.microbatch))
        return None if done is None else max(clock[r], done)

    def run_compute(r: int, act: Action, start: float) -> None:
        end = start + duration[act.kind]
        timeline[r].append(TimedAction(r, act, start, end))
        clock[r] = end
        finished[(act.kind, act.stage, act.microbatch)] = end
        have[r][(act.kind, act.stage, act.microbatch)] = end
        if act.kind is Kind.F:
            live[r].add((act.stage, act.microbatch))
            peak[r] = max(peak[r], len(live[r]))
            if act.stage < last and sched.rank_of(act.stage + 1) == r:
                have[r][("activation", act.stage, act.microbatch)] = end
        else:
            live[r].discard((act.stage, act.microbatch))
            if act.stage > 0 and sched.rank_of(act.stage - 1) == r:
                have[r][("gradient", act.stage, act.microbatch)] = end

    def try_messages(r: int, k: int, ops: Sequence[Action]) -> bool:
        for op in ops:
            if op.kind.is_send:
                made = (Kind.F if op.kind is Kind.SEND_F else Kind.B, op.stage, op.microbatch)
                if made not in have[r]:
                    raise ScheduleError(
                        f"rank {r}, step {k} '{op}' sends the result of "
                        f"'{Action(made[1], made[0], made[2])}' before rank {r} computed it; "
                        f"move the send after that computation"
                    )
        times = []
        for i, op in enumerate(ops):
            if op.kind.is_send and not blocking_sends:
                continue  # posted now, completes in the background
            q, kq = partner[(r, k, i)]
            if (q, kq) not in arrive:
                return False
            times.append(arrive[(q, kq)])
        clock[r] = max([clock[r], *times])
        for op in ops:
            if not op.kind.is_send:
                have[r][_payload(op)] = clock[r]
        return True

    while True:
        progressed = False
        for r in range(p):
            while pc[r] < len(programs[r]):
                k, step = pc[r], programs[r][pc[r]]
                arrive.setdefault((r, k), clock[r])
                if isinstance(step, Action) and step.kind.is_compute:
                    start = try_compute(r, k, step)
                    if start is None:
                        break
                    run_compute(r, step, start)
                elif not try_messages(r, k, step_ops(step)):
                    break
                pc[r] += 1
                progressed = True
        if all(pc[r] >= len(programs[r]) for r in range(p)):
            break
        if not progressed:
            lines = []
            for r in range(p):
                if pc[r] >= len(programs[r]):
                    continue
                k, step = pc[r], programs[r][pc[r]]
                if isinstance(step, Action) and step.kind.is_compute:
                    key = need(r, k, step)
                    assert key is not None  # a computation that cannot start needs something
                    producer = Action(key[1], Kind.F if key[0] == "activation" else Kind.B, key[2])
                    owner = sched.rank_of(key[1])
                    lines.append(
                        f"rank {r} waits at step {k} '{step}' for '{producer}' on rank {owner}, "
                        f"but {describe(owner)}"
                    )
                else:
                    for i, op in enumerate(step_ops(step)):
                        q, kq = partner[(r, k, i)]
                        if (q, kq) not in arrive and (blocking_sends or not op.kind.is_send):
                            lines.append(
                                f"rank {r} waits at step {k} '{step}' for rank {q} to reach step "
                                f"{kq} '{programs[q][kq]}' (for '{op}'), but {describe(q)}"
                            )
                            break
            raise ScheduleError(
                f"deadlock in {schedule.name!r} schedule (stages={p}, "
                f"microbatches={schedule.microbatches}, virtual={v}): no rank can make progress:\n  "
                + "\n  ".join(lines)
                + "\nreorder the steps so that each wait is satisfied by an earlier step of the peer"
            )

    return Execution(
        timeline=tuple(tuple(t) for t in timeline),
        makespan=max(clock) if clock else 0.0,
        peak_activations=tuple(peak),
    )
