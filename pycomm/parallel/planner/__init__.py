"""The planner: from a model and a cluster to the fastest parallel shape that fits in memory.

    from pycomm import parallel
    plans = parallel.plan("gpt-175b", "a100x8", global_batch=1536, nodes=128)
    print(plans.table(10)); print(plans.explain())            # the ranked shapes, the formulas
    plans.best.dp, plans.best.tp, plans.best.pp, plans.best.schedule, plans.best.step_time

    python -m pycomm.parallel.plan --model gpt-175b --cluster a100x8 --nodes 128 --global-batch 1536

One idea per module: ``model`` (transformer shapes, presets), ``cluster`` (devices and links,
presets, this machine via ``pycomm tune``), ``memory`` (Korthikanti et al.'s activation
formulas, weights, optimizer state), ``timing`` (compute, communication, the bubble from
pycomm's pipeline simulator), ``search`` (enumerate and rank), ``explain`` (tables, formulas
with the numbers in, the frontier plot), ``cli``.  docs/planner.md has the formulas and the
checks against Megatron-LM's table and against runs on this machine.
"""
from .cluster import CLUSTERS, Cluster, get_cluster, local_cluster
from .explain import explain, frontier_plot, table
from .memory import Memory, activation_bytes_per_layer, memory
from .model import MODELS, Model, get_model, model_from
from .search import RECOMPUTE, Plan, Plans, estimate
from .search import plan as search
from .timing import Time, pipeline_makespan, step_time

__all__ = [
    "CLUSTERS", "Cluster", "get_cluster", "local_cluster",
    "MODELS", "Model", "get_model", "model_from",
    "Memory", "activation_bytes_per_layer", "memory",
    "Time", "pipeline_makespan", "step_time",
    "RECOMPUTE", "Plan", "Plans", "estimate", "search", "plan",
    "explain", "frontier_plot", "table",
]


def plan(model, cluster, global_batch: int, *, nodes: int | None = None, **options) -> Plans:
    """Rank every parallel shape of ``model`` on ``cluster`` for ``global_batch`` sequences.

    ``model``: a :class:`Model`, a preset name (:data:`MODELS`), an HF config or a module with
    one.  ``cluster``: a :class:`Cluster` or a preset name (:data:`CLUSTERS`, ``"local"``);
    ``nodes`` overrides its node count.  ``options`` restrict the search (see
    :func:`search.plan`: ``tp``, ``pp``, ``schedules``, ``virtual``, ``micro_batches``,
    ``recompute``, ``zero``, ...)."""
    m = model_from(model)
    if isinstance(cluster, str):
        c = get_cluster(cluster, nodes if nodes is not None else 1)
    elif isinstance(cluster, Cluster):
        c = cluster.with_nodes(nodes) if nodes is not None else cluster
    else:
        raise TypeError(f"cluster must be a planner.Cluster or a preset name ({', '.join(CLUSTERS)}, local), "
                        f"got {type(cluster).__name__}")
    return search(m, c, global_batch, **options)
