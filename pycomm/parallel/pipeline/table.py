"""Simulated bubble against pipeline size p, micro-batches m and chunks v, as a markdown table.

Contract: :func:`bubble_table` returns the markdown text (rows = (p, m), one column per
schedule/v, each cell ``fraction / overhead`` from the simulator, not from the formulas),
followed by a note listing the combinations a schedule refuses, with the reason.
``python -m pycomm.parallel.pipeline table`` prints it.
"""
from __future__ import annotations

from .simulate import simulate

__all__ = ["bubble_table"]


def bubble_table(
    ps=(2, 4, 8), ms=(4, 8, 16, 32), vs=(1, 2, 4), t_fwd: float = 1.0, t_bwd: float = 2.0
) -> str:
    columns = [("gpipe", 1), ("1f1b", 1)] + [("interleaved_1f1b", v) for v in vs if v > 1]
    head = ["p", "m"] + [name if name != "interleaved_1f1b" else f"interleaved v={v}" for name, v in columns]
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
                cells.append(f"{r.bubble_fraction:.3f} / {r.bubble_overhead:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Cells: bubble fraction (idle / total device time) / bubble overhead (idle / compute), "
        f"simulated with t_fwd={t_fwd:g}, t_bwd={t_bwd:g}; interleaved with v=1 is 1F1B."
    )
    if skipped:
        lines.append("Skipped (the schedule refuses them):")
        lines += [f"- {s}" for s in skipped]
    return "\n".join(lines)
