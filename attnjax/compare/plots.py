"""The study's figures: accuracy against cost with the Pareto front (``pareto.png``) and test curves (``curves.png``).

Drawn with matplotlib's object API (no pyplot, no global state), so that a study running in a
notebook or on a headless machine draws the same files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from attnjax.compare.report import Row
from attnjax.validate import InputError


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError(
            "python -m attnjax.compare draws its plots with matplotlib: pip install 'attnjax[viz]'"
        ) from None
    return Figure(figsize=(width, height), layout="constrained")


def check_available() -> None:
    """Raise :class:`InputError` now, before a long study, if the plots cannot be drawn at its end."""
    _figure(1, 1)


def _errors(row: Row) -> tuple[float, float]:
    """The 95% interval as (below, above) the mean; zero for a single seed."""
    acc = row.accuracy
    if acc.n < 2 or math.isnan(acc.low):
        return 0.0, 0.0
    return acc.mean - acc.low, acc.high - acc.mean


def pareto_figure(rows: Sequence[Row], baseline: str, title: str = ""):
    """Mean test accuracy (95% interval bars) against step time over the baseline's, and against added parameters.

    Each entry is one ``errorbar`` artist labelled with its name; the front (no other entry is as
    cheap and as accurate) is joined by a line and its points are filled.
    """
    fig = _figure(13, 5.5)
    axes = fig.subplots(1, 2, sharey=True)
    shown = [r for r in rows if r.accuracy is not None and r.time_ratio is not None and r.params is not None]
    base_params = next((r.params for r in rows if r.label == baseline and r.params is not None), 0)
    panels = (
        (axes[0], "time_ratio", "front_time", f"train-step time / {baseline}'s (median and IQR of interleaved rounds)"),
        (axes[1], "added_params", "front_params", f"parameters added to {baseline}'s {base_params:,} (symlog)"),
    )

    def x_of(row: Row, x_field: str) -> float:
        return row.params - base_params if x_field == "added_params" else row.time_ratio

    for ax, x_field, front_field, xlabel in panels:
        for row in shown:
            below, above = _errors(row)
            on_front = getattr(row, front_field)
            ax.errorbar(
                [x_of(row, x_field)],
                [row.accuracy.mean * 100],
                yerr=[[below * 100], [above * 100]],
                xerr=None
                if x_field != "time_ratio"
                else [[row.time_ratio - row.time_ratio_iqr[0]], [row.time_ratio_iqr[1] - row.time_ratio]],
                fmt="s" if row.label == baseline else "o",
                color="black" if row.label == baseline else ("tab:red" if on_front else "tab:blue"),
                markerfacecolor=None if on_front or row.label == baseline else "white",
                capsize=3,
                label=row.label,
            )
            ax.annotate(
                row.label,
                (x_of(row, x_field), row.accuracy.mean * 100),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
        front = sorted((x_of(r, x_field), r.accuracy.mean * 100) for r in shown if getattr(r, front_field))
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), color="tab:red", linewidth=1, alpha=0.6, zorder=0)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[1].set_xscale("symlog", linthresh=100)  # blocks add from 0 to ~10^5 parameters
    axes[0].set_ylabel("final test accuracy, % (mean over seeds, 95% interval)")
    fig.suptitle(title or "accuracy against cost: the Pareto front in red (filled), dominated entries hollow")
    return fig


def curves_figure(curves: dict[str, Sequence[float]], baseline: str, title: str = ""):
    """Test accuracy per epoch, the mean over each entry's seeds: one labelled line per entry."""
    fig = _figure(8, 5.5)
    ax = fig.subplots()
    for label, means in curves.items():
        epochs = range(1, len(means) + 1)
        style = {"color": "black", "linewidth": 2.5} if label == baseline else {"linewidth": 1.2}
        ax.plot(epochs, [m * 100 for m in means], marker="o", markersize=3, label=label, **style)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy, % (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title or "test accuracy per epoch")
    return fig


def plotted_points(fig) -> dict[str, list[tuple[float, float]]]:
    """The (x, y) of each labelled errorbar point, per panel in order: what a reader of the figure sees."""
    points: dict[str, list[tuple[float, float]]] = {}
    for ax in fig.axes:
        for container in ax.containers:
            (x,), (y,) = container.lines[0].get_data()
            points.setdefault(container.get_label(), []).append((float(x), float(y)))
    return points


def save(fig, path: str) -> None:
    fig.savefig(path, dpi=120)
