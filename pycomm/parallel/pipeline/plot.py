"""Draw a simulated schedule: a PNG timeline and a text grid.

Contract: both take a :class:`~.simulate.SimulationResult`.  :func:`plot_timeline` writes a PNG
(matplotlib's object API with the Agg canvas: no pyplot, no global backend) in the style of the GPipe/Megatron lecture
figures: one row per device (device 0 on top), one box per computation, coloured by micro-batch,
forward light, backward (or its input half I) full, weight half W darker and hatched, labelled
``F3``/``B3``/``I3``/``W3`` (with the stage ``s5`` below when a device holds several); idle
time is the grey background showing between boxes.
:func:`format_grid` returns the same picture as text, one column per time step.
"""
from __future__ import annotations

import os
from fractions import Fraction
from math import gcd

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .schedules import Kind

__all__ = ["plot_timeline", "format_grid"]

# Per computation kind: how far its box colour is mixed towards white (1.0) or black (0.0).
_SHADE = {Kind.F: (0.45, 1.0), Kind.B: (0.0, 0.0), Kind.I: (0.0, 0.0), Kind.W: (0.35, 0.0)}


def _time_unit(result) -> float:
    """Largest step that divides every duration, so each action spans whole columns."""
    durations = {t.end - t.start for row in result.timeline for t in row if t.end > t.start}
    fracs = [Fraction(d).limit_denominator(1000) for d in durations]
    num = Fraction(0)
    for f in fracs:
        num = Fraction(_gcd_frac(num, f)) if num else f
    return float(num) if num else 1.0


def _gcd_frac(a: Fraction, b: Fraction) -> Fraction:
    den = a.denominator * b.denominator // gcd(a.denominator, b.denominator)
    return Fraction(gcd(int(a * den), int(b * den)), den)


def format_grid(result, unit: float | None = None) -> str:
    """Rows = devices, columns = time steps of ``unit`` (default: the largest step dividing all
    durations).  Each cell shows the action occupying it in text form ("1F0"), "." when idle."""
    unit = unit or _time_unit(result)
    ncols = round(result.makespan / unit)
    rows = []
    for row in result.timeline:
        cells = ["."] * ncols
        for t in row:
            a, b = round(t.start / unit), round(t.end / unit)
            for c in range(a, max(b, a + 1)):
                if c < ncols:
                    cells[c] = str(t.action)
        rows.append(cells)
    width = max([len(c) for cells in rows for c in cells] + [len(str(ncols - 1))])
    header = "step    " + " ".join(str(c).rjust(width) for c in range(ncols))
    lines = [header]
    for r, cells in enumerate(rows):
        lines.append(f"rank {r:<2} " + " ".join(c.rjust(width) for c in cells))
    s = result.schedule
    lines.append(
        f"{s.name}: stages={s.stages} microbatches={s.microbatches} virtual={s.virtual}, "
        f"one step = {unit:g}; bubble fraction {result.bubble_fraction:.3f}, "
        f"bubble overhead {result.bubble_overhead:.3f}"
    )
    return "\n".join(lines)


def plot_timeline(result, path, title: str | None = None):
    """Write ``result``'s timeline as a PNG to ``path``; returns ``path``."""
    s = result.schedule
    p, m, v = s.stages, s.microbatches, s.virtual
    cmap = matplotlib.colormaps["tab10" if m <= 10 else "tab20"]

    def colour(mb: int, kind: Kind):
        base = to_rgb(cmap(mb % cmap.N))
        # Same hue = same micro-batch; the shade says the kind (_SHADE).
        mix, towards = _SHADE[kind]
        return tuple((1 - mix) * c + mix * towards for c in base)

    span = result.makespan
    fig_w = min(max(6.0, 0.35 * span / min(result.t_fwd / v, result.t_bwd / v) + 1.5), 22.0)
    fig = Figure(figsize=(fig_w, 0.55 * p + 1.4))
    FigureCanvasAgg(fig)  # files only: works on machines without a display
    ax = fig.subplots()
    ax.add_patch(Rectangle((0, -0.5), span, p, facecolor="#e6e6e6", edgecolor="none", zorder=0))
    min_box = min(t.end - t.start for row in result.timeline for t in row)
    for r, row in enumerate(result.timeline):
        for t in row:
            a = t.action
            face = colour(a.microbatch, a.kind)
            ax.add_patch(
                Rectangle(
                    (t.start, r - 0.4), t.end - t.start, 0.8,
                    facecolor=face, edgecolor="black", linewidth=0.6, zorder=2,
                    hatch="//" if a.kind is Kind.W else None,
                )
            )
            label = f"{a.kind.value}{a.microbatch}"
            if v > 1:
                label += f"\ns{a.stage}"
            dark = sum(face) < 1.6
            size = 8 if min_box * 0.35 * (fig_w / max(span, 1e-9)) * 72 > 18 else 6
            ax.text(
                (t.start + t.end) / 2, r, label, ha="center", va="center", fontsize=size,
                color="white" if dark else "black", zorder=3,
            )
    ax.set_xlim(0, span)
    ax.set_ylim(p - 0.5, -0.5)  # device 0 on top, like the lecture figures
    ax.set_yticks(range(p))
    ax.set_yticklabels([f"device {r}" for r in range(p)])
    ax.set_xlabel("time")
    ax.set_title(
        title
        or f"{s.name}: p={p}, m={m}" + (f", v={v}" if v > 1 else "")
        + f"  (t_f={result.t_fwd:g}, t_b={result.t_bwd:g}; bubble {result.bubble_fraction:.1%} "
        f"of device time, overhead {result.bubble_overhead:.1%})",
        fontsize=9,
    )
    present = sorted({t.action.kind for row in result.timeline for t in row}, key=list(Kind).index)
    handles = [
        Patch(facecolor=colour(0, k), edgecolor="black", hatch="//" if k is Kind.W else None,
              label=f"{k.info.word} ({k.value})")
        for k in present
    ]
    handles.append(Patch(facecolor="#e6e6e6", edgecolor="none", label="idle (bubble)"))
    ax.legend(
        handles=handles,
        loc="upper center", bbox_to_anchor=(0.5, -0.28 if p <= 2 else -0.12 - 0.3 / p),
        ncol=len(handles), fontsize=8, frameon=False,
    )
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
