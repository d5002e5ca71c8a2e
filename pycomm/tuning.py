"""The alpha-beta cost model that picks an algorithm when ``algorithm="auto"``.

Like NCCL's tuning model it is one formula per (collective, algorithm): a latency per step
times the number of steps, plus bytes over bandwidth.  With ``p`` ranks, ``n`` bytes (the
whole buffer: the all-reduce tensor, the reduce-scatter input, the all-gather output),
``alpha`` seconds per step, ``beta`` seconds per byte moved and ``gamma`` seconds per byte
reduced, and ``D`` the depth of the binary tree:

=============== ==================================================== =====================
collective      ring                                                 tree
=============== ==================================================== =====================
all_reduce      2(p-1)a + 2(p-1)/p n b + (p-1)/p n g                 2D a + 2 n b + n g
reduce_scatter  (p-1)a + (p-1)/p n b + (p-1)/p n g                   as tree all_reduce
all_gather      (p-1)a + (p-1)/p n b                                 2D a + 2 n b
broadcast       (p-1)a + n b                 (pipelined chain)       D a + 2 n b
=============== ==================================================== =====================

The tree's bandwidth terms are its busiest rank's: an interior node takes two children's
halves in and sends two halves out.  Choosing is taking the cheaper one.

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

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")


def default_path() -> Path:
    """$PYCOMM_TUNE_FILE, else ~/.cache/pycomm/tune.json (XDG_CACHE_HOME respected)."""
    if os.environ.get("PYCOMM_TUNE_FILE"):
        return Path(os.environ["PYCOMM_TUNE_FILE"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "pycomm" / "tune.json"


def tree_depth(p: int) -> int:
    """Edges from the root to the deepest leaf of the binary tree over p ranks."""
    if p <= 1:
        return 0
    from pycomm import _C

    def depth(r: int) -> int:
        d = 0
        while (r := _C.tree(r, p, 0)[0]) >= 0:
            d += 1
        return d

    return max(depth(r) for r in range(p))


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Constants of the alpha-beta model, in seconds."""

    alpha: float = 4e-6
    """latency of one step: a piece handed from one rank to the next"""
    beta: float = 1 / 6e9
    """time per byte moved through the transport"""
    gamma: float = 1 / 12e9
    """time per byte reduced"""
    source: str = "defaults"
    """where the constants came from: 'defaults' or the tune file's path"""

    def time(self, collective: str, algorithm: str, nbytes: int, p: int) -> float:
        """Predicted seconds for one call on p ranks moving a buffer of nbytes."""
        if p <= 1:
            return 0.0
        a, b, g, n = self.alpha, self.beta, self.gamma, float(nbytes)
        f = (p - 1) / p
        if algorithm == "ring":
            return {
                "all_reduce": 2 * (p - 1) * a + 2 * f * n * b + f * n * g,
                "reduce_scatter": (p - 1) * a + f * n * b + f * n * g,
                "all_gather": (p - 1) * a + f * n * b,
                "broadcast": (p - 1) * a + n * b,
            }[collective]
        if algorithm == "tree":
            d = tree_depth(p)
            return {
                "all_reduce": 2 * d * a + 2 * n * b + n * g,
                "reduce_scatter": 2 * d * a + 2 * n * b + n * g,
                "all_gather": 2 * d * a + 2 * n * b,
                "broadcast": d * a + 2 * n * b,
            }[collective]
        raise ValueError(f"unknown algorithm {algorithm!r}: use 'ring' or 'tree'")

    def choose(self, collective: str, nbytes: int, p: int) -> str:
        """'ring' or 'tree', whichever the model predicts is faster (ring on ties)."""
        ring = self.time(collective, "ring", nbytes, p)
        tree = self.time(collective, "tree", nbytes, p)
        return "tree" if tree < ring else "ring"

    def crossover(self, collective: str, p: int) -> int:
        """Largest power-of-two size in bytes for which the tree is chosen (0: never)."""
        best = 0
        for k in range(0, 41):
            if self.choose(collective, 1 << k, p) == "tree":
                best = 1 << k
        return best

    def table(self, world_sizes=(2, 3, 4, 8)) -> str:
        """The model as text: constants and, per world size, where the tree stops winning."""
        lines = [
            f"alpha = {self.alpha * 1e6:.2f} us/step, "
            f"beta = {1 / self.beta / 1e9:.2f} GB/s moved, "
            f"gamma = {1 / self.gamma / 1e9:.2f} GB/s reduced   ({self.source})",
            "tree chosen up to (bytes):",
        ]
        for p in world_sizes:
            cells = ", ".join(f"{c} {self.crossover(c, p)}" for c in COLLECTIVES)
            lines.append(f"  p={p}: {cells}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        data = json.loads(text)
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def load(path: os.PathLike | str | None = None) -> CostModel:
    """The tuned model from `path` (default: default_path()), or the defaults if absent."""
    p = Path(path) if path is not None else default_path()
    try:
        data = json.loads(p.read_text())
        model = data.get("model", data)
        m = CostModel(alpha=float(model["alpha"]), beta=float(model["beta"]),
                      gamma=float(model["gamma"]), source=str(p))
    except (OSError, ValueError, KeyError, TypeError):
        return CostModel()
    if not all(math.isfinite(x) and x > 0 for x in (m.alpha, m.beta, m.gamma)):
        return CostModel()
    return m
