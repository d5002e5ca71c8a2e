"""Pipeline parallelism: schedules as data (``schedules``), their validator (``validate``),
an event simulator (``simulate``) and drawings (``plot``).

    from pycomm import parallel
    r = parallel.pipeline.simulate("1f1b", stages=4, microbatches=8)
    r.bubble_fraction, r.bubble_overhead, r.peak_activations
    r.plot("1f1b.png"); print(r.grid())

The runtime (``runtime.Pipeline``, imports torch and pycomm) consumes
``add_communication(build_schedule(...)).actions[rank]``; ``stages.partition`` splits layers.
"""
import importlib

from .comm import add_communication
from .schedules import (
    SCHEDULES,
    Action,
    Batch,
    Kind,
    Schedule,
    ScheduleError,
    build_schedule,
    format_program,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    parse_program,
    parse_step,
)
from .simulate import SimulationResult, TimedAction, simulate, simulate_schedule
from .stages import local_stages, partition
from .table import bubble_table
from .validate import find_problems, validate

__all__ = [
    "SCHEDULES",
    "Action",
    "Batch",
    "Kind",
    "Schedule",
    "ScheduleError",
    "SimulationResult",
    "TimedAction",
    "add_communication",
    "bubble_table",
    "build_schedule",
    "find_problems",
    "format_program",
    "gpipe",
    "interleaved_1f1b",
    "one_f_one_b",
    "parse_program",
    "parse_step",
    "simulate",
    "simulate_schedule",
    "validate",
    "partition",
    "local_stages",
    "Pipeline",
    "StepStats",
]


def __getattr__(name):
    # The runtime needs torch and pycomm's extension; schedules and the simulator stay pure Python.
    if name in ("Pipeline", "StepStats"):
        return getattr(importlib.import_module(f"{__name__}.runtime"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
