"""The primitives several blocks share (attnjax.blocks.primitives): formulas, gradients and their checks."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from attnjax.blocks.primitives import (
    additive_strip_gate,
    attention_pool,
    depthwise_taps,
    directional_pool,
    excitation_mlp,
    global_avg_pool,
    global_max_pool,
    head_widths,
    odd_size,
    reduced_channels,
    rel_to_abs,
    relative_logits_1d,
    relative_logits_2d,
    resolve_heads,
    sigmoid_gate,
    spatial_softmax,
    strip_conv,
    timm_divisible_width,
)
from attnjax.validate import InputError


def random_images(shape, seed=0):
    """``torch_reference.random_images`` (the same draw), without importing PyTorch."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_sigmoid_gate_formula():
    x = jnp.array([[-2.0, 0.5, 3.0]])
    logits = jnp.array([[0.0, 2.0, -1.0]])
    y, gate = sigmoid_gate(x, logits)
    np.testing.assert_allclose(gate, 1 / (1 + np.exp(-np.asarray(logits))), rtol=1e-6)
    np.testing.assert_allclose(y, np.asarray(x) * gate, rtol=1e-6)


@pytest.mark.parametrize(
    "channels, reduction, expected",
    [(64, 8, 8), (512, 8, 64), (3, 8, 3), (1, 8, 1), (16, 8, 8), (100, 8, 12), (12, 8, 8)],
)
def test_reduced_channels_has_a_sane_minimum(channels, reduction, expected):
    assert reduced_channels(channels, reduction) == expected


@pytest.mark.parametrize(
    "reduction, min_channels, message",
    [(0, 8, "reduction must be >= 1, got 0"), (8, 0, "min_channels must be >= 1, got 0")],
)
def test_reduced_channels_rejects_widths_below_one(reduction, min_channels, message):
    with pytest.raises(InputError, match=message):
        reduced_channels(16, reduction, min_channels)


def test_excitation_mlp_is_one_mlp_however_often_it_is_called():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, z):
            mlp = excitation_mlp(6, 2)
            return mlp(z) + mlp(2 * z)

    z = random_images((3, 6))
    variables = Twice().init(jax.random.key(0), z)
    assert jax.tree.map(jnp.shape, variables["params"]) == {
        "reduce": {"kernel": (6, 2), "bias": (2,)},
        "expand": {"kernel": (2, 6), "bias": (6,)},
    }
    p = variables["params"]

    def mlp(t):
        return (
            np.maximum(t @ p["reduce"]["kernel"] + p["reduce"]["bias"], 0) @ p["expand"]["kernel"] + p["expand"]["bias"]
        )

    np.testing.assert_allclose(Twice().apply(variables, z), mlp(z) + mlp(2 * z), rtol=1e-5, atol=1e-6)


def test_global_pools_formulas_and_gradients():
    x = random_images((2, 3, 5, 4))
    np.testing.assert_allclose(global_avg_pool(x), x.mean(axis=(1, 2), keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(global_max_pool(x), x.max(axis=(1, 2), keepdims=True))
    check_grads(global_avg_pool, (x,), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
    check_grads(global_max_pool, (x,), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


def test_spatial_softmax_normalises_each_image_and_channel_over_the_positions():
    scores = random_images((2, 3, 4, 5))
    e = np.exp(scores - scores.max(axis=(1, 2), keepdims=True))
    np.testing.assert_allclose(spatial_softmax(scores), e / e.sum(axis=(1, 2), keepdims=True), rtol=1e-5)


def test_attention_pool_formula_and_gradients():
    x = random_images((2, 3, 4, 5))
    logits = random_images((2, 3, 4, 1), seed=1)
    context, weights = attention_pool(x, logits)
    e = np.exp(logits - logits.max(axis=(1, 2), keepdims=True))
    expected_weights = e / e.sum(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-5)
    np.testing.assert_allclose(context, (expected_weights * x).sum(axis=(1, 2), keepdims=True), rtol=1e-5, atol=1e-6)
    check_grads(attention_pool, (x, logits), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("size", [1, 3, 7, 9])
def test_odd_size_passes_odd_sizes(size):
    assert odd_size(size, "kernel_size", "Block", "the paper uses 7") == size


@pytest.mark.parametrize("size", [0, -1, 2, 6])
def test_odd_size_names_the_block_the_option_and_the_note(size):
    with pytest.raises(
        InputError, match=rf"^Block: kernel_size must be a positive odd number \(the paper uses 7\), got {size}$"
    ):
        odd_size(size, "kernel_size", "Block", "the paper uses 7")


@pytest.mark.parametrize(
    "channels, max_heads, heads",
    [(64, 8, 8), (12, 8, 6), (13, 8, 1), (37, 4, 1), (3, 4, 3), (6, 4, 3), (1, 8, 1), (64, 4, 4), (18, 4, 3)],
)
def test_resolve_heads_without_a_count_takes_the_largest_divisor_up_to_max_heads(channels, max_heads, heads):
    assert resolve_heads(channels, None, max_heads, "Block") == heads


@pytest.mark.parametrize("channels, num_heads", [(64, 8), (64, 64), (12, 12), (12, 1), (15, 5)])
def test_resolve_heads_takes_a_count_that_divides_the_channels_exactly(channels, num_heads):
    assert resolve_heads(channels, num_heads, 4, "Block") == num_heads  # max_heads only bounds num_heads=None


@pytest.mark.parametrize(
    "channels, num_heads, max_heads, message",
    [
        (
            16,
            3,
            4,
            r"^Block: num_heads=3 does not divide the 16 input channels; choose num_heads from the divisors of "
            r"16: 1, 2, 4, 8, 16 \(or num_heads=None: the largest divisor up to max_heads=4\)$",
        ),
        (16, 0, 4, r"num_heads=0 does not divide the 16 input channels"),
        (720, 7, 8, r"divisors of 720: 1, 2, 3, 4, 5, 6, 8, 9, \.\.\. \(or num_heads=None"),
        (16, None, 0, r"^Block: max_heads must be >= 1, got 0"),
        (16, 4, 0, r"^Block: max_heads must be >= 1, got 0"),
    ],
)
def test_resolve_heads_errors_name_the_fix(channels, num_heads, max_heads, message):
    with pytest.raises(InputError, match=message):
        resolve_heads(channels, num_heads, max_heads, "Block")


def test_head_widths():
    assert head_widths(24, 4, None, "Block") == (6, 6)
    assert head_widths(24, 4, 10, "Block") == (10, 6)
    with pytest.raises(InputError, match=r"^Block: dim_head must be >= 1 or None, got 0$"):
        head_widths(24, 4, 0, "Block")


def test_rel_to_abs_is_the_offset_lookup_and_has_gradients():
    for q_len, k_len in [(5, 5), (1, 1), (3, 7), (4, 10), (2, 2)]:
        x = random_images((2, 3, q_len, q_len + k_len - 1), seed=q_len)
        i, j = np.arange(q_len)[:, None], np.arange(k_len)[None, :]
        np.testing.assert_array_equal(jax.jit(rel_to_abs, static_argnums=1)(x, k_len), x[..., i, j - i + q_len - 1])
    q, table = random_images((2, 4, 3), seed=1), random_images((7, 3), seed=2)
    logits = jax.jit(lambda q, t: relative_logits_1d(q, t, 4))
    check_grads(logits, (q, table), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
    with pytest.raises(InputError, match="need 9 offsets, got 8"):
        rel_to_abs(jnp.zeros((5, 8)), 5)


def test_relative_logits_2d_depend_on_offsets_only():
    """Moving a query and its key by the same amount keeps the relative logit, for the same query vector."""
    q = jnp.broadcast_to(jnp.asarray(random_images((1, 1, 1, 6))), (2, 4, 5, 6))
    logits = jax.jit(relative_logits_2d, static_argnums=3)(
        q, random_images((7, 6), seed=1), random_images((9, 6), seed=2), (4, 5)
    )
    chex.assert_shape(logits, (2, 4, 5, 4, 5))
    np.testing.assert_allclose(logits[:, 0, 0, 1, 2], logits[:, 2, 1, 3, 3], rtol=1e-6)
    assert not np.allclose(logits[:, 0, 0, 1, 2], logits[:, 0, 0, 2, 1])


def test_timm_divisible_width_rounds_as_timm_and_checks_its_options():
    # make_divisible(C * ratio * factor, divisor, round_limit): to the nearest multiple, at least the divisor
    assert timm_divisible_width(64, 0.25, None, 8, round_limit=0.9) == 16
    assert timm_divisible_width(64, 0.25, None, 8, round_limit=0.0, factor=2 / 3) == 8  # 10.7 -> 8
    assert timm_divisible_width(100, 0.1, None, 8, round_limit=0.9) == 16  # 10 -> 8 < 0.9 * 10: one more 8
    assert timm_divisible_width(100, 0.1, None, 8, round_limit=0.0) == 8
    assert timm_divisible_width(64, 0.25, 5, 8, round_limit=0.9) == 5
    for args, message in [
        ((0, None, 8), r"^rd_ratio must be > 0, got 0$"),
        ((0.25, 0, 8), r"^rd_channels must be >= 1 or None, got 0$"),
        ((0.25, None, 0), r"^rd_divisor must be >= 1, got 0$"),
    ]:
        with pytest.raises(InputError, match=message):
            timm_divisible_width(64, *args, round_limit=0.9)


def test_directional_pool_and_additive_strip_gate():
    x = random_images((2, 3, 5, 4))
    z_h, z_w = directional_pool(x)
    np.testing.assert_allclose(z_h, x.mean(axis=2, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(z_w, x.mean(axis=1, keepdims=True), rtol=1e-6)
    y, gate = additive_strip_gate(x, z_h, z_w, jax.nn.sigmoid)
    chex.assert_shape(gate, x.shape)
    np.testing.assert_allclose(gate, 1 / (1 + np.exp(-(np.asarray(z_h) + np.asarray(z_w)))), rtol=1e-6)
    np.testing.assert_allclose(y, x * gate, rtol=1e-6)
    gated = lambda x, h, w: additive_strip_gate(x, h, w, jax.nn.sigmoid)
    check_grads(gated, (x, z_h, z_w), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


NHWC = ("NHWC", "HWIO", "NHWC")


def grouped_conv(x, kernel, padding, strides=(1, 1)):
    """lax's depthwise conv of NHWC ``x`` with an HWIO (kh, kw, 1, C) ``kernel``."""
    return lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=NHWC, feature_group_count=x.shape[-1]
    )


@pytest.mark.parametrize(
    "shape, kernel, padding",
    [
        ((2, 7, 1, 5), (7, 1), ((3, 3), (0, 0))),  # ela's height strip
        ((2, 1, 9, 5), (1, 3), ((0, 0), (1, 1))),  # strip's width strip
        ((1, 1, 1, 3), (7, 1), ((3, 3), (0, 0))),  # a strip shorter than the kernel
        ((2, 6, 5, 4), (3, 3), ((1, 1), (1, 1))),  # any depthwise 'same' conv
        ((2, 6, 5, 4), (3, 3), ((2, 0), (0, 2))),  # lopsided padding that keeps the size
    ],
)
def test_depthwise_taps_is_the_grouped_conv_values_and_gradients(shape, kernel, padding):
    x = random_images(shape)
    rhs = random_images((*kernel, 1, shape[-1]), seed=1)

    def taps(x, kernel):
        return depthwise_taps(x, kernel, (1, 1), padding, dimension_numbers=NHWC, feature_group_count=shape[-1])

    taps = jax.jit(taps)
    np.testing.assert_allclose(taps(x, rhs), grouped_conv(x, rhs, padding), rtol=1e-5, atol=1e-6)
    check_grads(taps, (x, rhs), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


def test_depthwise_taps_passes_other_convs_to_lax():
    x, rhs = random_images((2, 6, 5, 4)), random_images((3, 3, 4, 2), seed=1)
    for padding in [((0, 0), (0, 0)), "SAME"]:  # not size-keeping explicit padding; a dense conv
        got = depthwise_taps(x, rhs, (1, 1), padding, dimension_numbers=NHWC)
        want = lax.conv_general_dilated(x, rhs, (1, 1), padding, dimension_numbers=NHWC)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    depthwise = random_images((3, 3, 1, 4), seed=2)
    strided = depthwise_taps(x, depthwise, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC, feature_group_count=4)
    want = grouped_conv(x, depthwise, ((1, 1), (1, 1)), strides=(2, 2))
    np.testing.assert_allclose(strided, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis, kernel", [(1, (5, 1, 1, 6)), (2, (1, 5, 1, 6))])
def test_strip_conv_is_a_depthwise_same_conv_along_one_axis(axis, kernel):
    strip = random_images((2, 4, 1, 6) if axis == 1 else (2, 1, 4, 6))
    conv = strip_conv(6, 5, axis, use_bias=True, dtype=None, name="conv")
    variables = conv.init(jax.random.key(0), strip)
    chex.assert_shape(variables["params"]["kernel"], kernel)
    padding = ((2, 2), (0, 0)) if axis == 1 else ((0, 0), (2, 2))
    want = grouped_conv(strip, variables["params"]["kernel"], padding) + variables["params"]["bias"]
    np.testing.assert_allclose(conv.apply(variables, strip), want, rtol=1e-5, atol=1e-6)
