"""Shared benchmark plotting: panels of grouped bars saved as a PNG (Agg backend)."""

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
