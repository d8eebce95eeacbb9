"""The study's figures: accuracy against cost with the Pareto front (``pareto.png``) and test curves (``curves.png``).

Drawn with matplotlib's object API (no pyplot, no global state), so that a study running in a
notebook or on a headless machine draws the same files. Each entry has one colour in both figures
(:func:`block_colours`); the front is a dashed grey line, a colour no entry has.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from attnjax.compare.report import Row
from attnjax.validate import InputError


def _matplotlib():
    try:
        import matplotlib.colors
        import matplotlib.figure
    except ImportError:
        raise InputError(
            "python -m attnjax.compare draws its plots with matplotlib: pip install 'attnjax[viz]'"
        ) from None
    return matplotlib


def _figure(width: float, height: float):
    return _matplotlib().figure.Figure(figsize=(width, height), layout="constrained")


BASELINE_COLOUR = "#000000"  # the baseline, in both figures
FRONT_COLOUR = "#696969"  # dim grey, dashed: the Pareto front's line; no block has a grey


def _palette() -> list[str]:
    """Distinct non-grey colours: tab10's, their light tab20 partners, then tab20b and tab20c (greys left out)."""
    mpl = _matplotlib()
    tab20, tab20b, tab20c = (mpl.colormaps[name].colors for name in ("tab20", "tab20b", "tab20c"))
    greys = {14, 15}  # tab20's grey pair; tab20c's greys are its last four
    colours = [tab20[i] for i in range(0, 20, 2) if i not in greys]
    colours += [tab20[i] for i in range(1, 20, 2) if i not in greys]
    colours += list(tab20b) + list(tab20c[:16])
    return [mpl.colors.to_hex(c) for c in colours if max(c[:3]) - min(c[:3]) >= 0.1]  # no near-grey either


def block_colours(labels: Iterable[str], baseline: str) -> dict[str, str]:
    """One colour per entry of the study, the same in every figure: black for the baseline, then the
    palette over the other labels in sorted order (so the order of ``--blocks`` does not matter).

    No entry gets the Pareto front's grey or another entry's colour; past the palette's 53 colours the
    rest are saturated hues (never grey either).
    """
    mpl = _matplotlib()
    others = sorted(set(labels) - {baseline})
    palette = _palette()
    if len(others) > len(palette):
        extra = len(others) - len(palette)
        palette += [mpl.colors.to_hex(mpl.colormaps["hsv"](i / extra)) for i in range(extra)]
    colours = {label: palette[i] for i, label in enumerate(others)}
    colours[baseline] = BASELINE_COLOUR
    return colours


def check_available() -> None:
    """Raise :class:`InputError` now, before a long study, if the plots cannot be drawn at its end."""
    _figure(1, 1)


def _errors(row: Row) -> tuple[float, float]:
    """The 95% interval as (below, above) the mean; zero for a single seed."""
    acc = row.accuracy
    if acc.n < 2 or math.isnan(acc.low):
        return 0.0, 0.0
    return acc.mean - acc.low, acc.high - acc.mean


FRONT_LABEL = "Pareto front"


def pareto_figure(rows: Sequence[Row], baseline: str, title: str = "", colours: Mapping[str, str] | None = None):
    """Mean test accuracy (95% interval bars) against step time over the baseline's, and against added parameters.

    Each entry is one ``errorbar`` artist labelled with its name, in its colour of ``colours``.
    The default, :func:`block_colours` of the rows with an accuracy, is the one :func:`curves_figure`
    computes from the study's curves (the entries with a finished run): the same colour per entry in
    both figures. The front (no other entry is as cheap and as accurate) is joined by a dashed grey
    line labelled ``Pareto front`` and its points are filled. The accuracy intervals are the rows'
    (clipped to [0, 100] %).
    """
    if colours is None:
        colours = block_colours([r.label for r in rows if r.accuracy is not None], baseline)
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
                color=colours[row.label],
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
            (line,) = ax.plot(
                *zip(*front, strict=True),
                color=FRONT_COLOUR,
                linestyle="--",
                linewidth=1.2,
                zorder=0,
                label=FRONT_LABEL,
            )
            ax.legend(handles=[line], fontsize=8, loc="lower right")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[1].set_xscale("symlog", linthresh=100)  # blocks add from 0 to ~10^5 parameters
    axes[0].set_ylabel("final test accuracy, % (mean over seeds, 95% interval clipped to [0, 100])")
    fig.suptitle(
        title or "accuracy against cost: the Pareto front dashed grey (filled markers), dominated entries hollow"
    )
    return fig


def curves_figure(
    curves: dict[str, Sequence[float]], baseline: str, title: str = "", colours: Mapping[str, str] | None = None
):
    """Test accuracy per epoch, the mean over each entry's seeds: one labelled line per entry.

    Each line in its colour of ``colours`` (default: :func:`block_colours` of the curves' labels),
    the colour its entry has in :func:`pareto_figure` of the same study.
    """
    colours = block_colours(curves, baseline) if colours is None else colours
    fig = _figure(8, 5.5)
    ax = fig.subplots()
    for label, means in curves.items():
        epochs = range(1, len(means) + 1)
        width = 2.5 if label == baseline else 1.2
        ax.plot(
            epochs,
            [m * 100 for m in means],
            marker="o",
            markersize=3,
            label=label,
            color=colours[label],
            linewidth=width,
        )
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
