"""Every PYCOMM_* environment variable, read here and nowhere else.

``Settings.from_env()`` reads them once; a process group keeps the settings it was built
with (``Group.settings``), so a variable changed later affects the next group, not a
running one.  Bad values raise ``ValueError`` naming the variable and what it accepts.
The README's "Environment variables" table lists the same fields.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os

_ALGO_CHOICES = ("ring", "tree", "exchange", "auto")


def _text(name: str, default: str = "") -> str:
    return os.environ.get(name, "").strip() or default


def _int(name: str, default: int, minimum: int = 0) -> int:
    raw = _text(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return value


def _choice(name: str, choices: tuple[str, ...], default: str) -> str:
    value = _text(name, default).lower()
    if value not in choices:
        raise ValueError(f"{name}={value!r}: use one of {', '.join(choices)}")
    return value


# A timedelta holds at most 999,999,999 days; anything near that is "forever" anyway, and
# deadlines computed from it must not overflow (C++ steady_clock counts nanoseconds in 64
# bits: about 292 years).
MAX_TIMEOUT = datetime.timedelta(days=365 * 100)


def clamp_timeout(seconds: float, what: str) -> float:
    """A timeout in seconds, checked (positive, not NaN) and clamped to MAX_TIMEOUT."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or math.isnan(seconds):
        raise ValueError(f"{what} must be a number of seconds, not {seconds!r}")
    if seconds <= 0:
        raise ValueError(f"{what} must be positive, got {seconds} s")
    return min(float(seconds), MAX_TIMEOUT.total_seconds())


@dataclasses.dataclass(frozen=True)
class Settings:
    """pycomm's environment, as one value."""

    timeout: float | None = None
    """PYCOMM_TIMEOUT: seconds a collective (or start-up) may wait for a peer; None: the
    caller's (default 300)"""
    algo: str = ""
    """PYCOMM_ALGO: 'ring', 'tree', 'exchange' (all_reduce only), 'auto', or per collective
    like NCCL_ALGO ('allreduce:exchange;allgather:ring'); applies where algorithm='auto'"""
    debug: bool = False
    """PYCOMM_DEBUG=INFO (or DEBUG): log each collective's size, algorithm and transport"""
    tune_file: str = ""
    """PYCOMM_TUNE_FILE: the cost-model file `pycomm tune` writes and start-up reads"""
    shm_slot_bytes: int = 256 * 1024
    """PYCOMM_SHM_SLOT_BYTES: bytes of one shared-memory piece; every rank must agree"""
    shm_slots: int = 4
    """PYCOMM_SHM_SLOTS: pieces in flight per peer and lane; every rank must agree"""
    shm_single_copy: str = "auto"
    """PYCOMM_SHM_SINGLE_COPY: 'auto' (single-copy sends from the size the cost model says),
    'always' or 'never' (slots only); single copy needs the start-up probe to succeed"""
    shm_reduce_threads: int = 0
    """PYCOMM_SHM_REDUCE_THREADS: threads each rank reduces received pieces with; 0 ('auto'):
    the cores this process may run on divided by the job's processes on its host, so
    never more threads than idle cores (1 for 2 ranks on 2 cores)"""
    host_id: str = ""
    """PYCOMM_HOST_ID: overrides the host identity that groups ranks into hosts"""
    cuda_transport: str = "auto"
    """PYCOMM_CUDA_TRANSPORT: 'auto' (CUDA IPC on one host, NCCL across hosts or for an
    explicit ring/tree), 'ipc' or 'nccl'"""
    cuda_oneshot_bytes: int = 256 * 1024
    """PYCOMM_CUDA_ONESHOT_BYTES: largest CUDA IPC all-reduce done one-shot"""
    cuda_ipc_bytes: int = 32 << 20
    """PYCOMM_CUDA_IPC_BYTES: CUDA IPC staging bytes per rank and phase"""
    nccl_piece_bytes: int = 1 << 20
    """PYCOMM_NCCL_PIECE_BYTES: piece size of the NCCL rounds (a multiple of 16)"""

    @classmethod
    def from_env(cls) -> Settings:
        timeout = _text("PYCOMM_TIMEOUT")
        if timeout:
            try:
                seconds = float(timeout)
            except ValueError:
                raise ValueError(f"PYCOMM_TIMEOUT={timeout!r} is not a number of seconds") from None
            seconds = clamp_timeout(seconds, "PYCOMM_TIMEOUT")
        else:
            seconds = None
        piece = _int("PYCOMM_NCCL_PIECE_BYTES", 1 << 20, minimum=16)
        if piece % 16:
            raise ValueError(f"PYCOMM_NCCL_PIECE_BYTES={piece} must be a multiple of 16")
        return cls(
            timeout=seconds,
            algo=_text("PYCOMM_ALGO"),
            debug=_text("PYCOMM_DEBUG").upper() in ("INFO", "DEBUG"),
            tune_file=_text("PYCOMM_TUNE_FILE"),
            shm_slot_bytes=_int("PYCOMM_SHM_SLOT_BYTES", 256 * 1024, minimum=4096),
            shm_slots=_int("PYCOMM_SHM_SLOTS", 4, minimum=2),
            shm_single_copy=_choice("PYCOMM_SHM_SINGLE_COPY", ("auto", "always", "never"), "auto"),
            shm_reduce_threads=(0 if _text("PYCOMM_SHM_REDUCE_THREADS").lower() == "auto"
                                else _int("PYCOMM_SHM_REDUCE_THREADS", 0, minimum=0)),
            host_id=_text("PYCOMM_HOST_ID"),
            cuda_transport=_choice("PYCOMM_CUDA_TRANSPORT", ("auto", "ipc", "nccl"), "auto"),
            cuda_oneshot_bytes=_int("PYCOMM_CUDA_ONESHOT_BYTES", 256 * 1024),
            cuda_ipc_bytes=_int("PYCOMM_CUDA_IPC_BYTES", 32 << 20, minimum=4096),
            nccl_piece_bytes=piece,
        )
