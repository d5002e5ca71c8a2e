"""The alpha-beta cost model that picks an algorithm when ``algorithm="auto"``.

Like NCCL's tuning model it is one formula per (collective, algorithm): a latency per step
times the number of steps, plus bytes over bandwidth, with ``alpha`` seconds per step,
``beta`` seconds per byte moved and ``gamma`` seconds per byte reduced.  The formulas live
in one place, the collective table (csrc/algorithms/collectives.cpp), which this module
reads through pycomm._C; ``pycomm model`` prints them.  Choosing is taking the cheapest.

The constants come from ``pycomm tune`` (measured on this machine, saved to a JSON file) or
from defaults measured on a 2-core x86 VM.  Every rank must choose alike, so rank 0's model
is shared through the rendezvous store when a process group starts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np

from pycomm import _C
from pycomm._codes import ALGORITHMS
from pycomm._codes import COLLECTIVES as COLLECTIVE_CODES

COLLECTIVES = tuple(row["name"] for row in _C.TABLE if row["setting"])
"""the collectives whose algorithm the model (or PYCOMM_ALGO) chooses"""
_ROWS = {row["name"]: row for row in _C.TABLE}
_ALGORITHM_NAMES = {code: name for name, code in ALGORITHMS.items()}


def default_path(setting: str = "") -> Path:
    """$PYCOMM_TUNE_FILE (`setting`), else ~/.cache/pycomm/tune.json (XDG_CACHE_HOME respected)."""
    if setting:
        return Path(setting)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "pycomm" / "tune.json"


def algorithms(collective: str) -> list[str]:
    """The algorithms the collective table has for `collective`."""
    return list(_ROWS[collective]["algorithms"])


def tree_depth(p: int) -> int:
    """Edges from the root to the deepest leaf of the binary tree over p ranks."""
    return _C.tree_depth(p)


def algorithm_override(collective: str, setting: str) -> str | None:
    """What a PYCOMM_ALGO `setting` says for `collective` ('ring', 'tree', ...), or None (use
    the model).  The setting is 'ring', 'tree', 'exchange', 'auto' or per collective, like NCCL_ALGO:
    'allreduce:tree;allgather:ring'."""
    if not setting:
        return None
    code = _C.algo_override(setting, COLLECTIVE_CODES[collective])
    return None if code == ALGORITHMS["direct"] else _ALGORITHM_NAMES[code]


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Constants of the alpha-beta model, in seconds."""

    alpha: float = 4e-6
    """latency of one step: a piece handed from one rank to the next"""
    beta: float = 1 / 6e9
    """time per byte moved through the transport"""
    gamma: float = 1 / 12e9
    """time per byte reduced"""
    copy_alpha: float = 10e-6
    """latency of one step when the shared-memory transport sends single-copy: the receiver
    reads the sender's buffer (process_vm_readv) and the sender waits until it has"""
    copy_beta: float = 1 / 6e9
    """time per byte moved single-copy.  The defaults never pick single copy: on the 2-core
    CI machine (loaded) it measured no faster than the slots; `pycomm tune` measures both
    paths on this machine and single copy is used from the size where it pays"""
    source: str = "defaults"
    """where the constants came from: 'defaults' or the tune file's path"""

    def time(self, collective: str, algorithm: str, nbytes: int, p: int) -> float:
        """Predicted seconds for one call on p ranks moving nbytes (the buffer the collective
        table's row names); the formulas are the table's (csrc/algorithms/collectives.cpp)."""
        row = _ROWS.get(collective)
        if row is None:
            raise ValueError(f"unknown collective {collective!r}: use one of {tuple(_ROWS)}")
        if algorithm not in row["algorithms"]:
            raise ValueError(f"{collective} has no algorithm {algorithm!r}: use one of "
                             f"{row['algorithms']}")
        return _C.predict(row["code"], ALGORITHMS[algorithm], float(nbytes), p,
                          self.alpha, self.beta, self.gamma)

    def choose(self, collective: str, nbytes: int, p: int) -> str:
        """The algorithm the model predicts is fastest (the first listed on ties); the same
        choice the C++ side makes (csrc/algorithms/cost.cpp)."""
        row = _ROWS.get(collective)
        if row is None:
            raise ValueError(f"unknown collective {collective!r}: use one of {tuple(_ROWS)}")
        code = _C.choose(row["code"], float(nbytes), p, self.alpha, self.beta, self.gamma)
        return _ALGORITHM_NAMES[code]

    def pick(self, collective: str, nbytes: int, p: int, setting: str = "") -> str:
        """What algorithm="auto" runs: PYCOMM_ALGO's choice (`setting`) for `collective` if
        it makes one, else the model's."""
        return algorithm_override(collective, setting) or self.choose(collective, nbytes, p)

    def single_copy_from(self) -> int:
        """Smallest send (bytes) the shared-memory transport sends single-copy: where
        copy_alpha + n copy_beta undercuts alpha + n beta (NEVER if nowhere); the same
        formula as csrc/algorithms/cost.cpp, which computes it."""
        return _C.single_copy_from(self.alpha, self.beta, self.copy_alpha, self.copy_beta)

    def crossover(self, collective: str, p: int, algorithm: str = "tree") -> int:
        """Largest power-of-two size in bytes for which `algorithm` is chosen (0: never)."""
        best = 0
        for k in range(0, 41):
            if self.choose(collective, 1 << k, p) == algorithm:
                best = 1 << k
        return best

    def table(self, world_sizes=(2, 3, 4, 8)) -> str:
        """The model as text: constants, the formulas, and per world size where the tree
        stops winning (collectives with a ring and a tree)."""
        lines = [
            f"alpha = {self.alpha * 1e6:.2f} us/step, "
            f"beta = {1 / self.beta / 1e9:.2f} GB/s moved, "
            f"gamma = {1 / self.gamma / 1e9:.2f} GB/s reduced   ({self.source})",
            f"single copy: alpha = {self.copy_alpha * 1e6:.2f} us/step, beta = "
            f"{1 / self.copy_beta / 1e9:.2f} GB/s moved; used from {_from_text(self.single_copy_from())}",
            "formulas (n bytes, p ranks, D tree depth, L = ceil(log2 p), K = floor(log2 p), "
            "e = 1 if p is not a power of 2):",
        ]
        for row in _C.TABLE:
            if row["setting"]:
                for algo, formula in zip(row["algorithms"], row["formulas"]):
                    lines.append(f"  {row['name']:<15} {algo:<9} {formula}   (n = {row['bytes']})")
        both = [c for c in COLLECTIVES if {"ring", "tree"} <= set(algorithms(c))]
        lines.append("tree chosen up to (bytes):")
        for p in world_sizes:
            cells = ", ".join(f"{c} {_size_text(self.crossover(c, p))}" for c in both)
            lines.append(f"  p={p}: {cells}")
        lines.append("exchange chosen up to (bytes):")
        cells = ", ".join(f"p={p} {_size_text(self.crossover('all_reduce', p, 'exchange'))}"
                          for p in world_sizes)
        lines.append(f"  all_reduce: {cells}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        """The model `to_json` wrote; anything else (the text comes through the rendezvous
        store, which other processes can write) raises ValueError."""
        try:
            data = json.loads(text)
            m = cls(alpha=float(data["alpha"]), beta=float(data["beta"]),
                    gamma=float(data["gamma"]), source=str(data.get("source", "?"))[:512],
                    **_copy_constants(data))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"not a pycomm cost model: {text[:80]!r}") from None
        if not all(math.isfinite(x) and x > 0 for x in (m.alpha, m.beta, m.gamma, m.copy_alpha, m.copy_beta)):
            raise ValueError(f"cost model constants must be finite and positive: {text[:80]!r}")
        return m


NEVER = (1 << 64) - 1
"""single_copy_from() when single copy never pays (SIZE_MAX on the C++ side)"""


def _copy_constants(data: dict) -> dict:
    """The single-copy constants of a model's JSON; a file from before they existed keeps
    the defaults."""
    return {k: float(data[k]) for k in ("copy_alpha", "copy_beta") if k in data}


def _size_text(crossover: int) -> str:
    return {0: "never", 1 << 40: "always"}.get(crossover, str(crossover))


def _from_text(minimum: int) -> str:
    return {NEVER: "never", 1: "every size"}.get(minimum, f"{minimum} B")


def load(path: os.PathLike | str | None = None) -> CostModel:
    """The tuned model from `path` (default: default_path()), or the defaults if absent."""
    p = Path(path) if path else default_path()
    try:
        data = json.loads(p.read_text())
        model = data.get("model", data)
        m = CostModel(alpha=float(model["alpha"]), beta=float(model["beta"]),
                      gamma=float(model["gamma"]), source=str(p), **_copy_constants(model))
    except (OSError, ValueError, KeyError, TypeError):
        return CostModel()
    if not all(math.isfinite(x) and x > 0 for x in (m.alpha, m.beta, m.gamma, m.copy_alpha, m.copy_beta)):
        return CostModel()
    return m


# ---------------------------------------------------------------------------- fitting


def fit(rows: list[dict], p: int, source: str = "fit") -> CostModel:
    """Joint least-squares fit of alpha, beta and gamma to ring all_gather and ring
    all_reduce times (the first has no reduction, which separates beta from gamma).
    Weighted by 1/time, so small sizes (which fix alpha) count as much as large ones."""
    f = (p - 1) / p
    design, times = [], []
    for r in rows:
        n = float(r["bytes"])
        if r["collective"] == "all_gather":
            design.append([p - 1, f * n, 0.0])
        else:
            design.append([2 * (p - 1), 2 * f * n, f * n])
        times.append(r["seconds"])
    a, t = np.array(design), np.array(times)
    (alpha, beta, gamma), *_ = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)
    # A negative constant means the machine did better than the model can say (caches):
    # keep it positive and small rather than let it flip the choice.
    return CostModel(alpha=float(max(alpha, 1e-7)), beta=float(max(beta, 1e-12)),
                     gamma=float(max(gamma, 1e-12)), source=source)


def fit_single_copy(slot: CostModel, rows: list[dict], p: int) -> CostModel:
    """`slot` (fitted on the slot path) with copy_alpha and copy_beta fitted to the same
    measurements taken with every send single-copy (PYCOMM_SHM_SINGLE_COPY=always); gamma
    is the slot fit's, since a reduction costs the same whichever way its bytes came."""
    copy = fit(rows, p)
    return dataclasses.replace(slot, copy_alpha=copy.alpha, copy_beta=copy.beta)
