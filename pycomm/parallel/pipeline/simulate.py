"""Event simulation of a pipeline schedule: the same per-rank step lists the runtime executes.

Contract
--------
:func:`simulate` (``name, stages, microbatches, virtual=1, t_fwd=1.0, t_bwd=2.0``) builds the
named schedule, adds communication, validates it and runs it; :func:`simulate_schedule` does the
last two for any :class:`~.schedules.Schedule`.  Both return a :class:`SimulationResult`.

Time model: a forward of one micro-batch through one model stage takes ``t_fwd / virtual``, a
backward ``t_bwd / virtual``, its halves I and W ``t_input / virtual`` and ``t_weight / virtual``
(each half of ``t_bwd`` unless given; when both are given the fused B takes their sum), as
``KindInfo.duration`` says (a chunk is 1/v of a device's layers, so a device's total compute
is ``m * (t_fwd + t_bwd)`` whatever ``v`` is); ``first_stage_input_grad=False`` times a chain's
first stage as a runtime runs it, I empty and W the whole backward (``Durations``).
Messages take no time.  A receive (alone or in a Batch) waits until the peer has posted the
matching send; a send is posted and completes in the background (``isend``, the runtime's
model), so it never holds its rank back.  A schedule without messages is run with its data
dependencies only (an ideal network); the communication pass must not make it slower, and the
tests check that it does not.

The validator runs the same engine with ``blocking_sends=True``: a step of messages completes
only when every peer has reached the step holding the matching message (the worst case, a
rendezvous send).  A schedule that passes cannot hang under either model.  Timing under that
worst case is available too (``execute(..., blocking_sends=True)``); interleaved 1F1B then
loses some time to senders waiting for busy receivers (``docs/pipeline.md`` shows how much).

Peak activations: on each rank, the largest number of (stage, micro-batch) forwards whose
backward (B, or its input half I) has not run yet — the zero-bubble paper's memory count
(``KindInfo.activations``); a pending W keeps only the inputs of the weight matmuls, which the
runtime measures in bytes.  For interleaved schedules a
chunk's activation counts as one (it is 1/v of a full stage's).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .comm import add_communication
from .engine import Durations, Execution, TimedAction, execute
from .plot import format_grid, plot_timeline
from .schedules import Schedule, build_schedule
from .validate import validate

__all__ = ["TimedAction", "Execution", "SimulationResult", "execute", "simulate", "simulate_schedule"]


@dataclass(frozen=True)
class SimulationResult:
    """Outcome of simulating one schedule; ``plot(path)`` draws it, ``grid()`` prints it."""

    schedule: Schedule
    """The lowered schedule that was simulated (what the runtime would execute)."""
    t_fwd: float
    """Forward time of one micro-batch through one full stage (all chunks of a device)."""
    t_bwd: float
    """Backward time, same convention."""
    timeline: tuple[tuple[TimedAction, ...], ...]
    """Per device, its computations with start and end times."""
    makespan: float
    """Time from the first computation to the last."""
    peak_activations: tuple[int, ...]
    """Per device, most micro-batch activations held at once (chunk activations if v > 1;
    a forward adds one, its B or I frees it: the zero-bubble paper's count)."""
    t_input: float | None = None
    """Input-gradient (I) time on a full stage (None: half of t_bwd)."""
    t_weight: float | None = None
    """Weight-gradient (W) time on a full stage (None: half of t_bwd)."""
    busy: float = field(init=False)
    """Sum of computation time over all devices."""

    def __post_init__(self) -> None:
        d = Durations(self.t_fwd, self.t_bwd, self.t_input, self.t_weight)
        object.__setattr__(self, "t_input", d.input)
        object.__setattr__(self, "t_weight", d.weight)
        object.__setattr__(
            self, "busy", sum(t.end - t.start for row in self.timeline for t in row)
        )

    @property
    def idle(self) -> float:
        """Device time spent waiting (the bubble), summed over devices."""
        return self.schedule.stages * self.makespan - self.busy

    @property
    def bubble_fraction(self) -> float:
        """idle / total device time; (p-1)/(m+p-1) for GPipe and 1F1B."""
        return self.idle / (self.schedule.stages * self.makespan)

    @property
    def steady_bubble_fraction(self) -> float:
        """Idle time inside each device's own span (its first start to its last end) over the
        sum of the spans: the bubble when consecutive steps overlap instead of flushing (the
        zero-bubble paper's post-validation, PipeDream-2BW's asynchrony), where the stagger at
        the start and end of a step is hidden by the neighbouring steps."""
        spans = [row[-1].end - row[0].start for row in self.timeline if row]
        busy = [sum(t.end - t.start for t in row) for row in self.timeline if row]
        return (sum(spans) - sum(busy)) / sum(spans) if spans else 0.0

    @property
    def bubble_overhead(self) -> float:
        """idle / ideal compute time; (p-1)/m for GPipe and 1F1B, (p-1)/(v*m) interleaved."""
        return self.idle / self.busy

    @property
    def peak_stage_activations(self) -> tuple[float, ...]:
        """Per device, peak activations in full-stage micro-batch units (a chunk's activation is
        ``Schedule.stage_share`` of a stage's), comparable across schedules."""
        return tuple(a * self.schedule.stage_share for a in self.peak_activations)

    def grid(self, unit: float | None = None) -> str:
        """Text grid: one row per device, one column per time step (see ``plot.format_grid``)."""
        return format_grid(self, unit)

    def plot(self, path, title: str | None = None):
        """Write the PNG timeline to ``path`` and return the path (see ``plot.plot_timeline``)."""
        return plot_timeline(self, path, title=title)


def simulate_schedule(schedule: Schedule, t_fwd: float = 1.0, t_bwd: float = 2.0, *,
                      t_input: float | None = None, t_weight: float | None = None,
                      first_stage_input_grad: bool = True) -> SimulationResult:
    """Validate and simulate a given schedule (compute-only or lowered) as is."""
    d = Durations(t_fwd, t_bwd, t_input, t_weight)
    validate(schedule)
    ex = execute(schedule, d.fwd, d.bwd, t_input=d.input, t_weight=d.weight,
                 first_stage_input_grad=first_stage_input_grad)
    return SimulationResult(schedule, d.fwd, d.bwd, ex.timeline, ex.makespan, ex.peak_activations,
                            d.input, d.weight)


def simulate(
    schedule: str,
    stages: int,
    microbatches: int,
    virtual: int = 1,
    t_fwd: float = 1.0,
    t_bwd: float = 2.0,
    *,
    t_input: float | None = None,
    t_weight: float | None = None,
    first_stage_input_grad: bool = True,
) -> SimulationResult:
    """Simulate the named schedule (a key of ``SCHEDULES``) with communication."""
    compute = build_schedule(schedule, stages, microbatches, virtual)
    d = Durations(t_fwd, t_bwd, t_input, t_weight)
    lowered = add_communication(compute, d.fwd, d.bwd, t_input=d.input, t_weight=d.weight)
    return simulate_schedule(lowered, d.fwd, d.bwd, t_input=d.input, t_weight=d.weight,
                             first_stage_input_grad=first_stage_input_grad)
