"""The study's report and figures: accuracy intervals stay in [0, 100] %, and each block has one colour in
both figures (the Pareto front's is none of them).

Fixed numbers only: no training, no study run.
"""

import math
import re

import pytest
from matplotlib.colors import to_rgba

from attnjax.compare import cost, plots, report, stats

NUMBER = re.compile(r"[-+]?\d+\.\d+")


def costs_of(params: dict[str, int], ratios: dict[str, float]) -> dict[str, cost.NetworkCost]:
    """Costs whose per-round step time over none's is ``ratios[label]`` in every round."""
    return {
        label: cost.NetworkCost(label, params[label], 1e8, 2**20, tuple(ratios[label] * t for t in (1.0, 1.1, 0.9)))
        for label in params
    }


# --- intervals of an accuracy never leave [0, 100] % -----------------------------------------------


def wide_rows():
    """Two seeds far apart: the raw t intervals (t(0.975, 1) = 12.7) reach far past 0% and 100%."""
    params = {"none": 1000, "se": 1100}
    finals = {"none": {0: 0.60, 1: 0.99}, "se": {0: 0.99, 1: 0.40}}
    return report.summarize(list(params), "none", costs_of(params, {"none": 1.0, "se": 1.2}), finals), finals


def test_the_raw_intervals_of_these_seeds_do_leave_the_bounds():
    """The premise of the next test: unclipped, these numbers give intervals past 0 and 100%."""
    raw = stats.t_interval([0.60, 0.99])
    assert raw.low < 0 and raw.high > 1
    raw_difference = stats.paired_difference([0.99, 0.40], [0.60, 0.99]).interval
    assert raw_difference.low < -1 and raw_difference.high > 1


def test_accuracy_intervals_are_clipped_to_0_100_in_rows_csv_table_and_plot():
    rows, finals = wide_rows()
    for row in rows:
        acc = row.accuracy
        assert 0 <= acc.low <= acc.mean <= acc.high <= 1 and acc.clipped
        assert acc.mean == pytest.approx(sum(finals[row.label].values()) / 2)  # the mean is not touched
    difference = rows[1].difference
    assert -1 <= difference.interval.low <= difference.interval.high <= 1 and difference.interval.clipped
    # The clipped test is the same test: its p-value is the paired t test's on the raw differences.
    assert difference.p_value == pytest.approx(stats.paired_difference([0.99, 0.40], [0.60, 0.99]).p_value)

    for values in (report.row_values(r) for r in rows):
        assert 0 <= values["accuracy_ci_low"] <= values["accuracy_ci_high"] <= 1
    values = report.row_values(rows[1])
    assert -1 <= values["diff_ci_low"] <= values["diff_ci_high"] <= 1

    table = report.markdown_table(rows).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    accuracy_column = next(i for i, c in enumerate(header) if c.startswith("test acc %"))
    difference_column = next(i for i, c in enumerate(header) if c.startswith("Δ vs none"))
    assert "clipped to [0, 100]" in header[accuracy_column]  # the table says so
    assert "clipped to [-100, 100]" in header[difference_column]
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        mean, low, high = map(float, NUMBER.findall(cells[accuracy_column]))
        assert 0 <= low <= mean <= high <= 100
        if cells[difference_column]:
            mean, low, high = map(float, NUMBER.findall(cells[difference_column]))
            assert -100 <= low <= mean <= high <= 100
    assert "[0.00, 100.00]" in table[3]  # se: 69.50 over [0, 100]

    fig = plots.pareto_figure(rows, "none")
    assert "clipped to [0, 100]" in fig.axes[0].get_ylabel()
    for ax in fig.axes:
        for container in ax.containers:
            ys = [y for collection in container.lines[2] for seg in collection.get_segments() for _, y in seg]
            assert ys and all(0 <= y <= 100 for y in ys), container.get_label()


def test_intervals_inside_the_bounds_are_the_plain_t_intervals():
    plain, bounded = stats.t_interval([0.90, 0.91, 0.92]), stats.t_interval([0.90, 0.91, 0.92], bounds=(0.0, 1.0))
    assert (bounded.low, bounded.high, bounded.clipped) == (plain.low, plain.high, False)
    one = stats.t_interval([1.0], bounds=(0.0, 1.0))
    assert one.mean == 1.0 and math.isnan(one.low)


# --- one colour per block, in both figures; the front in another -----------------------------------


def colour_rows():
    """eca is on the parameter front but not on the time front: a block whose front status differs by panel."""
    params = {"none": 1000, "se": 1100, "eca": 1003, "mhsa": 5000}
    ratios = {"none": 1.0, "se": 1.1, "eca": 1.3, "mhsa": 2.0}
    finals = {
        "none": {0: 0.900, 1: 0.905, 2: 0.895},
        "se": {0: 0.950, 1: 0.953, 2: 0.951},
        "eca": {0: 0.930, 1: 0.931, 2: 0.929},
        "mhsa": {0: 0.901, 1: 0.899, 2: 0.906},
    }
    return report.summarize(list(params), "none", costs_of(params, ratios), finals)


def test_each_block_has_one_colour_in_both_figures_and_the_front_has_another():
    rows = colour_rows()
    eca = next(r for r in rows if r.label == "eca")
    assert eca.front_params and not eca.front_time  # the premise: its front status differs between panels
    pareto = plots.pareto_figure(rows, "none")
    # Curves in another order than the rows: the colours follow the block, not the position.
    curves = {label: [0.8, 0.9] for label in ("mhsa", "none", "eca", "se")}
    curves_fig = plots.curves_figure(curves, "none")

    colours: dict[str, set] = {}
    front_colours = set()
    for ax in pareto.axes:
        in_bars = set()
        for container in ax.containers:
            line = container.lines[0]
            colours.setdefault(container.get_label(), set()).add(to_rgba(line.get_color()))
            in_bars |= {line, *container.lines[1]}
        fronts = [line for line in ax.get_lines() if line not in in_bars]
        assert fronts, "each panel joins its front (2 or more points) by a line"
        front_colours |= {to_rgba(line.get_color()) for line in fronts}
    for line in curves_fig.axes[0].get_lines():
        colours.setdefault(line.get_label(), set()).add(to_rgba(line.get_color()))

    assert set(colours) == {r.label for r in rows}
    for label, seen in colours.items():
        assert len(seen) == 1, f"{label} has {len(seen)} colours across the two figures"
    block_colours = [next(iter(seen)) for seen in colours.values()]
    assert len(set(block_colours)) == len(block_colours), "two blocks share a colour"
    assert len(front_colours) == 1 and not front_colours & set(block_colours), "the front has a block's colour"


def test_block_colours_are_distinct_and_never_the_fronts_for_a_large_study():
    labels = [f"block{i}" for i in range(70)] + ["none"]
    mapping = plots.block_colours(reversed(labels), "none")
    assert mapping == plots.block_colours(labels, "none")  # the order given does not matter
    rgba = [to_rgba(c) for c in mapping.values()]
    assert len(set(rgba)) == len(labels) and to_rgba(plots.FRONT_COLOUR) not in rgba
    assert to_rgba(mapping["none"]) == to_rgba("black")


def test_an_entry_without_a_finished_run_shifts_no_colour():
    """Mid-study: cbam (sorted first) has no finished run, so no curve; the other entries keep one colour."""
    params = {"none": 1000, "cbam": 1200, "se": 1100, "mhsa": 5000}
    ratios = {"none": 1.0, "cbam": 1.5, "se": 1.1, "mhsa": 2.0}
    finals = {"none": {0: 0.90, 1: 0.91}, "cbam": {}, "se": {0: 0.95, 1: 0.96}, "mhsa": {0: 0.90, 1: 0.92}}
    rows = report.summarize(list(params), "none", costs_of(params, ratios), finals)
    pareto = plots.pareto_figure(rows, "none")
    curves_fig = plots.curves_figure({"none": [0.9], "se": [0.95], "mhsa": [0.91]}, "none")
    bars = {c.get_label(): to_rgba(c.lines[0].get_color()) for c in pareto.axes[0].containers}
    lines = {line.get_label(): to_rgba(line.get_color()) for line in curves_fig.axes[0].get_lines()}
    assert bars == lines
