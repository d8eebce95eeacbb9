"""The primitives several blocks share (attnjax.blocks.primitives): formulas, gradients and their checks."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from attnjax.blocks.primitives import (
    attention_pool,
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
