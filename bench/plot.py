"""Shared benchmark plotting: grouped-bar panels and heat maps saved as PNGs (Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Series = Mapping[str, Sequence[float | None]]
"""Legend label -> one value per group; None draws no bar (that server was not run)."""
Intervals = Mapping[str, Sequence[tuple[float, float] | None]]
"""Legend label -> one (low, high) interval per group, drawn as an error bar."""


@dataclass(frozen=True)
class Panel:
    """One subplot: a grouped bar chart over the shared groups."""

    title: str
    ylabel: str
    series: Series
    errors: Intervals | None = None


def bar_panels(path: Path, groups: Sequence[str], panels: Sequence[Panel], *, title: str) -> Path:
    """Draw `panels` side by side, each with one bar cluster per group, and save a PNG.

    Args:
        path: where the PNG goes (parent folders are created).
        groups: x-axis categories, e.g. scenario names.
        panels: the subplots, left to right.
        title: figure title.

    Returns:
        `path`.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must precede pyplot
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        _grouped_bars(ax, groups, panel)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _grouped_bars(ax: Axes, groups: Sequence[str], panel: Panel) -> None:
    width = 0.8 / max(len(panel.series), 1)
    for k, (label, values) in enumerate(panel.series.items()):
        xs = [i + (k - (len(panel.series) - 1) / 2) * width for i in range(len(groups))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, heights, width, label=label, yerr=_yerr(panel, label, values))
        labels = [f"{v:.0f}" if v is not None else "" for v in values]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _yerr(panel: Panel, label: str, values: Sequence[float | None]) -> list[list[float]] | None:
    """Matplotlib's asymmetric ``yerr`` (distances below and above each bar), if any."""
    intervals = (panel.errors or {}).get(label)
    if intervals is None:
        return None
    below, above = [], []
    for value, interval in zip(values, intervals, strict=True):
        if value is None or interval is None:
            below.append(0.0)
            above.append(0.0)
        else:
            below.append(max(0.0, value - interval[0]))
            above.append(max(0.0, interval[1] - value))
    return [below, above]


def heatmap(
    path: Path,
    panels: Mapping[str, Sequence[Sequence[float | None]]],
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
) -> Path:
    """One annotated heat map per panel (values in 0..1; None cells stay blank), side by side.

    Returns:
        `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = 1.1 * len(col_labels) + 3.0
    fig, axes = plt.subplots(
        1, len(panels), figsize=(width * len(panels), 0.5 * len(row_labels) + 2.5), squeeze=False
    )
    for ax, (name, rows) in zip(axes[0], panels.items(), strict=True):
        values = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
        for (r, c), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(
                    c,
                    r,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="w" if v < 0.6 else "k",
                )
        ax.set_xticks(range(len(col_labels)), list(col_labels))
        ax.set_yticks(range(len(row_labels)), list(row_labels))
        ax.set_xlabel("document i")
        ax.set_title(name)
        fig.colorbar(image, ax=ax, fraction=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
