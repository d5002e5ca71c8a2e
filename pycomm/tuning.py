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


_COLL = {"all_reduce": 0, "reduce_scatter": 1, "all_gather": 2, "broadcast": 3}
_ALGO = {"ring": 0, "tree": 1}


def tree_depth(p: int) -> int:
    """Edges from the root to the deepest leaf of the binary tree over p ranks."""
    from pycomm import _C

    return _C.tree_depth(p)


def algorithm_override(collective: str) -> str | None:
    """What $PYCOMM_ALGO says for `collective` ('ring', 'tree'), or None (use the model).
    The setting is 'ring', 'tree', 'auto' or per collective, like NCCL_ALGO:
    'allreduce:tree;allgather:ring'."""
    setting = os.environ.get("PYCOMM_ALGO", "")
    if not setting:
        return None
    from pycomm import _C

    code = _C.algo_override(setting, _COLL[collective])
    return {0: "ring", 1: "tree"}.get(code)


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
        """Predicted seconds for one call on p ranks moving a buffer of nbytes (the formulas
        live in csrc/algorithms/cost.cpp, shared with the torch.distributed backend)."""
        from pycomm import _C

        if collective not in _COLL:
            raise ValueError(f"unknown collective {collective!r}: use one of {COLLECTIVES}")
        if algorithm not in _ALGO:
            raise ValueError(f"unknown algorithm {algorithm!r}: use 'ring' or 'tree'")
        return _C.predict(_COLL[collective], _ALGO[algorithm], float(nbytes), p,
                          self.alpha, self.beta, self.gamma)

    def choose(self, collective: str, nbytes: int, p: int) -> str:
        """'ring' or 'tree', whichever the model predicts is faster (ring on ties)."""
        ring = self.time(collective, "ring", nbytes, p)
        tree = self.time(collective, "tree", nbytes, p)
        return "tree" if tree < ring else "ring"

    def pick(self, collective: str, nbytes: int, p: int) -> str:
        """What algorithm="auto" runs: $PYCOMM_ALGO's choice for `collective` if it makes
        one, else the model's."""
        return algorithm_override(collective) or self.choose(collective, nbytes, p)

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
        """The model `to_json` wrote; anything else (the text comes through the rendezvous
        store, which other processes can write) raises ValueError."""
        try:
            data = json.loads(text)
            m = cls(alpha=float(data["alpha"]), beta=float(data["beta"]),
                    gamma=float(data["gamma"]), source=str(data.get("source", "?"))[:512])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"not a pycomm cost model: {text[:80]!r}") from None
        if not all(math.isfinite(x) and x > 0 for x in (m.alpha, m.beta, m.gamma)):
            raise ValueError(f"cost model constants must be finite and positive: {text[:80]!r}")
        return m


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


# ---------------------------------------------------------------------------- measuring


def _measure_rank(sizes: list[int], iters_budget: float) -> list[dict] | None:
    """On every rank: time ring all_gather and ring all_reduce over `sizes` (bytes)."""
    import time

    import torch

    import pycomm

    rows = []
    for nbytes in sizes:
        count = max(nbytes // 4, pycomm.get_world_size())
        count -= count % pycomm.get_world_size()
        for coll in ("all_gather", "all_reduce"):
            buf = torch.ones(count)
            block = torch.ones(count // pycomm.get_world_size())
            fn = ((lambda: pycomm.all_reduce(buf, algorithm="ring")) if coll == "all_reduce"
                  else (lambda: pycomm.all_gather(buf, block, algorithm="ring")))
            for _ in range(3):
                fn()
            iters = max(3, min(500, int(iters_budget / max(count * 4 * 2e-10, 2e-5))))
            pycomm.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            t = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
            pycomm.all_reduce(t, op="max")
            rows.append(dict(collective=coll, bytes=count * 4, seconds=t.item()))
    return rows if pycomm.get_rank() == 0 else None


def fit(rows: list[dict], p: int, source: str = "fit") -> CostModel:
    """Joint least-squares fit of alpha, beta and gamma to ring all_gather and ring
    all_reduce times (the first has no reduction, which separates beta from gamma).
    Weighted by 1/time, so small sizes (which fix alpha) count as much as large ones."""
    import numpy as np

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


def tune(nprocs: int = 2, path: os.PathLike | str | None = None, max_bytes: int = 16 << 20) -> tuple[CostModel, Path]:
    """Measures this machine on `nprocs` local processes, fits the model and saves it."""
    import datetime
    import platform

    import pycomm.launch

    sizes, s = [], 8
    while s <= max_bytes:
        sizes.append(s)
        s *= 4
    rows = pycomm.launch.run(_measure_rank, nprocs, args=(sizes, 0.05), collective_timeout=120)[0]
    out = Path(path) if path is not None else default_path()
    model = fit(rows, nprocs, source=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": {"alpha": model.alpha, "beta": model.beta, "gamma": model.gamma},
        "nprocs": nprocs, "host": platform.node(), "cpus": os.cpu_count(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "measurements": rows,
    }, indent=1))
    return model, out
