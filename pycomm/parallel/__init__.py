"""Parallel layers on pycomm's collectives: tensor, data and pipeline parallelism.

    from pycomm import parallel
    mesh = parallel.init_mesh(dp=2, tp=2, pp=1)          # after pycomm.init_process_group
    mlp = parallel.ParallelMLP(512, 2048)                # tp shard (group=None: mesh.tp_group)
    model = parallel.DataParallel(model)                 # bucketed async gradient all-reduce
    opt = parallel.ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    parallel.pipeline.simulate("1f1b", 4, 8); parallel.pipeline.Pipeline(...)
    plans = parallel.plan("gpt-175b", "a100x8", global_batch=1536, nodes=128)   # the planner

One idea per module: ``mesh`` (groups), ``mappings`` (f/g autograd pairs), ``layers``
(column/row/vocab-parallel), ``cross_entropy``, ``blocks`` (MLP, attention), ``random``
(per-rank dropout), ``data`` (DataParallel), ``zero`` (ZeRO-1), ``checkpoint`` (shape-free
checkpoints), ``pipeline`` (schedules, validator, simulator, runtime), ``planner`` (the best
shape for a model on a cluster; ``plan`` is its callable entry point and CLI).  ``pipeline`` alone is
importable without torch; the rest is loaded on first use.
"""
import importlib

from . import pipeline

_LAZY = {
    "Mesh": "mesh", "init_mesh": "mesh", "current_mesh": "mesh",
    "copy_to_tensor_parallel": "mappings", "reduce_from_tensor_parallel": "mappings",
    "scatter_to_tensor_parallel": "mappings", "gather_from_tensor_parallel": "mappings",
    "ColumnParallelLinear": "layers", "RowParallelLinear": "layers",
    "VocabParallelEmbedding": "layers", "TensorParallelModule": "layers",
    "vocab_parallel_cross_entropy": "cross_entropy",
    "MLP": "blocks", "SelfAttention": "blocks", "ParallelMLP": "blocks", "ParallelSelfAttention": "blocks",
    "manual_seed": "random", "dropout": "random",
    "DataParallel": "data",
    "ZeroRedundancyOptimizer": "zero",
    "full_state_dict": "checkpoint", "load_full_state_dict": "checkpoint",
}

__all__ = ["pipeline", "plan", "planner", *_LAZY]


def __getattr__(name):
    # Keep `import pycomm.parallel.pipeline` free of torch (the colleague's contract): the
    # layers import torch and pycomm's extension only when first used.
    if name in ("plan", "planner"):  # a callable module (plan.py) and the package behind it
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
