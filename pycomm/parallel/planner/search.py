"""Enumerate parallel shapes, keep those that fit in memory, rank them by predicted step time.

Contract: :func:`plan` (``model, cluster, global_batch``) returns a :class:`Plans`, the feasible
:class:`Plan` s fastest first; :func:`estimate` predicts one given shape.  The search walks
dp x tp x pp (their product is the cluster's devices) x schedule x virtual stages (every
schedule of ``pipeline.SCHEDULES`` at every ``virtual`` its builder accepts) x micro-batch size
x recomputation (none, selective, full) x ZeRO stage (0, 1).  Memory comes from ``memory.py``,
time from ``timing.py``; nothing here runs a model.
"""
from __future__ import annotations

import bisect
import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pycomm.parallel import pipeline as pl

from .cluster import Cluster
from .explain import explain as _explain_plan
from .explain import frontier_plot as _frontier_plot
from .explain import table as _table
from .memory import Memory, memory
from .model import Model
from .timing import PipelineShapeError, Time, step_time

__all__ = ["Plan", "Plans", "plan", "estimate", "RECOMPUTE"]

RECOMPUTE = ("none", "selective", "full")
NO_PIPELINE = "-"
"""The schedule column of a plan with pp=1."""


@dataclass(frozen=True)
class Plan:
    """One parallel shape with its predicted time and memory."""

    dp: int
    tp: int
    pp: int
    schedule: str
    """Pipeline schedule (``-`` when pp=1)."""
    virtual: int
    """Model chunks per pipeline device."""
    micro_batch: int
    """Sequences per micro-batch."""
    microbatches: int
    """Micro-batches per step per data-parallel replica."""
    recompute: str
    zero: int
    time: Time
    memory: Memory
    model: Model = field(repr=False)
    cluster: Cluster = field(repr=False)
    global_batch: int = 0

    @property
    def step_time(self) -> float:
        return self.time.total

    @property
    def tokens_per_s(self) -> float:
        return self.global_batch * self.model.seq / self.step_time

    @property
    def mfu(self) -> float:
        """Model FLOPs (no recomputation) per second over the devices' peak."""
        flops = self.model.iteration_flops(self.global_batch, "none")
        return flops / self.step_time / (self.cluster.devices * self.cluster.peak_flops)

    @property
    def tflops_per_device(self) -> float:
        """FLOP/s per device counting the recomputation, as Narayanan et al. report them."""
        flops = self.model.iteration_flops(self.global_batch, self.recompute)
        return flops / self.step_time / self.cluster.devices / 1e12

    @property
    def shape(self) -> str:
        sched = self.schedule + (f"(v={self.virtual})" if self.virtual > 1 else "")
        return (f"dp={self.dp} tp={self.tp} pp={self.pp} {sched} b={self.micro_batch} m={self.microbatches} "
                f"recompute={self.recompute} zero={self.zero}")

    def train_gpt_args(self) -> list[str]:
        """The flags of ``examples/train_gpt.py`` that run this shape."""
        args = ["--dp", str(self.dp), "--tp", str(self.tp), "--pp", str(self.pp),
                "--microbatches", str(self.microbatches), "--batch", str(self.global_batch)]
        if self.pp > 1:
            args += ["--schedule", self.schedule, "--virtual", str(self.virtual)]
        if self.zero:
            args.append("--zero")
        if self.recompute == "full":
            args.append("--checkpoint")
        return args


@dataclass
class Plans:
    """The search's outcome: feasible plans fastest first, and why the others were dropped."""

    model: Model
    cluster: Cluster
    global_batch: int
    plans: list[Plan]
    rejected: Counter
    """reason -> count of shapes dropped (memory, schedule refused it, ...)."""

    @property
    def best(self) -> Plan:
        if not self.plans:
            reasons = ", ".join(f"{n} {r}" for r, n in self.rejected.most_common())
            raise ValueError(f"no parallel shape of {self.model.name} fits {self.cluster.describe()} "
                             f"with global batch {self.global_batch} ({reasons}); add devices or memory, "
                             f"or allow recomputation / ZeRO")
        return self.plans[0]

    def __iter__(self):
        return iter(self.plans)

    def __len__(self) -> int:
        return len(self.plans)

    def table(self, n: int = 10) -> str:
        """The ``n`` fastest plans with their time breakdown."""
        return _table(self, n)

    def explain(self, index: int = 0) -> str:
        """The formulas of the ``index``-th plan (0: the best) with the numbers in."""
        return _explain_plan(self.plans[index] if self.plans else self.best)

    def plot(self, path, title: str | None = None) -> str:
        """PNG of step time against memory for every feasible plan; returns the path."""
        return _frontier_plot(self, path, title)

    def frontier(self) -> list[Plan]:
        """The plans no other plan beats on both step time and memory (fastest first)."""
        out: list[Plan] = []
        for p in self.plans:  # sorted by time: keep each that needs less memory than all faster ones
            if not out or p.memory.total < out[-1].memory.total:
                out.append(p)
        return out


def _rank(p: Plan) -> tuple[float, float]:
    return (p.step_time, p.memory.total)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"plan: {name} must be a positive int, got {value!r}")
    return value


def estimate(model: Model, cluster: Cluster, global_batch: int, *, dp: int, tp: int, pp: int,
             micro_batch: int, schedule: str = "1f1b", virtual: int = 1, recompute: str = "none",
             zero: int = 0, overlap_grad_reduce: bool = True, step_overhead: float = 0.0,
             simulate: bool = True) -> Plan:
    """Predicted time and memory of one shape (whether or not it fits in memory);
    ``simulate=False``: lower bounds without the pipeline simulator (no bubble, one
    micro-batch in flight)."""
    for name, value in (("dp", dp), ("tp", tp), ("pp", pp), ("micro_batch", micro_batch),
                        ("global_batch", global_batch), ("virtual", virtual)):
        _check_positive(name, value)
    if dp * tp * pp != cluster.devices:
        raise ValueError(f"dp*tp*pp = {dp * tp * pp} must equal the cluster's {cluster.devices} devices")
    if global_batch % (dp * micro_batch):
        raise ValueError(f"global_batch={global_batch} must split into dp={dp} replicas of micro-batches "
                         f"of {micro_batch}; use a multiple of {dp * micro_batch}")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if zero not in (0, 1):
        raise ValueError(f"zero must be 0 or 1 (ZeRO-1 shards the optimizer state), got {zero!r}")
    if pp == 1:
        schedule, virtual = NO_PIPELINE, 1
    if recompute != "none" and schedule in pl.SCHEDULES and pl.SCHEDULES[schedule].splits_backward():
        raise ValueError(f"schedule {schedule!r} splits the backward into I and W, which would recompute a "
                         f"checkpointed forward twice; use recompute='none' or a schedule with a fused backward")
    m = global_batch // (dp * micro_batch)
    t = step_time(model, cluster, dp=dp, tp=tp, pp=pp, schedule=schedule, virtual=virtual,
                  micro_batch=micro_batch, microbatches=m, recompute=recompute, zero=zero,
                  overlap_grad_reduce=overlap_grad_reduce, step_overhead=step_overhead, simulate=simulate)
    mem = memory(model, tp=tp, pp=pp, dp=dp, micro_batch=micro_batch, recompute=recompute, zero=zero,
                 in_flight=t.in_flight)
    return Plan(dp=dp, tp=tp, pp=pp, schedule=schedule, virtual=virtual, micro_batch=micro_batch,
                microbatches=m, recompute=recompute, zero=zero, time=t, memory=mem, model=model,
                cluster=cluster, global_batch=global_batch)


def _tp_options(model: Model, world: int) -> list[int]:
    return [t for t in _divisors(world)
            if model.heads % t == 0 and model.kv_heads % t == 0 and model.ffn % t == 0 and model.vocab % t == 0]


def plan(model: Model, cluster: Cluster, global_batch: int, *,
         tp: Iterable[int] | int | None = None, pp: Iterable[int] | int | None = None,
         schedules: Iterable[str] | None = None, virtual: Iterable[int] = (1, 2, 3, 4),
         micro_batches: Iterable[int] | None = None, max_micro_batch: int = 8,
         recompute: Iterable[str] = RECOMPUTE, zero: Iterable[int] = (0, 1),
         overlap_grad_reduce: bool = True, step_overhead: float = 0.0, keep: int = 40) -> Plans:
    """Feasible shapes of ``model`` on ``cluster`` for ``global_batch`` sequences per step,
    fastest first: at least the ``keep`` fastest, exactly (shapes whose lower bound is slower
    than the ``keep``-th are not simulated).  Keyword arguments restrict the search (an int or
    a list each)."""
    _check_positive("global_batch", global_batch)
    world = cluster.devices
    tps = [tp] if isinstance(tp, int) else list(tp) if tp is not None else _tp_options(model, world)
    pps = [pp] if isinstance(pp, int) else list(pp) if pp is not None else _divisors(world)
    # Default: the synchronous schedules that keep one copy of each stage (Chimera's two replicas and
    # PipeDream-2BW's weight versions are not in the memory model, and train_gpt refuses Chimera).
    names = list(schedules) if schedules is not None else [
        n for n, spec in pl.SCHEDULES.items() if spec.synchronous and n != "chimera"]
    recomputes = list(recompute)
    for r in recomputes:
        if r not in RECOMPUTE:
            raise ValueError(f"recompute must be among {RECOMPUTE}, got {r!r}")
    rejected: Counter = Counter()
    shapes: list[dict[str, Any]] = []
    for t in tps:
        for p in pps:
            if world % (t * p) or p > model.layers:
                continue
            d = world // (t * p)
            if global_batch % d:
                rejected["global batch not divisible by dp"] += 1
                continue
            per_replica = global_batch // d
            bs = ([b for b in micro_batches if per_replica % b == 0] if micro_batches is not None
                  else [b for b in _divisors(per_replica) if b <= max_micro_batch])
            pipes = [(NO_PIPELINE, 1)] if p == 1 else [
                (n, v) for n in names for v in virtual
                if p * v <= model.layers and not (v == 1 and "interleaved" in n)]
            zs = [z for z in zero if z in (0, 1)] if d > 1 else [0]
            for b, (name, v), r, z in itertools.product(bs, pipes, recomputes, zs):
                if r != "none" and name in pl.SCHEDULES and pl.SCHEDULES[name].splits_backward():
                    rejected["recomputation under a split backward (I and W)"] += 1
                    continue
                shapes.append(dict(dp=d, tp=t, pp=p, micro_batch=b, schedule=name, virtual=v, recompute=r, zero=z))
    common: dict[str, Any] = dict(overlap_grad_reduce=overlap_grad_reduce, step_overhead=step_overhead)
    # Branch and bound: the bound (no bubble, one micro-batch in flight) is cheap; simulate the
    # pipeline only for shapes whose bound can still make the best `keep`.
    bounded = []
    for shape in shapes:
        lower = estimate(model, cluster, global_batch, simulate=False, **shape, **common)
        if lower.memory.total > cluster.memory:
            rejected["out of memory"] += 1
        else:
            bounded.append((lower.step_time, shape))
    bounded.sort(key=lambda x: x[0])
    plans: list[Plan] = []
    refused: set = set()
    for i, (lower_time, shape) in enumerate(bounded):
        if len(plans) >= keep and lower_time > plans[keep - 1].step_time:
            rejected[f"slower than the best {keep} (bound)"] += len(bounded) - i
            break
        key = (shape["pp"], shape["dp"], shape["micro_batch"], shape["schedule"], shape["virtual"])
        if key in refused:
            continue
        try:
            candidate = estimate(model, cluster, global_batch, **shape, **common)
        except PipelineShapeError:  # the schedule refuses (p, m, v) whatever the rest
            rejected[f"refused by {shape['schedule']}"] += 1
            refused.add(key)
            continue
        if candidate.memory.total > cluster.memory:
            rejected["out of memory"] += 1
            continue
        bisect.insort(plans, candidate, key=_rank)
    return Plans(model, cluster, global_batch, plans, rejected)


