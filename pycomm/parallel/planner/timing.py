"""Predicted step time of one parallel shape: compute, exposed communication and the bubble.

Contract: :func:`step_time` returns a :class:`Time` for one training iteration on the slowest
pipeline stage.  Per micro-batch of ``b`` sequences the stage's forward takes its FLOPs over the
device's achievable FLOP/s (split over ``tp``) plus ``layer_overhead`` per block, and its
tensor-parallel all-reduces (2 per block forward, 2 backward, 2 more in a full recomputation's
forward; ``b·s·h`` elements each, inside a node when ``tp`` fits one); the backward is twice the
forward plus the recomputation.  Those two durations go through pycomm's own pipeline simulator
(its event engine, ``pipeline.simulate.execute``, on the compute-only schedule) whose makespan
minus the busy time is the bubble.  Then come the pipeline's point-to-point messages on the
critical path (``2·(v·m + p - 1)`` of ``b·s·h/t`` elements: Megatron's scatter/gather), the
data-parallel gradient all-reduce (exposed beyond the last micro-batch's backward when it
overlaps in buckets) or ZeRO-1's reduce-scatter + all-gather, and ``step_overhead``.

The simulator times a chain's first stage as a runtime runs it: it has no input to
differentiate, so a split backward's I is empty there and its W is the whole backward (with the
paper's uniform I, ZB-H1 on two stages would show a bubble no runtime reaches).

Devices that share processors (``Cluster.cores_per_node``: more CPU processes than cores) run
the busy ones at full speed while others idle, so the step is the larger of the dedicated-device
time (work plus bubble) and the whole shape's work over the cores; the difference is ``shared``.

Large pipelines are simulated at ``m1 = p + m mod p`` and ``m1 + p`` micro-batches and the
bubble (and in-flight micro-batches) extrapolated linearly in ``m``: every schedule's idle time
is affine in ``m`` once ``m >= p`` (exact for GPipe, 1F1B and interleaved 1F1B).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

from pycomm.parallel import pipeline as pl
from pycomm.parallel.pipeline.simulate import execute

from .cluster import Cluster
from .memory import stage_params
from .model import Model

__all__ = ["Time", "step_time", "pipeline_makespan", "PipelineShapeError"]

# Simulate exactly below this many compute actions (p·m·v); extrapolate above.
_EXACT_ACTIONS = 3000
# DataParallel's default bucket (bucket_cap_mb=25): the last bucket never overlaps.
_BUCKET_BYTES = 25 * 2**20


class PipelineShapeError(ValueError):
    """The schedule's builder refused this (stages, micro-batches, virtual)."""


@dataclass(frozen=True)
class Time:
    """Seconds of one iteration on the slowest stage, by cause."""

    compute: float
    """Forward and backward FLOPs (and per-block overheads), all micro-batches."""
    recompute: float
    """The recomputation's extra forward."""
    tp_comm: float
    """Tensor-parallel all-reduces (never overlapped)."""
    pp_comm: float
    """Pipeline point-to-point messages on the critical path."""
    dp_comm: float
    """Data-parallel gradient reduction (ZeRO-1: plus the parameter all-gather), exposed part."""
    bubble: float
    """Pipeline idle time of the stage (from the simulator)."""
    other: float
    """Fixed per-step costs (optimizer launch, loss)."""
    in_flight: float
    """Micro-batches whose activations the busiest stage holds (full-stage units)."""
    shared: float = 0.0
    """Waiting for a processor shared with other devices (``Cluster.cores_per_node``)."""

    @property
    def work(self) -> float:
        """Everything but the waits (bubble, shared processor)."""
        return self.compute + self.recompute + self.tp_comm + self.pp_comm + self.dp_comm + self.other

    @property
    def total(self) -> float:
        return self.work + self.bubble + self.shared


def _fallback_in_flight(name: str, p: int, m: int, v: int) -> float:
    """Peak micro-batches held by stage 0 when the simulator does not report them."""
    if name == "gpipe":
        return m
    if name == "interleaved_1f1b" and v > 1:
        return min(m * v, (v - 1) * p + 2 * (p - 1) + 1) / v
    return min(p, m) if name == "1f1b" else m


@lru_cache(maxsize=4096)
def _simulate(name: str, p: int, m: int, v: int, ratio: float) -> tuple[float, float]:
    """(makespan with t_fwd=1, t_bwd=ratio; peak in-flight micro-batches, stage units)."""
    try:
        schedule = pl.build_schedule(name, p, m, v)
    except ValueError as e:  # ScheduleError is a ValueError, and so are the builders' refusals
        raise PipelineShapeError(str(e)) from e
    # The engine alone: the builders' schedules are validated by their own tests, and
    # validation costs three times the simulation.
    result = execute(schedule, 1.0, ratio, first_stage_input_grad=False)
    peaks = getattr(result, "peak_activations", None)
    held = max(peaks) / v if peaks else _fallback_in_flight(name, p, m, v)
    return result.makespan, held


def pipeline_makespan(name: str, p: int, m: int, v: int, t_fwd: float, t_bwd: float) -> tuple[float, float]:
    """(makespan in seconds, in-flight micro-batches) of ``m`` micro-batches through ``p``
    stages with the named schedule; raises :class:`PipelineShapeError` if it refuses the shape."""
    # one decimal of the backward/forward ratio: finer changes move the bubble by well under 1%
    ratio = round(t_bwd / t_fwd, 1) if t_fwd > 0 else 2.0
    if p * m * v <= _EXACT_ACTIONS or m < 2 * p:
        span, held = _simulate(name, p, m, v, ratio)
        return span * t_fwd, held
    m1 = p + m % p
    try:
        s1, h1 = _simulate(name, p, m1, v, ratio)
        s2, h2 = _simulate(name, p, m1 + p, v, ratio)
    except PipelineShapeError:
        span, held = _simulate(name, p, m, v, ratio)
        return span * t_fwd, held
    k = (m - m1) / p
    return (s1 + k * (s2 - s1)) * t_fwd, h1 + k * (h2 - h1)


def step_time(model: Model, cluster: Cluster, *, dp: int, tp: int, pp: int, schedule: str, virtual: int,
              micro_batch: int, microbatches: int, recompute: str, zero: int,
              overlap_grad_reduce: bool = True, step_overhead: float = 0.0, simulate: bool = True) -> Time:
    """Predicted iteration time (see the module doc); raises PipelineShapeError.  With
    ``simulate=False`` the bubble is 0 and one micro-batch is in flight: a lower bound on
    both time and memory, which the search uses to skip simulating hopeless shapes."""
    b, m, s, h = micro_batch, microbatches, model.seq, model.hidden
    tokens = b * s
    blocks = math.ceil(model.layers / pp)
    speed = cluster.flops
    elementwise = (model.layer_fwd_elementwise_bytes(tokens, tp) / cluster.memory_bandwidth
                   if cluster.memory_bandwidth else 0.0)
    layer_fwd = model.layer_fwd_flops(tokens) / tp / speed + elementwise + cluster.layer_overhead
    head_fwd = model.head_fwd_flops(tokens) / tp / speed
    c_fwd = blocks * layer_fwd + head_fwd
    c_bwd = 2 * c_fwd
    if recompute == "full":
        r = blocks * layer_fwd
    elif recompute == "selective":
        r = blocks * model.attention_fwd_flops(tokens) / tp / speed
    else:
        r = 0.0
    ar = cluster.collective("all_reduce", tokens * h * model.dtype_bytes, tp, tp)
    k_fwd = 2 * blocks * ar
    k_bwd = 2 * blocks * ar + (2 * blocks * ar if recompute == "full" else 0.0)
    if pp > 1 and schedule in pl.SCHEDULES and pl.SCHEDULES[schedule].splits_backward():
        c_bwd += blocks * cluster.layer_overhead  # I and W walk the graph once each
    t_fwd, t_bwd = c_fwd + k_fwd, c_bwd + r + k_bwd
    if pp > 1:
        if simulate:
            span, held = pipeline_makespan(schedule, pp, m, virtual, t_fwd, t_bwd)
            bubble = max(0.0, span - m * (t_fwd + t_bwd))
        else:
            bubble, held = 0.0, 1.0
        cross = tp * dp * pp > cluster.devices_per_node
        msg = cluster.p2p(tokens * h * model.dtype_bytes / tp, cross)
        pp_comm = 2 * (virtual * m + pp - 1) * msg
    else:
        bubble, held, pp_comm = 0.0, 1.0, 0.0
    grad_bytes = stage_params(model, pp, tp) * model.dtype_bytes
    if dp > 1 and zero >= 1:
        dp_comm = (cluster.collective("reduce_scatter", grad_bytes, dp, tp * dp)
                   + cluster.collective("all_gather", grad_bytes, dp, tp * dp))
    elif dp > 1:
        full = cluster.collective("all_reduce", grad_bytes, dp, tp * dp)
        if overlap_grad_reduce:
            last = cluster.collective("all_reduce", min(grad_bytes, _BUCKET_BYTES), dp, tp * dp)
            dp_comm = max(full - t_bwd, last)
        else:
            dp_comm = full
    else:
        dp_comm = 0.0
    t = Time(compute=m * (c_fwd + c_bwd), recompute=m * r, tp_comm=m * (k_fwd + k_bwd), pp_comm=pp_comm,
             dp_comm=dp_comm, bubble=bubble, other=step_overhead, in_flight=held)
    devices = min(dp * tp * pp, cluster.devices_per_node)  # those of the shape on one node
    if cluster.cores_per_node and devices > cluster.cores_per_node:
        shared = t.work * devices / cluster.cores_per_node - (t.work + t.bubble)
        t = dataclasses.replace(t, shared=max(0.0, shared))
    return t

