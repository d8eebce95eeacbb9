"""The study's tables: one row per entry (cost, accuracy over seeds, difference to the baseline), CSV and markdown."""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
from collections.abc import Sequence

from attnjax.compare import stats
from attnjax.compare.cost import NetworkCost

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Row:
    """One entry of the study: its cost on the host network and its final test accuracy over seeds."""

    label: str
    params: int | None
    train_mflops_per_image: float | None
    step_ms: float | None
    time_ratio: float | None  # median over the rounds of step time over the baseline's in the same round
    time_ratio_iqr: tuple[float, float] | None  # the quartiles of those per-round ratios
    temp_mib: float | None
    accuracy: stats.Interval | None  # over the seeds whose run finished
    difference: stats.Difference | None  # paired with the baseline, seed by seed; None for the baseline itself
    adjusted_p: float  # Holm-corrected over the study's comparisons
    verdict: str
    front_time: bool  # on the Pareto front of mean accuracy against step time
    front_params: bool  # ... against parameters

    @property
    def seeds(self) -> int:
        return 0 if self.accuracy is None else self.accuracy.n


def summarize(
    labels: Sequence[str],
    baseline: str,
    costs: dict[str, NetworkCost],
    finals: dict[str, dict[int, float]],
) -> list[Row]:
    """Rows in the order of ``labels`` from each entry's cost and its final test accuracy per seed.

    Accuracy intervals are clipped to [0, 1] and those of differences to [-1, 1] (``stats.t_interval``).
    """
    base_cost = costs.get(baseline)
    base_finals = finals.get(baseline, {})
    differences: dict[str, stats.Difference | None] = {}
    for label in labels:
        shared = sorted(set(finals.get(label, {})) & set(base_finals))
        if label == baseline or not shared:
            differences[label] = None
            continue
        differences[label] = stats.paired_difference(
            [finals[label][s] for s in shared], [base_finals[s] for s in shared], bounds=stats.DIFFERENCE_BOUNDS
        )
    compared = [label for label in labels if differences[label] is not None]
    adjusted = dict(zip(compared, stats.holm([differences[label].p_value for label in compared]), strict=True))

    def accuracy(label):
        values = [finals[label][s] for s in sorted(finals.get(label, {}))]
        return stats.t_interval(values, bounds=stats.ACCURACY_BOUNDS) if values else None

    measured = [label for label in labels if label in costs and finals.get(label)]
    means = {label: accuracy(label).mean for label in measured}
    spreads = {label: round_ratios(costs[label], base_cost) for label in labels if label in costs and base_cost}
    ratios = {label: spread[1] for label, spread in spreads.items()}
    front_time = dict(
        zip(
            measured,
            stats.pareto_front([ratios.get(label, math.inf) for label in measured], [means[m] for m in measured]),
            strict=True,
        )
    )
    front_params = dict(
        zip(
            measured,
            stats.pareto_front([costs[label].params for label in measured], [means[m] for m in measured]),
            strict=True,
        )
    )
    rows = []
    for label in labels:
        cost = costs.get(label)
        difference = differences[label]
        p = adjusted.get(label, math.nan)
        rows.append(
            Row(
                label=label,
                params=cost.params if cost else None,
                train_mflops_per_image=None
                if cost is None or cost.train_flops_per_image is None
                else cost.train_flops_per_image / 1e6,
                step_ms=cost.step_s * 1e3 if cost else None,
                time_ratio=ratios.get(label),
                time_ratio_iqr=(spreads[label][0], spreads[label][2]) if label in spreads else None,
                temp_mib=None if cost is None or cost.temp_bytes is None else cost.temp_bytes / MIB,
                accuracy=accuracy(label),
                difference=difference,
                adjusted_p=p,
                verdict="baseline"
                if label == baseline
                else (stats.verdict(difference, p) if difference else stats.UNKNOWN),
                front_time=front_time.get(label, False),
                front_params=front_params.get(label, False),
            )
        )
    return rows


def round_ratios(cost: NetworkCost, baseline: NetworkCost) -> tuple[float, float, float]:
    """The quartiles (q1, median, q3) of the entry's step time over the baseline's, round by round.

    Both were timed in the same rounds, side by side, so each round's ratio cancels the drift of
    the machine over the measurement.
    """
    ratios = [t / b for t, b in zip(cost.times_s, baseline.times_s, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, median, q3


CSV_COLUMNS = (
    "block",
    "seeds",
    "params",
    "train_mflops_per_image",
    "step_ms",
    "time_vs_baseline",
    "time_vs_baseline_q1",
    "time_vs_baseline_q3",
    "temp_mib",
    "accuracy_mean",
    "accuracy_sd",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "diff_mean",
    "diff_ci_low",
    "diff_ci_high",
    "diff_p",
    "diff_p_holm",
    "verdict",
    "pareto_time",
    "pareto_params",
)


def row_values(row: Row) -> dict:
    """A row as the CSV's columns (numbers unformatted; empty where unknown)."""

    def num(value):
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value

    acc, diff = row.accuracy, row.difference
    return {
        "block": row.label,
        "seeds": row.seeds,
        "params": num(row.params),
        "train_mflops_per_image": num(row.train_mflops_per_image),
        "step_ms": num(row.step_ms),
        "time_vs_baseline": num(row.time_ratio),
        "time_vs_baseline_q1": num(row.time_ratio_iqr and row.time_ratio_iqr[0]),
        "time_vs_baseline_q3": num(row.time_ratio_iqr and row.time_ratio_iqr[1]),
        "temp_mib": num(row.temp_mib),
        "accuracy_mean": num(acc and acc.mean),
        "accuracy_sd": num(acc and acc.sd),
        "accuracy_ci_low": num(acc and acc.low),
        "accuracy_ci_high": num(acc and acc.high),
        "diff_mean": num(diff and diff.interval.mean),
        "diff_ci_low": num(diff and diff.interval.low),
        "diff_ci_high": num(diff and diff.interval.high),
        "diff_p": num(diff and diff.p_value),
        "diff_p_holm": num(row.adjusted_p),
        "verdict": row.verdict,
        "pareto_time": int(row.front_time),
        "pareto_params": int(row.front_params),
    }


def write_csv(path: str, records: Sequence[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(records)


def _pct(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value * 100:{'+' if sign else ''}.{digits}f}"


def _interval(interval: stats.Interval | None, sign: bool = False) -> str:
    if interval is None:
        return "n/a"
    if interval.n < 2:
        return _pct(interval.mean, sign=sign) + " (1 seed)"
    return f"{_pct(interval.mean, sign=sign)} [{_pct(interval.low, sign=sign)}, {_pct(interval.high, sign=sign)}]"


ACCURACY_NOTE = "clipped to [0, 100]"
DIFFERENCE_NOTE = "clipped to [-100, 100]"


def markdown_table(rows: Sequence[Row]) -> str:
    """The summary as a markdown table: accuracies in percent with their 95% intervals, clipped to [0, 100].

    The headers say so: with few seeds a t interval can reach past 100% (or a difference past ±100 pp),
    and the table shows it cut there.
    """
    header = [
        "block",
        "seeds",
        "params",
        "train MFLOP/img",
        "step ms",
        "time vs none (IQR)",
        "temp MiB",
        f"test acc % [95% CI, {ACCURACY_NOTE}]",
        "sd",
        f"Δ vs none, pp [95% CI, {DIFFERENCE_NOTE}]",
        "p (Holm)",
        "verdict",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * 10 + ["---"]) + "|"]
    for row in rows:
        front = " ◆" if row.front_time else ""
        cells = [
            f"{row.label}{front}",
            str(row.seeds),
            "n/a" if row.params is None else f"{row.params:,}",
            "n/a" if row.train_mflops_per_image is None else f"{row.train_mflops_per_image:,.1f}",
            "n/a" if row.step_ms is None else f"{row.step_ms:.1f}",
            "n/a"
            if row.time_ratio is None
            else f"{row.time_ratio:.2f} ({row.time_ratio_iqr[0]:.2f}-{row.time_ratio_iqr[1]:.2f})",
            "n/a" if row.temp_mib is None else f"{row.temp_mib:.1f}",
            _interval(row.accuracy),
            "n/a" if row.accuracy is None or math.isnan(row.accuracy.sd) else _pct(row.accuracy.sd),
            "" if row.difference is None else _interval(row.difference.interval, sign=True),
            "" if math.isnan(row.adjusted_p) else f"{row.adjusted_p:.3f}",
            row.verdict,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plain_words(rows: Sequence[Row], baseline: str) -> list[str]:
    """What the table says, as sentences that never rank what the noise cannot tell apart."""
    by_verdict: dict[str, list[str]] = {}
    for row in rows:
        by_verdict.setdefault(row.verdict, []).append(row.label)
    lines = []
    better = [r for r in rows if r.verdict == stats.BETTER]
    if better:
        parts = [
            f"{r.label} (+{r.difference.interval.mean * 100:.2f} pp for {r.time_ratio:.2f}x the step time)"
            if r.time_ratio
            else r.label
            for r in better
        ]
        lines.append(f"More accurate than {baseline}, beyond the noise: " + ", ".join(parts) + ".")
    else:
        lines.append(f"No block is more accurate than {baseline} beyond the noise.")
    if by_verdict.get(stats.WORSE):
        lines.append(f"Less accurate than {baseline}, beyond the noise: " + ", ".join(by_verdict[stats.WORSE]) + ".")
    if by_verdict.get(stats.NOISE):
        lines.append(
            f"Within the noise of {baseline} (not ranked): " + ", ".join(sorted(by_verdict[stats.NOISE])) + "."
        )
    if by_verdict.get(stats.UNKNOWN):
        lines.append(
            "Not yet comparable (fewer than 2 finished seeds shared with the baseline): "
            + ", ".join(by_verdict[stats.UNKNOWN])
            + "."
        )
    return lines
