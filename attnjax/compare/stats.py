"""The statistics of a study: means over seeds with t intervals, paired differences, Holm's correction.

Seeds are few (3-10), so every interval is Student's t, not normal. A block is compared with the
baseline run by run: the runs of one seed share their data order and augmentation, so the
per-seed difference cancels that part of the noise (a paired t interval). With many blocks
compared against one baseline, some 95% intervals exclude zero by chance alone; the verdict
uses Holm's step-down correction of the paired p-values over the study's comparisons, and
anything it does not clear is reported as within the noise, never ranked.

An accuracy lies in [0, 1] and a difference of two in [-1, 1], but with 2 or 3 seeds a t interval
can reach past those ends (two seeds at 60% and 99% give about [-168%, 327%]); the study passes
those bounds and the interval is clipped to them: it says nothing the bounds do not already say,
and ``clipped`` records that it happened.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
BETTER, WORSE, NOISE, UNKNOWN = "better", "worse", "within noise", "n/a"
ACCURACY_BOUNDS = (0.0, 1.0)  # an accuracy, as a fraction
DIFFERENCE_BOUNDS = (-1.0, 1.0)  # one accuracy minus another


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean with its sample standard deviation and two-sided confidence interval (``nan`` for one value).

    ``clipped``: the t interval reached past the bounds it was computed with and was cut to them.
    """

    mean: float
    sd: float
    low: float
    high: float
    n: int
    clipped: bool = False

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def t_interval(
    values: Sequence[float], confidence: float = CONFIDENCE, bounds: tuple[float, float] | None = None
) -> Interval:
    """Mean of ``values`` with Student's t interval: mean ± t(n-1) · sd / √n, clipped to ``bounds`` if given.

    ``bounds`` are the values the quantity can take (``ACCURACY_BOUNDS`` for an accuracy): the
    interval never reaches past them.
    """
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("no values")
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, math.nan, n)
    sd = float(x.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is None:
        return Interval(mean, sd, low, high, n)
    lowest, highest = bounds
    clipped = low < lowest or high > highest
    return Interval(mean, sd, max(low, lowest), min(high, highest), n, clipped)


@dataclasses.dataclass(frozen=True)
class Difference:
    """A paired difference (block minus baseline, seed by seed): its interval and two-sided p-value."""

    interval: Interval
    p_value: float


def paired_difference(
    values: Sequence[float],
    baseline: Sequence[float],
    confidence: float = CONFIDENCE,
    bounds: tuple[float, float] | None = None,
) -> Difference:
    """``values[i] - baseline[i]`` over the seeds both have, with the paired t test's p-value.

    The interval is clipped to ``bounds`` if given (``DIFFERENCE_BOUNDS`` for two accuracies); the
    p-value is the unclipped test's. Identical differences (zero spread) give p = 0 when they are
    not zero, 1 when they are.
    """
    if len(values) != len(baseline):
        raise ValueError(f"paired values need equal lengths, got {len(values)} and {len(baseline)}")
    d = np.asarray(values, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    interval = t_interval(d, confidence, bounds)
    if interval.n < 2:
        return Difference(interval, math.nan)
    if interval.sd == 0:
        return Difference(interval, 0.0 if interval.mean != 0 else 1.0)
    t = interval.mean / (interval.sd / math.sqrt(interval.n))
    return Difference(interval, float(2 * scipy_stats.t.sf(abs(t), interval.n - 1)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the order given; ``nan`` stays ``nan``."""
    indexed = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    m = len(indexed)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(indexed)):
        running = max(running, min(1.0, (m - rank) * p))  # adjusted p-values never decrease with rank
        adjusted[i] = running
    return adjusted


def verdict(difference: Difference, adjusted_p: float, alpha: float = 1 - CONFIDENCE) -> str:
    """``better``/``worse`` than the baseline when the corrected test clears ``alpha``; else ``within noise``."""
    if math.isnan(adjusted_p):
        return UNKNOWN
    if adjusted_p >= alpha:
        return NOISE
    return BETTER if difference.interval.mean > 0 else WORSE


def pareto_front(costs: Sequence[float], accuracies: Sequence[float]) -> list[bool]:
    """Whether each point is on the front: no other point costs no more and is at least as accurate, and better in one.

    Uses the points as given (the study passes mean accuracies); equal points are all on the front.
    """
    front = []
    for i, (ci, ai) in enumerate(zip(costs, accuracies, strict=True)):
        dominated = any(
            cj <= ci and aj >= ai and (cj < ci or aj > ai)
            for j, (cj, aj) in enumerate(zip(costs, accuracies, strict=True))
            if j != i
        )
        front.append(not dominated)
    return front
