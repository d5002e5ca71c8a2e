"""Pipeline parallelism: actions as data (``actions``: kinds with their metadata, placements),
schedules and their registry (``schedules``), a validator (``validate``), an event simulator
(``simulate``) and drawings (``plot``).

    from pycomm import parallel
    r = parallel.pipeline.simulate("zb_h1", stages=4, microbatches=8)   # any key of SCHEDULES
    r.bubble_fraction, r.steady_bubble_fraction, r.peak_activations
    r.plot("zb_h1.png"); print(r.grid())

The runtime (``runtime.Pipeline``, imports torch and pycomm) consumes
``add_communication(build_schedule(...)).actions[rank]``; ``stages.partition`` splits layers.
"""
import importlib

from .actions import BACKWARD_FORMS, KIND_INFO, PLACEMENTS, KindInfo
from .comm import add_communication
from .engine import Durations
from .schedules import (
    SCHEDULES,
    Action,
    Batch,
    Kind,
    Schedule,
    ScheduleError,
    ScheduleSpec,
    build_schedule,
    chimera,
    dualpipe_v,
    format_program,
    gpipe,
    interleaved_1f1b,
    looped_bfs,
    one_f_one_b,
    parse_program,
    parse_step,
    pipedream_2bw,
    zb_h1,
    zb_h2,
    zb_v,
)
from .simulate import SimulationResult, TimedAction, simulate, simulate_schedule
from .stages import local_stages, partition
from .table import bubble_table, timelines
from .validate import find_problems, validate

__all__ = [
    "SCHEDULES",
    "KIND_INFO",
    "BACKWARD_FORMS",
    "PLACEMENTS",
    "Action",
    "Batch",
    "Kind",
    "KindInfo",
    "Durations",
    "Schedule",
    "ScheduleError",
    "ScheduleSpec",
    "SimulationResult",
    "TimedAction",
    "add_communication",
    "bubble_table",
    "timelines",
    "build_schedule",
    "find_problems",
    "format_program",
    "gpipe",
    "interleaved_1f1b",
    "one_f_one_b",
    "looped_bfs",
    "zb_h1",
    "zb_h2",
    "zb_v",
    "dualpipe_v",
    "chimera",
    "pipedream_2bw",
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
