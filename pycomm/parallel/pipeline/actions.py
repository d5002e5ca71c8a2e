"""Pipeline actions as data: what each kind of step does, and where each model stage lives.

Contract
--------
A schedule is a :class:`Schedule`: for each rank (device) ``0 .. stages-1`` an ordered tuple of
*steps* that rank executes one after the other.  Nothing here runs a model; the validator, the
simulator, the communication pass, the runtime and the plots all read the same steps, and they
learn what a step means only from :data:`KIND_INFO` (one row per :class:`Kind`) and from the
schedule's placement (:meth:`Schedule.rank_of`, :meth:`Schedule.next_stage`,
:meth:`Schedule.prev_stage`).  A new kind of action is one new row; no pass names F or B.

* A step is an :class:`Action` (one computation or one blocking point-to-point message) or a
  :class:`Batch` (several messages issued together, like ``torch.distributed.batch_isend_irecv``,
  and then all waited for).
* Computations: ``F`` (forward), ``B`` (the whole backward), or its two halves ``I`` (the
  input-gradient, which the previous stage waits for) and ``W`` (the weight-gradient, which
  nobody waits for: zero-bubble schedules move it into the bubbles).  A (stage, micro-batch)
  runs ``F`` and then either ``B`` or ``I`` followed by ``W``.
* ``Action.stage`` is the *model* stage index, ``0 .. stages*virtual-1``; where it lives is the
  schedule's ``placement``: ``"loop"`` (Megatron's: stage ``s`` on rank ``s % p``), ``"v"``
  (two chunks per rank in a V: rank ``r`` holds ``r`` and ``2p-1-r``, as ZB-V and DualPipe-V)
  or ``"bidirectional"`` (Chimera: two replicas of a ``p``-stage model, chain 0 = stages
  ``0..p-1`` on ranks ``0..p-1``, chain 1 = stages ``p..2p-1`` on ranks ``p-1..0``; the first
  half of the micro-batches takes chain 0, the rest chain 1; stage ``p+s`` is a replica of
  stage ``s``, see :meth:`Schedule.replica_of`).
* Text form, as in ``torch.distributed.pipelining``: ``"{stage}{kind}{microbatch}"``, e.g.
  ``"2F0"``, ``"0I3"``, ``"1SEND_F0"``; a batch joins its messages with ``+``:
  ``"1SEND_F0+1RECV_B0"``.  :func:`parse_step` reads it back.

Messages are named after the stage that owns them on *this* rank: ``sSEND_Fm`` sends the output
of stage ``s`` to the next stage; ``sRECV_Fm`` receives the input of stage ``s``; ``sSEND_Bm``
sends the input-gradient of stage ``s`` to the previous stage; ``sRECV_Bm`` receives the
output-gradient of stage ``s``.  :meth:`Schedule.peer` gives the other rank.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "Kind",
    "KindInfo",
    "KIND_INFO",
    "BACKWARD_FORMS",
    "PLACEMENTS",
    "Action",
    "Batch",
    "Step",
    "Schedule",
    "ScheduleError",
    "parse_step",
    "format_program",
    "parse_program",
    "step_ops",
]


class ScheduleError(ValueError):
    """A schedule (hand-written or generated) that cannot run correctly; the message names the
    rank and the step."""


class Kind(str, Enum):
    """What an :class:`Action` does; its meaning is the :data:`KIND_INFO` row (``.info``)."""

    F = "F"
    B = "B"
    I = "I"  # noqa: E741  (the name the zero-bubble paper and torch use)
    W = "W"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def info(self) -> KindInfo:
        return KIND_INFO[self]

    @property
    def is_compute(self) -> bool:
        return KIND_INFO[self].compute

    @property
    def is_send(self) -> bool:
        return KIND_INFO[self].send


@dataclass(frozen=True)
class KindInfo:
    """Everything a pass needs to know about one kind of action."""

    compute: bool
    """A computation (occupies the device) rather than a message."""
    word: str
    """Name in messages and legends."""
    duration: str | None = None
    """Which duration it takes: ``"fwd"``, ``"bwd"``, ``"input"`` or ``"weight"`` (see
    ``engine.Durations``); None for messages, which the simulator treats as instant."""
    after: tuple[str, ...] = ()
    """Kinds of the same (stage, micro-batch) that must have run before it on this rank."""
    consumes: str | None = None
    """Data it waits for from a neighbour stage: ``"activation"`` (the previous stage's output;
    none on a chain's first stage) or ``"gradient"`` (the next stage's input-gradient; on a
    chain's last stage the loss gives it)."""
    produces: str | None = None
    """Data it makes for a neighbour stage: ``"activation"`` (for the next stage) or
    ``"gradient"`` (for the previous stage)."""
    activations: int = 0
    """Change in the activations held by the rank: +1 when a forward keeps its inputs and
    saved tensors, -1 when the last backward part frees them."""
    send: bool = False
    """A message that sends (the others receive)."""
    carries: str | None = None
    """For a message: ``"activation"`` or ``"gradient"``."""
    pairs_with: str | None = None
    """For a message: the kind at the other end."""


KIND_INFO: dict[Kind, KindInfo] = {
    Kind.F: KindInfo(True, "forward", "fwd", (), "activation", "activation", +1),
    Kind.B: KindInfo(True, "backward", "bwd", ("F",), "gradient", "gradient", -1),
    Kind.I: KindInfo(True, "input-gradient", "input", ("F",), "gradient", "gradient", -1),
    Kind.W: KindInfo(True, "weight-gradient", "weight", ("F", "I"), None, None, 0),
    Kind.SEND_F: KindInfo(False, "send activation", send=True, carries="activation", pairs_with="RECV_F"),
    Kind.RECV_F: KindInfo(False, "receive activation", carries="activation", pairs_with="SEND_F"),
    Kind.SEND_B: KindInfo(False, "send gradient", send=True, carries="gradient", pairs_with="RECV_B"),
    Kind.RECV_B: KindInfo(False, "receive gradient", carries="gradient", pairs_with="SEND_B"),
}

BACKWARD_FORMS: tuple[frozenset[Kind], ...] = (frozenset({Kind.B}), frozenset({Kind.I, Kind.W}))
"""The ways a (stage, micro-batch) may run its backward: fused, or split into I then W."""

PLACEMENTS = ("loop", "v", "bidirectional")

# Longest names first so that the regex never stops at "F" inside "SEND_F".
_ACTION_RE = re.compile(
    r"^(\d+)(" + "|".join(sorted((k.value for k in Kind), key=len, reverse=True)) + r")(\d+)$"
)


@dataclass(frozen=True, order=True)
class Action:
    """One computation or one message of one micro-batch at one model stage."""

    stage: int
    """Model stage index, ``0 .. stages*virtual-1`` (its rank: ``Schedule.rank_of``)."""
    kind: Kind
    """A computation (F, B, I, W) or one of the four message kinds."""
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
    model chunks per rank, placed by ``placement`` (module docstring)."""

    name: str
    """Schedule name, one of ``SCHEDULES`` for generated ones."""
    stages: int
    """Number of pipeline ranks (devices), ``p``."""
    microbatches: int
    """Number of micro-batches per step, ``m``."""
    virtual: int
    """Model chunks per rank, ``v`` (1 unless interleaved, 2 for V and bidirectional)."""
    actions: Sequence[Sequence[Step]] = field(repr=False)
    """``actions[rank]`` is what that rank executes, in order (stored as tuples)."""
    placement: str = "loop"
    """Where model stages live and how they chain: one of :data:`PLACEMENTS`."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "actions", tuple(tuple(a) for a in self.actions))
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.placement != "loop" and self.virtual != 2:
            raise ValueError(
                f"placement {self.placement!r} puts exactly two stages on each rank, got "
                f"virtual={self.virtual}; use virtual=2"
            )

    @property
    def num_model_stages(self) -> int:
        return self.stages * self.virtual

    @property
    def stage_share(self) -> float:
        """Fraction of a device's work per micro-batch that one stage's action is: ``1/v`` when
        a micro-batch visits all of a rank's chunks, 1 for the bidirectional replicas (each
        micro-batch visits one of them).  The simulator scales durations and activations by it."""
        return self.stages / len(self.chain(0))

    def rank_of(self, stage: int) -> int:
        p = self.stages
        if self.placement == "loop":
            return stage % p
        return stage if stage < p else 2 * p - 1 - stage

    def local_stages(self, rank: int) -> list[int]:
        """The model stages ``rank`` holds, ascending."""
        return [s for s in range(self.num_model_stages) if self.rank_of(s) == rank]

    def next_stage(self, stage: int) -> int | None:
        """The stage that consumes ``stage``'s output, None at the end of a chain."""
        end = self.stages if self.placement == "bidirectional" and stage < self.stages else self.num_model_stages
        return stage + 1 if stage + 1 < end else None

    def prev_stage(self, stage: int) -> int | None:
        """The stage whose output ``stage`` consumes, None at the start of a chain."""
        start = self.stages if self.placement == "bidirectional" and stage >= self.stages else 0
        return stage - 1 if stage > start else None

    @property
    def weight_stages(self) -> int:
        """How many parts the model's layers are cut into: ``num_model_stages``, or half of it
        for the bidirectional replicas (stage ``s`` holds part ``replica_of(s)``)."""
        return self.stages if self.placement == "bidirectional" else self.num_model_stages

    def replica_of(self, stage: int) -> int:
        """The model stage whose weights ``stage`` holds (itself unless bidirectional)."""
        return stage % self.stages if self.placement == "bidirectional" else stage

    def chain(self, microbatch: int) -> range:
        """The stages micro-batch ``microbatch`` goes through, in order."""
        if self.placement != "bidirectional":
            return range(self.num_model_stages)
        half = (self.microbatches + 1) // 2
        return range(self.stages) if microbatch < half else range(self.stages, 2 * self.stages)

    def neighbour(self, op: Action) -> int | None:
        """The stage at the other end of a message (None if it has none), or of the data a
        computation consumes."""
        info = op.kind.info
        if info.compute:
            if info.consumes is None:
                return None
            return self.prev_stage(op.stage) if info.consumes == "activation" else self.next_stage(op.stage)
        # SEND_F and RECV_B talk to the next stage, RECV_F and SEND_B to the previous one.
        towards_next = info.send == (info.carries == "activation")
        return self.next_stage(op.stage) if towards_next else self.prev_stage(op.stage)

    def peer(self, action: Action) -> int | None:
        """The rank on the other end of a message; ``None`` for a computation."""
        if action.kind.is_compute:
            return None
        other = self.neighbour(action)
        return None if other is None else self.rank_of(other)

    @property
    def has_communication(self) -> bool:
        return any(not op.kind.is_compute for prog in self.actions for s in prog for op in step_ops(s))

    def to_text(self) -> str:
        """``rank r: <steps>`` lines; the whole schedule in the form a runtime log would show."""
        return "\n".join(f"rank {r}: {format_program(p)}" for r, p in enumerate(self.actions))
