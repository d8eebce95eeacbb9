"""The one measuring module of the cost tools: counts, XLA's analyses, and the side-by-side timer both tools use."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from attnjax import train
from attnjax.compare import block_cost, cost, measure

ROOT = Path(__file__).resolve().parents[2]


def test_counts_and_analyses_of_a_known_function():
    params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    assert measure.count_params({"params": params, "batch_stats": {"mean": jnp.zeros(4)}}) == 16  # not the averages
    assert measure.count_params({}) == 0
    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
    compiled = measure.compile_fn(jnp.dot, x, w)
    assert measure.flops_of(compiled) == 2 * 4 * 8 * 16  # a multiply-add is 2 FLOPs
    assert measure.math_flops(jnp.dot, x, w) == 2 * 4 * 8 * 16
    temp = measure.temp_bytes_of(compiled)
    assert temp is None or (isinstance(temp, int) and temp >= 0)
    assert measure.flops_of(object()) is None and measure.temp_bytes_of(object()) is None  # no analysis
    assert measure.quartiles([3.0]) == (3.0, 3.0, 3.0)
    assert measure.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)


def test_the_timer_warms_every_variant_up_then_rotates_the_order_by_one_per_round():
    calls = []
    double, square = jax.jit(lambda v: 2 * v), jax.jit(lambda v: v * v)
    v = jnp.arange(4.0)

    def variant(label, fn):
        def run():
            calls.append(label)
            return fn(v)

        return run

    times = measure.side_by_side({"a": variant("a", double), "b": variant("b", square), "c": variant("c", jnp.sin)}, 4)
    warm_up, rounds = calls[:3], [calls[3 + 3 * r : 6 + 3 * r] for r in range(4)]
    assert warm_up == ["a", "b", "c"] and len(calls) == 3 + 4 * 3
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert list(times) == ["a", "b", "c"]
    assert all(len(t) == 4 and all(s > 0 for s in t) for t in times.values())
    with pytest.raises(ValueError, match="repeats"):
        measure.side_by_side({"a": variant("a", double)}, 0)


def test_the_block_table_and_the_study_cost_take_their_times_from_the_one_timer(monkeypatch):
    """Both callers time through ``measure.side_by_side``, and report exactly the times it returned, round by round."""
    real, timed = measure.side_by_side, []

    def recording(variants, repeats, **options):  # the real timer, its calls written down
        times = real(variants, repeats, **options)
        timed.append((list(variants), repeats, times))
        return times

    monkeypatch.setattr(measure, "side_by_side", recording)
    rows = block_cost.measure(["se"], channels=8, height=4, width=4, batch=2, repeats=2, progress=False)
    base = train.Config(dataset="digits", batch_size=2, block="none")
    configs = {"none": base, "se": dataclasses.replace(base, block="se")}
    nets = cost.measure(configs, (8, 8, 1), 10, repeats=3, progress=False)
    (table_labels, table_repeats, table_times), (net_labels, net_repeats, net_times) = timed
    assert (table_labels, table_repeats) == (["identity", "se"], 2)
    assert {row.name: row.times_s for row in rows} == table_times
    assert (net_labels, net_repeats) == (["none", "se"], 3)
    assert {label: c.times_s for label, c in nets.items()} == net_times


def test_the_timing_loop_is_written_once():
    """No other module of the cost tools (or of the block library) reads the clock: they all time through measure."""
    readers = [
        path.relative_to(ROOT).as_posix()
        for folder in ("attnjax/compare", "attnjax/blocks")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "perf_counter" in path.read_text()
    ]
    assert readers == ["attnjax/compare/measure.py"]
