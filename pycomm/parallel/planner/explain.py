"""Text and pictures of the planner's answer: the ranked table, each formula with its numbers
in, and the frontier of step time against memory.

Contract: the functions take the planner's ``Plans`` / ``Plan`` objects (duck-typed, so that
this module does not import ``search``) and return text, or write a PNG with matplotlib's
object API (no pyplot, as ``pipeline/plot.py``).
"""
from __future__ import annotations

import math
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .memory import activation_bytes_per_layer

__all__ = ["table", "explain", "frontier_plot"]

_GIB = 2**30


def _t(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def table(plans, n: int = 10) -> str:
    """The ``n`` fastest plans, one line each, with the time breakdown."""
    head = (f"{'#':>3} {'dp':>4} {'tp':>3} {'pp':>3} {'schedule':<20} {'b':>3} {'m':>5} {'recomp':<9} {'zero':>4} "
            f"{'step':>10} {'tokens/s':>10} {'mem GiB':>8} {'MFU':>6} | {'compute':>9} {'recomp':>9} "
            f"{'comm':>9} {'bubble':>9}")
    lines = [f"{plans.model.describe()}", f"{plans.cluster.describe()}",
             f"global batch {plans.global_batch}: {len(plans.plans)} feasible shapes"
             + (" (dropped: " + ", ".join(f"{c} {r}" for r, c in plans.rejected.most_common()) + ")"
                if plans.rejected else ""), head, "-" * len(head)]
    for i, p in enumerate(plans.plans[:n], 1):
        sched = p.schedule + (f" v={p.virtual}" if p.virtual > 1 else "")
        t = p.time
        comm = t.tp_comm + t.pp_comm + t.dp_comm
        lines.append(
            f"{i:>3} {p.dp:>4} {p.tp:>3} {p.pp:>3} {sched:<20} {p.micro_batch:>3} {p.microbatches:>5} "
            f"{p.recompute:<9} {p.zero:>4} {_t(p.step_time):>10} {p.tokens_per_s:>10.4g} "
            f"{p.memory.total / _GIB:>8.2f} {p.mfu:>6.1%} | {_t(t.compute):>9} {_t(t.recompute):>9} "
            f"{_t(comm):>9} {_t(t.bubble):>9}")
    return "\n".join(lines)


def explain(plan) -> str:
    """Each formula of the prediction for ``plan``, with its numbers substituted."""
    m, c, t, mem = plan.model, plan.cluster, plan.time, plan.memory
    B, s, h, a, L, V = plan.global_batch, m.seq, m.hidden, m.heads, m.layers, m.vocab
    b, tp, pp, dp, mb = plan.micro_batch, plan.tp, plan.pp, plan.dp, plan.microbatches
    blocks = math.ceil(L / pp)
    out = [f"plan: {plan.shape}", ""]
    out.append("compute (Narayanan et al. 2021: 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)) FLOPs per iteration "
               "with full recomputation; 72·... without, 24·B·s·l·h²·(s/(6h)) extra when selective):")
    flops = m.iteration_flops(B, plan.recompute)
    if m.standard:
        out.append(f"  96·{B}·{s}·{L}·{h}²·(1 + {s}/(6·{h}) + {V}/(16·{L}·{h})) = {m.iteration_flops(B, 'full'):.4g} "
                   f"FLOPs with full recomputation")
    out.append(f"  this plan (recompute={plan.recompute}; the general form for any kv heads and MLP width): "
               f"{flops:.4g} FLOPs")
    out.append(f"  per device: {flops:.4g} / {c.devices} devices / {c.flops:.4g} FLOP/s achievable "
               f"= {_t(flops / c.devices / c.flops)} (even split)")
    if c.memory_bandwidth:
        ew = m.layer_fwd_elementwise_bytes(b * s, tp)
        out.append(f"  element-wise ops per block forward, b·s·(15·h + (2·ffn + 4.5·a·s)/t)·{m.dtype_bytes} "
                   f"= {ew:.4g} bytes"
                   f" / {c.memory_bandwidth:.3g} B/s = {_t(ew / c.memory_bandwidth)} (norms, dropout, residuals "
                   f"replicated over tp)")
    out.append(f"  slowest stage ({blocks} blocks + logits): forward+backward of {mb} micro-batches "
               f"= {_t(t.compute)}, recomputation {_t(t.recompute)}"
               + (f"; {c.layer_overhead * 1e6:.1f} us fixed per block pass included" if c.layer_overhead else ""))
    ar_bytes = b * s * h * m.dtype_bytes
    out.append("")
    out.append("tensor-parallel all-reduces (2 per block forward, 2 backward, +2 when fully recomputing), "
               f"b·s·h·{m.dtype_bytes} = {ar_bytes:.4g} bytes each over tp={tp} "
               f"({'in a node' if tp <= c.devices_per_node else 'ACROSS nodes'}):")
    out.append(f"  {_t(t.tp_comm)} per step")
    if pp > 1:
        out.append("")
        out.append(f"pipeline: {plan.schedule}, p={pp}, m={mb}, v={plan.virtual}; pycomm's simulator gives the bubble "
                   f"{_t(t.bubble)} = {t.bubble / max(t.compute + t.recompute + t.tp_comm, 1e-30):.3f} "
                   f"of the busy time "
                   f"(1F1B's closed form (p-1)/(v·m) = {(pp - 1) / (plan.virtual * mb):.3f})")
        out.append(f"  point-to-point: 2·(v·m + p - 1) = {2 * (plan.virtual * mb + pp - 1)} messages of "
                   f"b·s·h/t·{m.dtype_bytes} = {ar_bytes / tp:.4g} bytes on the critical path = {_t(t.pp_comm)}")
    if dp > 1:
        grads = mem.gradients
        out.append("")
        how = ("ZeRO-1 reduce-scatter + all-gather" if plan.zero else
               "ring/tree all-reduce (α-β, pycomm's collective table), exposed beyond the last backward")
        out.append(f"data parallel dp={dp}: {how} of {grads:.4g} gradient bytes = {_t(t.dp_comm)}")
    out.append("")
    out.append(f"step = compute {_t(t.compute)} + recompute {_t(t.recompute)} + tp {_t(t.tp_comm)} + pp "
               f"{_t(t.pp_comm)} + dp {_t(t.dp_comm)} + bubble {_t(t.bubble)}"
               + (f" + fixed {_t(t.other)}" if t.other else "")
               + (f" + shared processors {_t(t.shared)}" if t.shared else "") + f" = {_t(plan.step_time)}")
    if t.shared:
        c = plan.cluster
        n, cores = min(dp * plan.tp * pp, c.devices_per_node), c.cores_per_node
        out.append(f"  shared processors: {n} devices on {cores} cores; step = max(work + bubble, "
                   f"work x {n}/{cores}) = max({_t(t.work + t.bubble)}, {_t(t.work * n / cores)})")
    out.append(f"  {plan.tokens_per_s:.4g} tokens/s, {plan.tflops_per_device:.4g} TFLOP/s per device "
               f"(counting recomputation), MFU {plan.mfu:.1%}")
    out.append("")
    per_layer = activation_bytes_per_layer(m, b, tp, plan.recompute)
    formula = {"none": "s·b·h·(10 + 24/t + 5·a·s/(h·t))", "selective": "s·b·h·(10 + 24/t)",
               "full": "2·s·b·h"}[plan.recompute]
    out.append(f"memory per device (Korthikanti et al. 2022): activations {formula} with s={s}, b={b}, h={h}, "
               f"a={a}, t={tp} = {per_layer / 2**20:.4g} MiB per block per micro-batch"
               + (" (x2 for fp32)" if m.dtype_bytes == 4 else ""))
    out.append(f"  x {blocks} blocks x {mem.in_flight:.3g} micro-batches in flight (simulator's peak on stage 0)"
               f" + working buffers = {mem.activations / _GIB:.3f} GiB")
    out.append(f"  weights {mem.weights / _GIB:.3f} + gradients {mem.gradients / _GIB:.3f} + optimizer "
               f"{mem.optimizer / _GIB:.3f}{' (ZeRO-1: /dp)' if plan.zero else ''} + activations "
               f"{mem.activations / _GIB:.3f} = {mem.total / _GIB:.3f} GiB of {c.memory / _GIB:.0f} GiB")
    return "\n".join(out)


def frontier_plot(plans, path: str | os.PathLike, title: str | None = None) -> str:
    """PNG of every feasible plan's step time against its memory, the frontier joined."""
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter([p.memory.total / _GIB for p in plans.plans], [p.step_time for p in plans.plans],
               s=8, alpha=0.35, label="feasible shapes")
    front = plans.frontier()
    ax.plot([p.memory.total / _GIB for p in front], [p.step_time for p in front], "o-", color="C3",
            label="frontier (no shape is both faster and smaller)")
    if front:
        best = front[0]
        ax.annotate(f"best: dp={best.dp} tp={best.tp} pp={best.pp}", (best.memory.total / _GIB, best.step_time),
                    textcoords="offset points", xytext=(8, 8), fontsize=8)
    ax.axvline(plans.cluster.memory / _GIB, color="grey", linestyle="--", linewidth=1, label="device memory")
    ax.set_xlabel("memory per device (GiB)")
    ax.set_ylabel("predicted step time (s)")
    ax.set_yscale("log")
    ax.set_title(title or f"{plans.model.name} on {plans.cluster.name} x{plans.cluster.nodes}, "
                          f"batch {plans.global_batch}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    return os.fspath(path)
