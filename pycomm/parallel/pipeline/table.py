"""Every registered schedule side by side: simulated bubble and activation memory against
pipeline size p and micro-batches m, as a markdown table; and one timeline PNG per schedule.

Contract: :func:`bubble_table` returns the markdown text (rows = (p, m), one column per
registry entry, interleaved ones once per ``v`` in ``vs``; each cell ``bubble fraction / peak
activations``, both from the simulator, not from formulas: the fraction is idle over total
device time, the activations the most micro-batches' activations any device holds, in
full-stage units), followed by a note listing the combinations a schedule refuses, with the
reason.  :func:`timelines` writes ``pipeline_<name>.png`` per schedule into a folder.
``python -m pycomm.parallel.pipeline table`` prints the table,
``python -m pycomm.parallel.pipeline timelines DIR`` writes the pictures.
"""
from __future__ import annotations

import os

from .schedules import SCHEDULES
from .simulate import simulate

__all__ = ["bubble_table", "timelines"]


def _columns(vs) -> list[tuple[str, int]]:
    cols = []
    for name, spec in SCHEDULES.items():
        if spec.chunks == "any":
            cols += [(name, v) for v in vs if v > 1]
        else:
            cols.append((name, 1))
    return cols


def _label(name: str, v: int) -> str:
    return f"{name} v={v}" if SCHEDULES[name].chunks == "any" else name


def bubble_table(
    ps=(2, 4, 8), ms=(4, 8, 16, 32), vs=(1, 2, 4), t_fwd: float = 1.0, t_bwd: float = 2.0
) -> str:
    columns = _columns(vs)
    head = ["p", "m"] + [_label(n, v) for n, v in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    skipped = []
    for p in ps:
        for m in ms:
            cells = [str(p), str(m)]
            for name, v in columns:
                try:
                    r = simulate(name, p, m, virtual=v, t_fwd=t_fwd, t_bwd=t_bwd)
                except ValueError as e:
                    cells.append("–")
                    skipped.append(f"{name} p={p} m={m} v={v}: {str(e).split(';')[0]}")
                    continue
                cells.append(f"{r.bubble_fraction:.3f} / {max(r.peak_stage_activations):g}")
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Cells: bubble fraction (idle / total device time, steps flushed) / peak activations "
        f"(most micro-batches a device holds, full-stage units), simulated with t_fwd={t_fwd:g}, "
        f"t_bwd={t_bwd:g} (I and W half each)."
    )
    if skipped:
        lines.append("Skipped (the schedule refuses them):")
        lines += [f"- {s}" for s in skipped]
    return "\n".join(lines)


def timelines(folder: str, stages: int = 4, microbatches: int = 8) -> list[str]:
    """One simulated timeline PNG per schedule (interleaved ones with v=2); returns the paths."""
    paths = []
    for name, spec in SCHEDULES.items():
        r = simulate(name, stages, microbatches, virtual=2 if spec.chunks == "any" else 1)
        paths.append(r.plot(os.path.join(folder, f"pipeline_{name}.png")))
    return paths
