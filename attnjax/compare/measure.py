"""What the cost tools measure, in one place: parameters, XLA's FLOPs and temporary memory, and the side-by-side timer.

Both the block cost table (:mod:`attnjax.compare.block_cost`: one block on a synthetic feature
map) and the study's network cost (:mod:`attnjax.compare.cost`: the whole train step of each
entry) are built from these pieces:

- :func:`count_params`: the scalars in a ``params`` collection (batch norm's running averages
  are not parameters);
- :func:`flops_of` and :func:`math_flops`: XLA's cost analysis of a compiled function, the
  latter compiled with the formulations native to GPU/TPU (:data:`NATIVE_FORMULATIONS`), so
  that it counts the math and not a CPU formulation's extra work (sk's block-diagonal
  convolutions run G times the FLOPs of its grouped ones). XLA counts a multiply-add as 2 FLOPs;
  the counts of custom calls (cuDNN kernels) may be missing;
- :func:`temp_bytes_of`: XLA's temporary buffers of a compiled function (``memory_analysis()``):
  what it keeps beyond its arguments and outputs (a train step's activations and scratch);
- :func:`side_by_side`: the one timer. Every variant is warmed up first (allocations, thread
  pools); then each of ``repeats`` rounds runs every variant once, in an order rotated by one
  per round, so that machine noise and drift fall on every variant alike. Round ``r``'s time of
  every variant is at index ``r`` of its tuple, so callers take medians and quartiles
  (:func:`quartiles`: the block table) or the ratios of two variants round by round (the
  study's time against the baseline, :func:`attnjax.compare.report.round_ratios`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from tqdm.auto import tqdm

from attnjax import ops

# The formulation every op runs on GPU/TPU: the one whose FLOPs are the block's math.
NATIVE_FORMULATIONS = {op: table["default"] for op, table in ops.FORMULATIONS.items()}


def count_params(variables: Any) -> int:
    """Number of scalars in the ``params`` collection of ``variables``."""
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables.get("params", {})))


def compile_fn(fn: Callable, *args: Any, compiler_options: dict | None = None) -> Any:
    """``fn`` traced, lowered and compiled by ``jax.jit`` for ``args`` (with XLA ``compiler_options`` if any)."""
    return jax.jit(fn, compiler_options=compiler_options or None).lower(*args).compile()


def flops_of(compiled: Any) -> float | None:
    """``flops`` from ``compiled.cost_analysis()``, which is a dict (or, in older JAX, a list of dicts).

    ``None`` where the backend gives no analysis.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # a backend without cost analysis
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None
    flops = analysis.get("flops", 0.0)  # XLA leaves the key out when nothing is computed (the identity)
    return float(flops) if flops >= 0 else None


def math_flops(fn: Callable, *args: Any) -> float | None:
    """XLA's FLOP count of ``fn(*args)`` traced and compiled with the formulations native to GPU/TPU.

    The trace happens inside :func:`attnjax.ops.use_formulations`, so the count is that of the
    math on every backend. ``None`` where the backend gives no cost analysis.
    """
    with ops.use_formulations(**NATIVE_FORMULATIONS):
        return flops_of(compile_fn(fn, *args))


def temp_bytes_of(compiled: Any) -> int | None:
    """XLA's temporary buffer size of a compiled function, or ``None`` where the backend gives no analysis."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # a backend without memory analysis
        return None
    size = getattr(analysis, "temp_size_in_bytes", None)
    return None if size is None or size < 0 else int(size)


def side_by_side(
    variants: Mapping[str, Callable[[], Any]],
    repeats: int,
    *,
    progress: bool = False,
    desc: str = "time",
) -> dict[str, tuple[float, ...]]:
    """The wall times of each variant (a call without arguments, e.g. a compiled step on its inputs), interleaved.

    Each variant is called once untimed (the warm-up), then ``repeats`` rounds each call every
    variant once, round ``r`` in the order of ``variants`` rotated left by ``r`` (modulo their
    number); a call is timed until its outputs are ready (``jax.block_until_ready``). Returns
    each variant's ``repeats`` times in seconds, round by round: index ``r`` of every tuple is
    round ``r``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    labels = list(variants)
    for label in labels:
        jax.block_until_ready(variants[label]())  # warm-up: allocations, thread pools
    times: dict[str, list[float]] = {label: [] for label in labels}
    with tqdm(total=repeats * len(labels), desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for r in range(repeats):
            shift = r % len(labels) if labels else 0
            for label in labels[shift:] + labels[:shift]:
                start = time.perf_counter()
                jax.block_until_ready(variants[label]())
                times[label].append(time.perf_counter() - start)
                bar.update()
    return {label: tuple(seconds) for label, seconds in times.items()}


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """``(q1, median, q3)`` of ``values`` (inclusive method); all three the value itself for one value."""
    if not values:
        raise ValueError("no values")
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3
