"""The execution engine shared by the validator and the simulator: runs per-rank step lists
with their data dependencies and message matching (see simulate.py for the time model, and
validate.py for the blocking-send check).  It imports only the schedules, so the validator,
the simulator and the communication pass can all use it without importing each other.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .actions import Action, Batch, Kind, Schedule, ScheduleError, step_ops

__all__ = ["TimedAction", "Execution", "Durations", "execute"]


@dataclass(frozen=True)
class TimedAction:
    """One computation as it ran in the simulation."""

    rank: int
    """Device that ran it."""
    action: Action
    """The computation (F, B, I or W)."""
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
    """Per rank, the most micro-batch activations held at once (``KindInfo.activations``: a
    forward adds one, its B or I frees it, as the zero-bubble paper counts memory)."""


def _payload(sched: Schedule, op: Action) -> tuple[str | None, int | None, int]:
    """What a message carries, as (data, producing stage, micro-batch): equal on both ends."""
    info = op.kind.info
    return (info.carries, op.stage if info.send else sched.neighbour(op), op.microbatch)


def _toward_next(kind: Kind) -> bool:
    """A message to or from the next stage (SEND_F, RECV_B) rather than the previous one."""
    info = kind.info
    return info.send == (info.carries == "activation")


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
                neighbour = sched.neighbour(op)
                if neighbour is None:
                    missing = op.stage + (1 if _toward_next(op.kind) else -1)
                    raise ScheduleError(
                        f"rank {r}, step {k} '{op}': stage {op.stage} has no neighbour stage "
                        f"{missing} to exchange with (model stages 0..{nstages - 1}, "
                        f"placement {sched.placement!r}); remove it"
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
            if _payload(sched, s_op) != _payload(sched, r_op):
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
                    f"'{_matching(sched, op)}' to rank {b} or drop the send"
                )
            k, _, op = r_list[n]
            raise ScheduleError(
                f"rank {b}, step {k} '{op}' receives from rank {a}, which never sends it "
                f"({len(s_list)} sends, {len(r_list)} receives); add '{_matching(sched, op)}' to rank "
                f"{a} or drop the receive"
            )
    return partner


def _matching(sched: Schedule, op: Action) -> Action:
    other = sched.neighbour(op)
    assert other is not None and op.kind.info.pairs_with is not None  # a checked message
    return Action(other, Kind(op.kind.info.pairs_with), op.microbatch)


@dataclass(frozen=True)
class Durations:
    """Time of one micro-batch through one full stage (all of a device's chunks), per
    ``KindInfo.duration`` key.  ``bwd`` is the fused backward; ``input`` and ``weight`` are its
    halves and default to half of it each (the zero-bubble paper's T_B = T_W).

    ``first_stage_input_grad=False`` models what a runtime does on a chain's first stage, which
    has no input to differentiate: its I takes no time and its W the whole backward (the paper,
    and the default, charge every stage the same I and W)."""

    fwd: float = 1.0
    bwd: float = 2.0
    input: float | None = None
    weight: float | None = None
    first_stage_input_grad: bool = True

    def __post_init__(self) -> None:
        for name in ("fwd", "bwd", "input", "weight"):
            t = getattr(self, name)
            if t is None:
                continue
            if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
                raise ValueError(f"t_{name} must be a positive finite duration, got {t!r}")
        i, w = self.input, self.weight
        if i is None and w is None:
            i = w = self.bwd / 2
        elif i is None:
            assert w is not None
            i = self.bwd - w
        elif w is None:
            w = self.bwd - i
        if i <= 0 or w <= 0:
            raise ValueError(
                f"t_input and t_weight split the backward t_bwd={self.bwd:g}; got t_input="
                f"{self.input!r}, t_weight={self.weight!r}, which leaves nothing for the other half; "
                f"pass both, or one smaller than t_bwd"
            )
        object.__setattr__(self, "input", float(i))
        object.__setattr__(self, "weight", float(w))
        # The fused backward is its two halves (t_bwd is overridden when both are given).
        object.__setattr__(self, "bwd", float(i + w))
        object.__setattr__(self, "fwd", float(self.fwd))

    def of(self, kind: Kind, first_stage: bool = False) -> float:
        """Duration of a ``kind`` computation on a full stage (``first_stage``: a chain's first);
        0 for messages."""
        key = kind.info.duration
        if key is None:
            return 0.0
        if first_stage and not self.first_stage_input_grad and key in ("input", "weight"):
            assert self.input is not None and self.weight is not None  # set by __post_init__
            return 0.0 if key == "input" else self.input + self.weight
        return float(getattr(self, key))


def execute(
    schedule: Schedule, t_fwd: float = 1.0, t_bwd: float = 2.0, blocking_sends: bool = False,
    *, t_input: float | None = None, t_weight: float | None = None, first_stage_input_grad: bool = True,
) -> Execution:
    """Run ``schedule`` in simulated time; raise :class:`ScheduleError` on a hang or on data used
    before it exists.  See the module docstring for the time and message model;
    ``blocking_sends=True`` is the validator's worst case (a send waits for its receive).
    Durations: :class:`Durations` (``t_input``/``t_weight`` default to half of ``t_bwd``)."""
    durations = Durations(t_fwd, t_bwd, t_input, t_weight, first_stage_input_grad)
    sched, programs = schedule, schedule.actions
    p, v = schedule.stages, schedule.virtual
    lowered = schedule.has_communication
    partner = _pair_messages(schedule) if lowered else {}

    pc = [0] * p
    clock = [0.0] * p
    arrive: dict[tuple[int, int], float] = {}
    made: dict[tuple, float] = {}  # data key -> time it was produced (ideal mode)
    producer: dict[tuple, Action] = {}  # data key -> the computation that makes it
    for prog in programs:
        for step in prog:
            for op in step_ops(step):
                if op.kind.is_compute and op.kind.info.produces:
                    producer[(op.kind.info.produces, op.stage, op.microbatch)] = op
    have: list[dict[tuple, float]] = [{} for _ in range(p)]  # what each rank holds, and since when
    live = [0] * p
    peak = [0] * p
    timeline: list[list[TimedAction]] = [[] for _ in range(p)]

    def need(act: Action) -> tuple | None:
        """Data key the computation waits for from a neighbour stage, or None."""
        consumes = act.kind.info.consumes
        if consumes is None:
            return None
        other = sched.prev_stage(act.stage) if consumes == "activation" else sched.next_stage(act.stage)
        # None: a chain's first stage reads the input, its last stage's loss gives the gradient
        return None if other is None else (consumes, other, act.microbatch)

    def maker(key: tuple) -> Action:
        return producer.get(key) or Action(key[1], Kind.F if key[0] == "activation" else Kind.B, key[2])

    def describe(r: int) -> str:
        if pc[r] >= len(programs[r]):
            return f"rank {r} has finished"
        return f"rank {r} is at step {pc[r]} '{programs[r][pc[r]]}'"

    def try_compute(r: int, k: int, act: Action) -> float | None:
        """Start time of a computation, None to wait, or raise if it can never run."""
        for before in act.kind.info.after:
            if (Kind(before), act.stage, act.microbatch) not in have[r]:
                first = Action(act.stage, Kind(before), act.microbatch)
                word = first.kind.info.word
                raise ScheduleError(
                    f"rank {r}, step {k} '{act}': its {word} '{first}' has not run on rank {r}; "
                    f"run the {word} first"
                )
        key = need(act)
        if key is None:
            return clock[r]
        if key in have[r]:
            return max(clock[r], have[r][key])
        source = maker(key)
        if sched.rank_of(key[1]) == r or lowered:
            recv = Kind.RECV_F if key[0] == "activation" else Kind.RECV_B
            how = (
                f"'{source}' has not run on rank {r} yet; run it earlier"
                if sched.rank_of(key[1]) == r
                else f"it was never received; add '{Action(act.stage, recv, act.microbatch)}' before it"
            )
            raise ScheduleError(
                f"rank {r}, step {k} '{act}' needs the {key[0]} of stage {key[1]} for micro-batch "
                f"{key[2]}, but {how}"
            )
        done = made.get(key)
        return None if done is None else max(clock[r], done)

    def run_compute(r: int, act: Action, start: float) -> None:
        info = act.kind.info
        end = start + durations.of(act.kind, sched.prev_stage(act.stage) is None) * sched.stage_share
        timeline[r].append(TimedAction(r, act, start, end))
        clock[r] = end
        have[r][(act.kind, act.stage, act.microbatch)] = end
        live[r] += info.activations
        peak[r] = max(peak[r], live[r])
        if info.produces:
            key = (info.produces, act.stage, act.microbatch)
            made[key] = end
            other = sched.next_stage(act.stage) if info.produces == "activation" else sched.prev_stage(act.stage)
            if other is not None and sched.rank_of(other) == r:
                have[r][key] = end  # handed over locally
            have[r][("made",) + key] = end

    def try_messages(r: int, k: int, ops: Sequence[Action]) -> bool:
        for op in ops:
            if op.kind.is_send:
                data = _payload(sched, op)
                if ("made",) + data not in have[r]:
                    source = maker(data)
                    raise ScheduleError(
                        f"rank {r}, step {k} '{op}' sends the result of '{source}' before rank "
                        f"{r} computed it; move the send after that computation"
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
                have[r][_payload(sched, op)] = clock[r]
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
                    key = need(step)
                    assert key is not None  # a computation that cannot start needs something
                    owner = sched.rank_of(key[1])
                    lines.append(
                        f"rank {r} waits at step {k} '{step}' for '{maker(key)}' on rank {owner}, "
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
