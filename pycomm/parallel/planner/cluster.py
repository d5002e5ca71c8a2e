"""What the planner knows about the machines: devices, memory, speed and the network.

Contract: :class:`Cluster` holds devices per node, nodes, memory, achievable FLOP/s and memory
bandwidth per device, a fixed time per layer pass (what dominates tiny models on CPU), and two
:class:`pycomm.tuning.CostModel` (α, β, γ) — inside a node and across nodes — so that every
collective's time comes from the same formulas as ``algorithm="auto"`` (the collective table in
csrc/algorithms/collectives.cpp).  :data:`CLUSTERS` names GPU presets; :func:`local_cluster`
describes this machine's processes with ``pycomm tune``'s constants.

Placement follows Megatron-LM: ranks are numbered tensor-parallel fastest, then data-parallel,
then pipeline; a group whose members do not all fit in one node pays the across-node model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from pycomm import tuning

__all__ = ["Cluster", "CLUSTERS", "get_cluster", "local_cluster"]


@dataclass(frozen=True)
class Cluster:
    """Devices and links, in SI units (bytes, seconds, FLOP/s)."""

    devices_per_node: int
    """Devices (GPUs, or processes on a CPU machine) in one node."""
    nodes: int
    """Nodes."""
    memory: float
    """Bytes of memory per device the training may use."""
    flops: float
    """Achievable FLOP/s per device on a transformer layer (its matrix products plus the
    memory-bound operations between them), not the datasheet peak."""
    peak_flops: float
    """Datasheet peak FLOP/s per device in the training dtype (for MFU)."""
    intra: tuning.CostModel
    """α (s per step), β (s per byte moved), γ (s per byte reduced) between devices of a node."""
    inter: tuning.CostModel
    """The same across nodes, per device (each device's share of its node's network cards)."""
    memory_bandwidth: float = 0.0
    """Achievable bytes/s of device memory for the element-wise operations between the matrix
    products (norms, dropout, residual adds, GELU, softmax); 0: their time is in ``flops``."""
    layer_overhead: float = 0.0
    """Fixed seconds per block per micro-batch forward (backward: twice), whatever its size:
    kernel launches, Python; negligible on GPUs at scale, dominant for the tiny GPT on CPU."""
    name: str = "custom"
    """Label for tables."""
    cores_per_node: int = 0
    """Processors a node's devices share (CPU processes on fewer cores than processes); 0: each
    device computes on its own (GPUs).  Sharing makes a step take at least the devices' total
    work over the cores, and makes a pipeline's idle time cheap: an idle process gives its core
    to a busy one (``timing.step_time``)."""

    def __post_init__(self) -> None:
        for arg in ("devices_per_node", "nodes"):
            value = getattr(self, arg)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Cluster: {arg} must be a positive int, got {value!r}")
        for arg in ("memory", "flops", "peak_flops"):
            if not getattr(self, arg) > 0:
                raise ValueError(f"Cluster: {arg} must be positive, got {getattr(self, arg)!r}")

    @property
    def devices(self) -> int:
        return self.devices_per_node * self.nodes

    def with_nodes(self, nodes: int) -> Cluster:
        return replace(self, nodes=nodes)

    def link(self, span: int) -> tuning.CostModel:
        """The model for a group whose members lie within ``span`` consecutive ranks."""
        return self.intra if span <= self.devices_per_node else self.inter

    def collective(self, name: str, nbytes: float, p: int, span: int) -> float:
        """Seconds for one ``name`` collective of ``nbytes`` over ``p`` ranks spread over
        ``span`` consecutive ranks: the algorithm ``algorithm="auto"`` would pick."""
        if p <= 1 or nbytes <= 0:
            return 0.0
        model = self.link(span)
        n = int(nbytes)
        return model.time(name, model.choose(name, n, p), n, p)

    def p2p(self, nbytes: float, cross_node: bool) -> float:
        """One point-to-point message: α + n·β."""
        model = self.inter if cross_node else self.intra
        return model.alpha + nbytes * model.beta

    def describe(self) -> str:
        def link(m: tuning.CostModel) -> str:
            return f"α={m.alpha * 1e6:.1f} µs, {1 / m.beta / 1e9:.0f} GB/s"

        return (f"{self.name}: {self.nodes} node(s) x {self.devices_per_node} devices, "
                f"{self.memory / 2**30:.0f} GiB, {self.flops / 1e12:.3g} TFLOP/s achievable "
                f"({self.peak_flops / 1e12:.3g} peak), in-node {link(self.intra)}, across nodes {link(self.inter)}")


# Achievable fractions of the datasheet peaks for large matrix products and for streaming
# device memory: one pair for every GPU preset, chosen by hand against Megatron-LM's table
# (docs/planner.md shows the table and what other values give).
GPU_EFFICIENCY = 0.70
HBM_EFFICIENCY = 0.80

CLUSTERS: dict[str, Cluster] = {
    # DGX A100 80GB: NVLink 3 (600 GB/s bidirectional per GPU, ~230 GB/s NCCL bus bandwidth),
    # 8 x 200 Gb/s HDR InfiniBand (25 GB/s per GPU), 312 TFLOP/s bf16/fp16 dense peak, 2.04 TB/s HBM2e.
    "a100x8": Cluster(
        devices_per_node=8, nodes=1, memory=80e9, flops=GPU_EFFICIENCY * 312e12, peak_flops=312e12,
        memory_bandwidth=HBM_EFFICIENCY * 2.04e12,
        intra=tuning.CostModel(alpha=5e-6, beta=1 / 230e9, gamma=1 / 1.5e12, source="a100x8 NVLink 3"),
        inter=tuning.CostModel(alpha=10e-6, beta=1 / 22e9, gamma=1 / 1.5e12, source="a100x8 8x200Gb/s IB"),
        name="a100x8"),
    # DGX H100: NVLink 4 (900 GB/s bidirectional, ~360 GB/s bus bandwidth), 8 x 400 Gb/s NDR
    # (50 GB/s per GPU), 989 TFLOP/s bf16 dense peak, 3.35 TB/s HBM3.
    "h100x8": Cluster(
        devices_per_node=8, nodes=1, memory=80e9, flops=GPU_EFFICIENCY * 989e12, peak_flops=989e12,
        memory_bandwidth=HBM_EFFICIENCY * 3.35e12,
        intra=tuning.CostModel(alpha=4e-6, beta=1 / 360e9, gamma=1 / 3e12, source="h100x8 NVLink 4"),
        inter=tuning.CostModel(alpha=8e-6, beta=1 / 45e9, gamma=1 / 3e12, source="h100x8 8x400Gb/s IB"),
        name="h100x8"),
}


def get_cluster(name: str, nodes: int = 1) -> Cluster:
    """The preset called ``name`` with ``nodes`` nodes (``local`` for this machine)."""
    if name == "local":
        return local_cluster(processes=nodes)
    try:
        return CLUSTERS[name].with_nodes(nodes)
    except KeyError:
        raise ValueError(f"unknown cluster preset {name!r}; use one of {', '.join(CLUSTERS)} or 'local'") from None


def local_cluster(processes: int = 2, flops: float = 5e9, layer_overhead: float = 0.0,
                  memory: float | None = None, tune_file: str | None = None) -> Cluster:
    """``processes`` CPU processes on this machine, one node: α, β, γ from ``pycomm tune``
    (``tune_file``, else the default file, else pycomm's defaults) for both levels.  ``flops``
    and ``layer_overhead`` are this machine's for the model at hand (``bench/plan_check.py``
    measures them on one process).  With more processes than cores they share the cores
    (``Cluster.cores_per_node``): each computes at one process's speed while others wait, and
    the peak (for MFU) is each one's share."""
    cores = os.cpu_count() or 1
    share = min(1.0, cores / processes)
    model = tuning.load(tune_file)
    mem = memory if memory is not None else 4e9
    return Cluster(devices_per_node=processes, nodes=1, memory=mem, flops=flops,
                   peak_flops=flops * share, intra=model, inter=model,
                   layer_overhead=layer_overhead, name=f"local x{processes}",
                   cores_per_node=cores if processes > cores else 0)
