"""The CPU formulations of grouped_conv and single_output_conv against lax's convs: blocks, ops and fallbacks.

Each block that uses one of these ops (sk, triplet, cbam) must give the same outputs, batch
statistics and gradients (w.r.t. the input and every parameter) under both formulations, forced
with ``ops.use_formulations``, whatever the backend's table says.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from torch_reference import random_images, random_variables

from attnjax import blocks, ops
from attnjax.ops import single_output_conv as single_output_module
from attnjax.ops.grouped_conv import block_diagonal_kernel, grouped_conv
from attnjax.ops.single_output_conv import single_output_conv

pytestmark = pytest.mark.torch  # through torch_reference (its random inputs), which imports PyTorch

TOL = 1e-5
NHWC = ("NHWC", "HWIO", "NHWC")

# block -> (op, the previous formulation, the CPU one, shapes): odd sizes, H != W, 1x1 maps;
# sk's C = 40 and 24 are not multiples of 32 (groups 20 and 24), C = 64 has groups 32.
CASES = {
    "sk": ("grouped_conv", "grouped", "block_diagonal", [(2, 5, 7, 40), (1, 1, 1, 24), (2, 4, 3, 64)]),
    "triplet": ("single_output_conv", "conv", "banded", [(2, 5, 7, 9), (1, 1, 1, 4), (2, 8, 6, 16), (1, 3, 11, 5)]),
    "cbam": ("single_output_conv", "conv", "banded", [(2, 5, 7, 9), (1, 1, 1, 12), (2, 8, 6, 16), (1, 3, 11, 5)]),
}


def block_step(name, variables, x, cotangent, choices):
    """Output, new batch stats and the gradients of ``sum(y * cotangent)`` w.r.t. (params, x), under ``choices``."""
    block = blocks.create(name)
    others = {k: v for k, v in variables.items() if k != "params"}

    def loss(params, x):
        y, updates = block.apply({**others, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y * cotangent), (y, updates)

    with ops.use_formulations(**choices):
        step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        (d_params, d_x), (y, updates) = step(variables["params"], x)
    return y, updates, d_params, d_x


def jaxpr_text(fn, *args) -> str:
    """The jaxpr of ``fn(*args)``, traced afresh (a new function each time, so no cached trace is reused)."""
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


@pytest.mark.parametrize(
    "name, shape", [(name, shape) for name, (*_, shapes) in CASES.items() for shape in shapes], ids=str
)
def test_block_cpu_formulation_matches_the_previous_one(name, shape):
    """In float64, so that what is compared is the math (float32 rounding is checked below)."""
    op, previous, cpu, _ = CASES[name]
    with jax.enable_x64(True):
        x = jnp.asarray(random_images(shape, seed=3), jnp.float64)
        cotangent = jnp.asarray(random_images(shape, seed=4), jnp.float64)
        variables = random_variables(blocks.create(name), x, seed=5)
        expected = block_step(name, variables, x, cotangent, {op: previous})
        got = block_step(name, variables, x, cotangent, {op: cpu})
    chex.assert_trees_all_close(got, expected, atol=TOL, rtol=TOL)


def scaled_error(got, truth) -> float:
    """The largest |got - truth| of any leaf, over that leaf's largest |truth|."""
    return max(
        float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(t))) / max(float(np.max(np.abs(t))), 1e-30))
        for g, t in zip(jax.tree.leaves(got), jax.tree.leaves(truth), strict=True)
    )


@pytest.mark.parametrize(
    "name, shape", [(name, shape) for name, (*_, shapes) in CASES.items() for shape in shapes], ids=str
)
def test_block_cpu_formulation_rounds_no_worse_than_the_previous_one_in_float32(name, shape):
    """float32 against the float64 result of the same float32 inputs: the CPU formulation's error (outputs,
    batch stats and gradients, each leaf over its own scale) is at most twice the previous formulation's,
    or 1e-5. Not the two float32 results against each other: batch norm's backward pass amplifies rounding,
    and how much depends on the XLA build (jaxlib 0.10.2: lax's grouped conv errs by 5.9e-5 on sk's
    gradients at C = 64, the block-diagonal one by 3e-6)."""
    op, previous, cpu, _ = CASES[name]
    x = jnp.asarray(random_images(shape, seed=3))
    cotangent = jnp.asarray(random_images(shape, seed=4))
    variables = random_variables(blocks.create(name), x, seed=5)
    with jax.enable_x64(True):
        up = functools.partial(jax.tree.map, lambda a: jnp.asarray(a, jnp.float64))
        truth = jax.device_get(block_step(name, up(variables), up(x), up(cotangent), {op: previous}))
    error = {
        form: scaled_error(block_step(name, variables, x, cotangent, {op: form}), truth) for form in (previous, cpu)
    }
    assert error[cpu] <= max(2 * error[previous], TOL), error


@pytest.mark.parametrize("name", list(CASES))
def test_each_formulation_is_what_gets_traced(name):
    op, previous, cpu, shapes = CASES[name]
    x = jnp.zeros(shapes[0])
    block = blocks.create(name)
    variables = random_variables(block, x)
    apply = functools.partial(block.apply, mutable=["batch_stats", "intermediates"])
    with ops.use_formulations(**{op: previous}):
        before = jaxpr_text(apply, variables, x)
    with ops.use_formulations(**{op: cpu}):
        after = jaxpr_text(apply, variables, x)
    if name == "sk":  # grouped convs before, dense ones after
        assert "feature_group_count=1\n" not in before and "feature_group_count=1\n" in after
        assert "feature_group_count=" + str(blocks.sk.sk_groups(shapes[0][-1])) in before
    else:  # the 7x7 convs become dots
        assert "conv_general_dilated" in before and "conv_general_dilated" not in after


def test_cpu_table_picks_the_cpu_formulations():
    assert ops.formulation("grouped_conv", backend="cpu") == "block_diagonal"
    assert ops.formulation("single_output_conv", backend="cpu") == "banded"
    assert ops.formulation("grouped_conv", backend="gpu") == "grouped"
    assert ops.formulation("single_output_conv", backend="tpu") == "conv"


# --- grouped_conv -----------------------------------------------------------------------------


def conv_and_grads(conv, x, kernel, cotangent, **kwargs):
    """``conv(x, kernel, **kwargs)`` and the gradients of ``sum(y * cotangent)`` w.r.t. x and the kernel."""

    def loss(x, kernel):
        y = conv(x, kernel, **kwargs)
        return jnp.sum(y * cotangent), y

    (d_x, d_kernel), y = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, kernel)
    return y, d_x, d_kernel


def test_block_diagonal_kernel_layout():
    kernel = jnp.arange(1, 13, dtype=jnp.float32).reshape(1, 1, 2, 6)  # HWIO, groups 3: C_in / G = 2, C_out = 6
    dense = np.asarray(block_diagonal_kernel(kernel, 3, in_axis=2, out_axis=3))[0, 0]  # (6, 6)
    for i in range(6):
        for o in range(6):
            expected = kernel[0, 0, i % 2, o] if i // 2 == o // 2 else 0.0
            assert dense[i, o] == expected


@pytest.mark.parametrize(
    "dimension_numbers, strides, dilation, padding",
    [
        (NHWC, (1, 1), (1, 1), ((1, 1), (1, 1))),
        (NHWC, (1, 1), (2, 2), ((2, 2), (2, 2))),
        (NHWC, (2, 1), (1, 2), "SAME"),
        (("NCHW", "OIHW", "NCHW"), (1, 2), (1, 1), "VALID"),
    ],
    ids=["same", "dilated", "strided", "nchw"],
)
def test_grouped_conv_block_diagonal_matches_grouped(dimension_numbers, strides, dilation, padding):
    groups, c_in, c_out = 3, 9, 6
    x = jnp.asarray(random_images((2, 7, 5, c_in), seed=1))
    kernel = jnp.asarray(random_images((3, 3, c_in // groups, c_out), seed=2))
    if dimension_numbers[0] == "NCHW":
        x, kernel = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(kernel, (3, 2, 0, 1))
    kwargs = dict(
        window_strides=strides,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=groups,
    )
    expected = lax.conv_general_dilated(x, kernel, **kwargs)
    cotangent = jnp.asarray(random_images(expected.shape, seed=3))
    with ops.use_formulations(grouped_conv="grouped"):
        previous = conv_and_grads(grouped_conv, x, kernel, cotangent, **kwargs)
    with ops.use_formulations(grouped_conv="block_diagonal"):
        assert "feature_group_count=1\n" in jaxpr_text(functools.partial(grouped_conv, **kwargs), x, kernel)
        got = conv_and_grads(grouped_conv, x, kernel, cotangent, **kwargs)
    chex.assert_trees_all_close(previous[0], expected, atol=TOL, rtol=TOL)
    chex.assert_trees_all_close(got, previous, atol=TOL, rtol=TOL)


def test_grouped_conv_falls_back_to_lax_where_there_is_nothing_to_do():
    x = jnp.asarray(random_images((4, 5, 5, 6), seed=1))
    with ops.use_formulations(grouped_conv="block_diagonal"):
        # no groups: the same conv
        kernel = jnp.asarray(random_images((3, 3, 6, 4), seed=2))
        kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
        np.testing.assert_array_equal(grouped_conv(x, kernel, **kwargs), lax.conv_general_dilated(x, kernel, **kwargs))
        # batch groups: passed on as they are
        kernel = jnp.asarray(random_images((3, 3, 6, 4), seed=2))
        kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC, batch_group_count=2)
        assert "batch_group_count=2" in jaxpr_text(functools.partial(grouped_conv, **kwargs), x, kernel)
        np.testing.assert_array_equal(grouped_conv(x, kernel, **kwargs), lax.conv_general_dilated(x, kernel, **kwargs))
    with ops.use_formulations(grouped_conv="grouped"):  # the previous formulation: lax's grouped conv
        kernel = jnp.asarray(random_images((3, 3, 3, 4), seed=2))
        kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC, feature_group_count=2)
        assert "feature_group_count=2" in jaxpr_text(functools.partial(grouped_conv, **kwargs), x, kernel)
        np.testing.assert_array_equal(grouped_conv(x, kernel, **kwargs), lax.conv_general_dilated(x, kernel, **kwargs))


# --- single_output_conv -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, kernel_size, padding",
    [
        ((2, 5, 7, 2), (7, 7), ((3, 3), (3, 3))),
        ((1, 1, 1, 2), (7, 7), ((3, 3), (3, 3))),
        ((3, 6, 4, 3), (3, 5), ((1, 1), (2, 2))),
        ((2, 4, 9, 1), (4, 2), ((1, 2), (0, 1))),  # even kernels, asymmetric size-keeping padding
    ],
    ids=str,
)
def test_single_output_conv_banded_matches_conv(shape, kernel_size, padding):
    x = jnp.asarray(random_images(shape, seed=1))
    kernel = jnp.asarray(random_images(kernel_size + (shape[-1], 1), seed=2))
    cotangent = jnp.asarray(random_images(shape[:3] + (1,), seed=3))
    kwargs = dict(window_strides=(1, 1), padding=padding, dimension_numbers=NHWC)
    with ops.use_formulations(single_output_conv="conv"):
        previous = conv_and_grads(single_output_conv, x, kernel, cotangent, **kwargs)
    with ops.use_formulations(single_output_conv="banded"):
        assert "conv_general_dilated" not in jaxpr_text(functools.partial(single_output_conv, **kwargs), x, kernel)
        got = conv_and_grads(single_output_conv, x, kernel, cotangent, **kwargs)
    chex.assert_trees_all_close(previous[0], lax.conv_general_dilated(x, kernel, **kwargs), atol=TOL, rtol=TOL)
    chex.assert_trees_all_close(got, previous, atol=TOL, rtol=TOL)


SAME_7 = ((3, 3), (3, 3))


@pytest.mark.parametrize(
    "shape, kernel_shape, kwargs",
    [
        ((2, 8, 8, 2), (7, 7, 2, 2), dict(padding=SAME_7)),  # two outputs
        ((2, 8, 8, 2), (7, 7, 2, 1), dict(padding=SAME_7, window_strides=(2, 2))),
        ((2, 8, 8, 2), (7, 7, 2, 1), dict(padding=SAME_7, rhs_dilation=(2, 2))),
        ((2, 8, 8, 2), (7, 7, 2, 1), dict(padding=SAME_7, lhs_dilation=(2, 1))),
        ((2, 8, 8, 2), (7, 7, 1, 2), dict(padding=SAME_7, feature_group_count=2)),
        ((4, 8, 8, 2), (7, 7, 2, 2), dict(padding=SAME_7, batch_group_count=2)),
        ((2, 8, 8, 2), (7, 7, 2, 1), dict(padding="SAME")),
        ((2, 8, 8, 2), (7, 7, 2, 1), dict(padding=((0, 0), (0, 0)))),  # not size-keeping
        ((2, 8, 8, 2), (7, 7, 2, 1), dict(padding=((3, 3), (2, 2)))),
        ((2, 2, 8, 8), (1, 2, 7, 7), dict(padding=SAME_7, dimension_numbers=("NCHW", "OIHW", "NCHW"))),
        ((1, 3, 129, 2), (7, 7, 2, 1), dict(padding=SAME_7)),  # wider than MAX_WIDTH
    ],
    ids=[
        "two-outputs",
        "stride",
        "kernel-dilation",
        "input-dilation",
        "feature-groups",
        "batch-groups",
        "padding-string",
        "valid-padding",
        "shrinking-padding",
        "nchw",
        "too-wide",
    ],
)
def test_single_output_conv_falls_back_to_lax_outside_its_case(shape, kernel_shape, kwargs):
    assert single_output_module.MAX_WIDTH < 129
    x = jnp.asarray(random_images(shape, seed=1))
    kernel = jnp.asarray(random_images(kernel_shape, seed=2))
    kwargs = {"window_strides": (1, 1), "dimension_numbers": NHWC, **kwargs}
    with ops.use_formulations(single_output_conv="banded"):
        assert "conv_general_dilated" in jaxpr_text(functools.partial(single_output_conv, **kwargs), x, kernel)
        got = single_output_conv(x, kernel, **kwargs)
    np.testing.assert_array_equal(got, lax.conv_general_dilated(x, kernel, **kwargs))


def test_single_output_conv_falls_back_for_one_spatial_dim():
    x = jnp.asarray(random_images((2, 9, 2), seed=1))
    kernel = jnp.asarray(random_images((7, 2, 1), seed=2))
    kwargs = dict(window_strides=(1,), padding=((3, 3),), dimension_numbers=("NWC", "WIO", "NWC"))
    with ops.use_formulations(single_output_conv="banded"):
        got = single_output_conv(x, kernel, **kwargs)
    np.testing.assert_array_equal(got, lax.conv_general_dilated(x, kernel, **kwargs))
