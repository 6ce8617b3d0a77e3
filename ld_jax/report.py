"""Shared reporting helpers: numbers -> Markdown tables, JSON files and matplotlib PNGs.

Experiments build plain Python data (lists of rows, arrays of curves) and hand it here, so every
results directory looks the same: `results.json`, one or more `*.md` tables and `*.png` plots.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: experiments run on servers without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ld_jax import files  # noqa: E402


def format_number(x: float | None, digits: int = 2) -> str:
    """Fixed point for ordinary magnitudes, scientific (`1.3e-05`) for tiny or huge ones."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    x = float(x)
    if x != 0 and (abs(x) < 10**-digits or abs(x) >= 1e5):
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}f}"


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None
) -> str:
    """A GitHub Markdown table. `align` is one char per column: l, r or c (default: all left).

    Cells are converted with str(); `|` inside a cell is escaped so it cannot split the row.
    """
    header = [str(h) for h in header]
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} entries for {len(header)} columns")
    rule = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule[a] for a in align) + "|"]
    for row in rows:
        cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in row]
        if len(cells) != len(header):
            raise ValueError(f"row has {len(cells)} cells for {len(header)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


write_json = files.write_json  # results.json of every experiment, written atomically


@dataclasses.dataclass
class Series:
    """One curve. `y` is `[n]`, or `[runs, n]`: then the mean is drawn bold and each run faintly."""

    label: str
    y: Any
    x: Any = None
    color: str | None = None
    linestyle: str = "-"


@dataclasses.dataclass
class Panel:
    title: str
    series: list[Series]
    xlabel: str = "step"
    ylabel: str = ""
    yscale: str = "linear"


def plot_panels(
    path: str | Path, panels: Sequence[Panel], title: str = "", ncols: int | None = None
) -> Path:
    """Draw panels side by side (wrapping after `ncols`) and save one PNG."""
    ncols = ncols or len(panels)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for s in panel.series:
            # matplotlib hides legend labels that start with "_" (the tables' leading-space mark)
            label = "\u200b" + s.label if s.label.startswith("_") else s.label
            y = np.asarray(s.y, dtype=float)
            x = np.arange(y.shape[-1]) if s.x is None else np.asarray(s.x)
            if y.ndim == 2:
                (line,) = ax.plot(x, y.mean(0), s.linestyle, color=s.color, lw=2, label=label)
                for run in y:
                    ax.plot(x, run, s.linestyle, color=line.get_color(), lw=0.7, alpha=0.3)
            else:
                ax.plot(x, y, s.linestyle, color=s.color, lw=2, label=label)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_yscale(panel.yscale)
        ax.grid(alpha=0.3)
        if panel.series:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    files.save_figure(fig, path)
    plt.close(fig)
    return Path(path)
