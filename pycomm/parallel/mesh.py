"""The device mesh: which ranks form the data-, tensor- and pipeline-parallel groups.

Contract
--------
``init_mesh(dp, tp, pp)`` is called by every rank after ``pycomm.init_process_group`` with the
same arguments; ``dp * tp * pp`` must equal the world size.  Ranks are laid out with tensor
parallelism innermost, then data, then pipeline (Megatron's order)::

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

Why this order: tensor parallelism exchanges the most data (two all-reduces per layer, on the
critical path), so its ranks are neighbours; pipeline parallelism exchanges the least (one
activation per micro-batch per stage boundary), so it spans the farthest ranks.  Group ranks
equal mesh coordinates: ``mesh.pp_group.rank == mesh.pp_rank`` and so on, because each group's
members are sorted by global rank and the coordinate grows with it.

The last mesh built is the default for layers constructed with ``group=None`` (tensor-parallel
layers use its ``tp_group``, ``DataParallel`` and ``ZeroRedundancyOptimizer`` its ``dp_group``);
without a mesh they use the whole world.
"""
from __future__ import annotations

from dataclasses import dataclass

import pycomm
from pycomm.distributed import Group

__all__ = ["Mesh", "init_mesh", "current_mesh", "default_group"]


@dataclass(frozen=True)
class Mesh:
    """This rank's view of a dp x tp x pp mesh."""

    dp: int
    """Data-parallel degree (replicas of the model)."""
    tp: int
    """Tensor-parallel degree (shards of each layer)."""
    pp: int
    """Pipeline-parallel degree (stages)."""
    dp_rank: int
    """Index of this rank's replica, 0 .. dp-1."""
    tp_rank: int
    """Index of this rank's layer shard, 0 .. tp-1."""
    pp_rank: int
    """Index of this rank's pipeline stage, 0 .. pp-1."""
    dp_group: Group
    """Ranks holding the same shard of the same stage in other replicas."""
    tp_group: Group
    """Ranks holding the other shards of this rank's layers."""
    pp_group: Group
    """Ranks holding the other stages of this replica and shard."""

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def rank_of(self, dp_rank: int, tp_rank: int, pp_rank: int) -> int:
        """Global rank at these mesh coordinates."""
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank


_current: Mesh | None = None
# Groups are built once per (world, shape): tests and examples call init_mesh repeatedly in one
# process group, and every new_group maps fresh shared memory.
_cache: dict[tuple, Mesh] = {}


def init_mesh(dp: int = 1, tp: int = 1, pp: int = 1) -> Mesh:
    """Build (or reuse) the groups of a dp x tp x pp mesh; every rank calls it identically."""
    global _current
    for name, v in (("dp", dp), ("tp", tp), ("pp", pp)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"init_mesh: {name} must be a positive int, got {name}={v!r}")
    world = pycomm.get_world_size()
    if dp * tp * pp != world:
        raise ValueError(
            f"init_mesh: dp*tp*pp = {dp}*{tp}*{pp} = {dp * tp * pp} but the world size is {world}; "
            f"choose degrees whose product is {world}, or start {dp * tp * pp} processes"
        )
    world_group = pycomm.distributed.group_or_world(None)
    key = (id(world_group), dp, tp, pp)
    mesh = _cache.get(key)
    if mesh is None or mesh.tp_group.closed:  # a destroyed world reuses no groups
        _cache.clear()
        mesh = _build(dp, tp, pp, pycomm.get_rank())
        _cache[key] = mesh
    _current = mesh
    return mesh


def _build(dp: int, tp: int, pp: int, rank: int) -> Mesh:
    def at(d: int, t: int, p: int) -> int:
        return (p * dp + d) * tp + t

    # Every rank creates every group, in the same order (new_group's rule); it keeps its own.
    mine = {}
    for p in range(pp):
        for d in range(dp):
            g = pycomm.new_group([at(d, t, p) for t in range(tp)])
            if g.rank >= 0:
                mine["tp"] = g
    for p in range(pp):
        for t in range(tp):
            g = pycomm.new_group([at(d, t, p) for d in range(dp)])
            if g.rank >= 0:
                mine["dp"] = g
    for d in range(dp):
        for t in range(tp):
            g = pycomm.new_group([at(d, t, p) for p in range(pp)])
            if g.rank >= 0:
                mine["pp"] = g
    tp_rank = rank % tp
    dp_rank = (rank // tp) % dp
    pp_rank = rank // (tp * dp)
    return Mesh(dp, tp, pp, dp_rank, tp_rank, pp_rank, mine["dp"], mine["tp"], mine["pp"])


def current_mesh() -> Mesh | None:
    """The mesh of the last ``init_mesh`` call on this rank, or None."""
    if _current is not None and _current.tp_group.closed:
        return None  # its process group was destroyed
    return _current


def default_group(kind: str) -> Group:
    """The group a layer built with ``group=None`` uses: the current mesh's ``tp``/``dp`` group,
    or the whole world when no mesh was built."""
    mesh = current_mesh()
    if mesh is None:
        return pycomm.distributed.group_or_world(None)
    return {"tp": mesh.tp_group, "dp": mesh.dp_group, "pp": mesh.pp_group}[kind]
