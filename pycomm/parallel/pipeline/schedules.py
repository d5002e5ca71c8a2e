"""Pipeline-parallel schedules as data.

Contract
--------
A schedule is a :class:`Schedule`: for each rank (device) ``0 .. stages-1`` an ordered tuple of
*steps* that rank executes one after the other.  Nothing here runs a model; the runtime, the
validator (``validate.py``) and the simulator (``simulate.py``) all consume the same steps.

* A step is an :class:`Action` (one computation or one blocking point-to-point message) or a
  :class:`Batch` (several messages issued together, like ``torch.distributed.batch_isend_irecv``,
  and then all waited for).
* ``Action.stage`` is the *model* stage index, ``0 .. stages*virtual-1``.  Model stage ``s`` lives
  on rank ``s % stages`` (Megatron's placement: with ``virtual`` chunks per device, device ``d``
  holds chunks ``d, d+p, d+2p, ...``).  Without interleaving the model stage equals the rank.
* Text form, as in ``torch.distributed.pipelining``: ``"{stage}{kind}{microbatch}"``, e.g.
  ``"2F0"`` (stage 2 forward of micro-batch 0), ``"0B3"``, ``"1SEND_F0"``; a batch joins its
  messages with ``+``: ``"1SEND_F0+1RECV_B0"``.  :func:`parse_step` reads it back.

Messages are named after the stage that owns them on *this* rank: ``sSEND_Fm`` sends the output
of stage ``s`` to stage ``s+1``; ``sRECV_Fm`` receives the input of stage ``s`` from ``s-1``;
``sSEND_Bm`` sends the input-gradient of stage ``s`` to ``s-1``; ``sRECV_Bm`` receives the
output-gradient of stage ``s`` from ``s+1``.  :meth:`Schedule.peer` gives the other rank.

The schedule functions (:func:`gpipe`, :func:`one_f_one_b`, :func:`interleaved_1f1b`) only emit
computations.  ``comm.add_communication`` is the separate lowering pass that inserts the
messages (its docstring states the ordering rule); ``validate.validate`` checks the result.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "Kind",
    "Action",
    "Batch",
    "Step",
    "Schedule",
    "ScheduleError",
    "SCHEDULES",
    "gpipe",
    "one_f_one_b",
    "interleaved_1f1b",
    "build_schedule",
    "parse_step",
    "format_program",
    "parse_program",
]


class ScheduleError(ValueError):
    """A schedule (hand-written or generated) that cannot run correctly; the message names the
    rank and the step."""


class Kind(str, Enum):
    """What an :class:`Action` does.  ``F``/``B`` compute; the rest move one tensor."""

    F = "F"
    B = "B"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def is_compute(self) -> bool:
        return self in (Kind.F, Kind.B)

    @property
    def is_send(self) -> bool:
        return self in (Kind.SEND_F, Kind.SEND_B)


# Longest names first so that the regex never stops at "F" inside "SEND_F".
_ACTION_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B)(\d+)$")


@dataclass(frozen=True, order=True)
class Action:
    """One computation or one message of one micro-batch at one model stage."""

    stage: int
    """Model stage index, ``0 .. stages*virtual-1`` (rank = ``stage % stages``)."""
    kind: Kind
    """F, B, or one of the four message kinds."""
    microbatch: int
    """Micro-batch index, ``0 .. microbatches-1``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        m = _ACTION_RE.match(text.strip())
        if m is None:
            raise ValueError(
                f"cannot parse action {text!r}: expected '<stage><kind><microbatch>' with kind one "
                f"of {[k.value for k in Kind]}, e.g. '2F0' or '1SEND_B3'"
            )
        return cls(int(m.group(1)), Kind(m.group(2)), int(m.group(3)))


@dataclass(frozen=True)
class Batch:
    """Messages posted together and waited for together (``batch_isend_irecv`` + wait all).

    Only messages, never computations; at least two of them (a single message is an Action).
    """

    ops: tuple[Action, ...]
    """The sends and receives, sends first."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        if len(self.ops) < 2 or any(op.kind.is_compute for op in self.ops):
            raise ValueError(
                f"a Batch holds two or more messages and no computation, got "
                f"{[str(o) for o in self.ops]}; use a plain Action for a single step"
            )

    def __str__(self) -> str:
        return "+".join(str(op) for op in self.ops)


Step = Action | Batch


def parse_step(text: str) -> Step:
    """Inverse of ``str(step)``: ``"2F0"`` → Action, ``"1SEND_F0+1RECV_B0"`` → Batch."""
    parts = text.strip().split("+")
    if len(parts) == 1:
        return Action.parse(parts[0])
    return Batch(tuple(Action.parse(p) for p in parts))


def format_program(steps: Iterable[Step]) -> str:
    """One rank's steps as space-separated text (round-trips through :func:`parse_program`)."""
    return " ".join(str(s) for s in steps)


def parse_program(text: str) -> list[Step]:
    return [parse_step(tok) for tok in text.split()]


def step_ops(step: Step) -> tuple[Action, ...]:
    """The actions of a step: itself, or the messages of a batch."""
    return step.ops if isinstance(step, Batch) else (step,)


@dataclass(frozen=True)
class Schedule:
    """Per-rank step lists for ``stages`` ranks, ``microbatches`` micro-batches and ``virtual``
    model chunks per rank."""

    name: str
    """Schedule name, one of :data:`SCHEDULES` for generated ones."""
    stages: int
    """Number of pipeline ranks (devices), ``p``."""
    microbatches: int
    """Number of micro-batches per step, ``m``."""
    virtual: int
    """Model chunks per rank, ``v`` (1 unless interleaved)."""
    actions: Sequence[Sequence[Step]] = field(repr=False)
    """``actions[rank]`` is what that rank executes, in order (stored as tuples)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "actions", tuple(tuple(a) for a in self.actions))

    @property
    def num_model_stages(self) -> int:
        return self.stages * self.virtual

    def rank_of(self, stage: int) -> int:
        return stage % self.stages

    def peer(self, action: Action) -> int | None:
        """The rank on the other end of a message; ``None`` for a computation."""
        delta = {Kind.SEND_F: 1, Kind.RECV_F: -1, Kind.SEND_B: -1, Kind.RECV_B: 1}.get(action.kind)
        return None if delta is None else self.rank_of(action.stage + delta)

    @property
    def has_communication(self) -> bool:
        return any(not op.kind.is_compute for prog in self.actions for s in prog for op in step_ops(s))

    def to_text(self) -> str:
        """``rank r: <steps>`` lines; the whole schedule in the form a runtime log would show."""
        return "\n".join(f"rank {r}: {format_program(p)}" for r, p in enumerate(self.actions))


SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


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


def build_schedule(name: str, stages: int, microbatches: int, virtual: int = 1) -> Schedule:
    """The compute-only schedule called ``name`` (one of :data:`SCHEDULES`)."""
    if name == "interleaved_1f1b":
        return interleaved_1f1b(stages, microbatches, virtual)
    if name in ("gpipe", "1f1b"):
        if virtual != 1:
            if isinstance(virtual, int) and virtual < 1:
                _check_common(name, stages, microbatches, virtual)
            raise ValueError(
                f"{name!r} holds one model chunk per device, got virtual={virtual!r}; use "
                f"virtual=1, or schedule='interleaved_1f1b' for {virtual} chunks per device"
            )
        return gpipe(stages, microbatches) if name == "gpipe" else one_f_one_b(stages, microbatches)
    raise ValueError(f"unknown pipeline schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")
