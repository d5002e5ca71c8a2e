"""Parallel layers.  ``pipeline``: pipeline-parallel schedules, their validator and simulator
(pure Python: no torch, no compiled extension at import time)."""
from . import pipeline

__all__ = ["pipeline"]
