"""Ops whose fastest formulation depends on the backend, and the one table that picks it.

Some ops have a formulation that XLA compiles well on GPU/TPU and badly on CPU (or the
reverse). Every such op lives in this package, computes the same values in each of its
formulations (tests check them against each other to 1e-5, gradients included), and asks
:func:`formulation` which one to trace. ``FORMULATIONS`` below is the whole choice, in one
place::

    op                  on cpu            elsewhere (gpu, tpu)
    grouped_conv        block_diagonal    grouped
    attention           einsum            fused
    single_output_conv  banded            conv

The choice is made when a function is traced, from ``jax.default_backend()``. To force one
(to compare formulations, or to rule one out), trace under :func:`use_formulations`::

    with ops.use_formulations(grouped_conv="grouped"):
        step = jax.jit(train_step)     # traced inside the context: grouped convs on CPU too
        step(state, batch)

JAX caches traces by function, not by this choice, so entering and leaving the context clears
JAX's caches (``jax.clear_caches``): a function traced outside is traced afresh inside, and
the other way round. Functions then compile again on their next call: a tool for comparing
formulations and for tests, not for a training loop.
"""

from __future__ import annotations

import contextlib
import threading

import jax
from jax import lax

from attnjax.validate import InputError

# op -> {backend: formulation}; "default" covers every backend not named.
FORMULATIONS: dict[str, dict[str, str]] = {
    # XLA:CPU runs the kernel gradient of a grouped conv as a base-dilated conv on its naive
    # emitter; a dense conv with a block-diagonal kernel (G times the FLOPs) avoids it.
    "grouped_conv": {"cpu": "block_diagonal", "default": "grouped"},
    # jax.nn.dot_product_attention on CPU adds layout copies and several passes over the
    # (P, P) weights; GPU has a fused kernel for it.
    "attention": {"cpu": "einsum", "default": "fused"},
    # 7x7 convs with 2 inputs and 1 output (triplet, CBAM) are slow on both XLA:CPU conv
    # paths; 7 row-shifted slices times one banded matrix is a single dot.
    "single_output_conv": {"cpu": "banded", "default": "conv"},
}
CHOICES: dict[str, tuple[str, ...]] = {
    "grouped_conv": ("grouped", "block_diagonal"),
    "attention": ("fused", "einsum"),
    "single_output_conv": ("conv", "banded"),
}

_overrides = threading.local()


def formulation(op: str, backend: str | None = None) -> str:
    """The formulation of ``op`` to trace now: an override from :func:`use_formulations`, else the table's."""
    forced = getattr(_overrides, "choices", {})
    if op in forced:
        return forced[op]
    table = FORMULATIONS[op]
    return table.get(backend or jax.default_backend(), table["default"])


@contextlib.contextmanager
def use_formulations(**choices: str):
    """Trace with the given ``op=formulation`` choices instead of the table's (nests; restores on exit)."""
    for op, choice in choices.items():
        if op not in CHOICES:
            raise InputError(f"unknown op {op!r}; ops with formulations: {', '.join(sorted(CHOICES))}")
        if choice not in CHOICES[op]:
            raise InputError(f"unknown formulation {choice!r} of {op}; choose from {', '.join(CHOICES[op])}")
    previous = getattr(_overrides, "choices", {})
    _overrides.choices = {**previous, **choices}
    jax.clear_caches()  # a trace cached under other choices must not be reused
    try:
        yield
    finally:
        _overrides.choices = previous
        jax.clear_caches()


def chosen() -> dict[str, str]:
    """Every op's formulation on the current backend (with any override): what a run records."""
    return {op: formulation(op) for op in FORMULATIONS}


def conv_with_formulation(reformulated):
    """An op with ``lax.conv_general_dilated``'s signature around ``reformulated`` (for ``nn.Conv``'s argument
    ``conv_general_dilated``).

    ``reformulated(lhs, rhs, **arguments)`` gets every argument of the call by name (all of
    ``lax.conv_general_dilated``'s, defaults filled in) and returns the op's result in its own
    formulation, or ``None`` where it has nothing to do: that call goes to ``lax.conv_general_dilated``
    unchanged. The op takes ``reformulated``'s name and docstring.
    """

    def conv(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count: int = 1,
        batch_group_count: int = 1,
        precision=None,
        preferred_element_type=None,
    ) -> jax.Array:
        arguments = dict(
            window_strides=window_strides,
            padding=padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
        out = reformulated(lhs, rhs, **arguments)
        return lax.conv_general_dilated(lhs, rhs, **arguments) if out is None else out

    conv.__name__, conv.__qualname__ = reformulated.__name__, reformulated.__qualname__
    conv.__doc__, conv.__module__ = reformulated.__doc__, reformulated.__module__
    return conv
