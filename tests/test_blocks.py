"""The seed blocks: shapes, numerics, gradients, sown maps, the registry and bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from attnjax import blocks
from attnjax.blocks import SeedAttention, SoftmaxAttention, reduced_channels, sigmoid_gate, softmax_attention

SHAPES = [(2, 8, 8, 64), (1, 7, 7, 3), (3, 1, 1, 16), (2, 5, 9, 12), (1, 28, 28, 1)]


def init_apply(module, x, seed=0):
    variables = module.init(jax.random.key(seed), x)
    y, state = module.apply(variables, x, mutable=["intermediates"])
    return variables, y, state["intermediates"]["attention"][0]


def random_images(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["seed", "softmax"])
def test_block_keeps_shape_and_dtype(name, shape):
    x = random_images(shape)
    _, y, attention = init_apply(blocks.create(name), x)
    chex.assert_shape(y, shape)
    chex.assert_shape(attention, shape)
    chex.assert_type(y, jnp.float32)
    chex.assert_tree_all_finite((y, attention))


@pytest.mark.parametrize("shape", SHAPES)
def test_seed_gate_is_in_open_unit_interval_and_scales_input(shape):
    x = random_images(shape)
    _, y, gate = init_apply(SeedAttention(), x)
    assert jnp.all(gate > 0) and jnp.all(gate < 1)
    np.testing.assert_allclose(y, x * gate, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_map_sums_to_one_per_channel_and_output_is_input_plus_values(shape):
    x = random_images(shape, seed=1)
    _, y, values = init_apply(SoftmaxAttention(), x)
    assert jnp.all(values >= 0)
    np.testing.assert_allclose(values.sum(axis=(1, 2)), np.ones((shape[0], shape[3])), rtol=1e-5)
    np.testing.assert_allclose(y, x + values, rtol=1e-6, atol=1e-6)


def test_softmax_attention_normalises_over_positions_not_channels():
    scores_x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5) / 50.0
    out, values = softmax_attention(scores_x, jnp.ones_like(scores_x))
    expected = np.exp(scores_x) / np.exp(scores_x).sum(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    np.testing.assert_allclose(out, scores_x + expected, rtol=1e-5)


def test_sigmoid_gate_formula():
    x = jnp.array([[-2.0, 0.5, 3.0]])
    logits = jnp.array([[0.0, 2.0, -1.0]])
    y, gate = sigmoid_gate(x, logits)
    np.testing.assert_allclose(gate, 1 / (1 + np.exp(-np.asarray(logits))), rtol=1e-6)
    np.testing.assert_allclose(y, np.asarray(x) * gate, rtol=1e-6)


def test_pure_functions_have_correct_gradients():
    x = random_images((2, 3, 4, 5), seed=2)
    w = random_images((2, 3, 4, 5), seed=3)
    check_grads(sigmoid_gate, (x, w), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
    check_grads(softmax_attention, (x, w), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "channels, reduction, expected",
    [(64, 8, 8), (512, 8, 64), (3, 8, 3), (1, 8, 1), (16, 8, 8), (100, 8, 12), (12, 8, 8)],
)
def test_reduced_channels_has_a_sane_minimum(channels, reduction, expected):
    assert reduced_channels(channels, reduction) == expected


def test_seed_block_bottleneck_width_follows_reduction():
    x = random_images((1, 4, 4, 64))
    variables = SeedAttention(reduction=4).init(jax.random.key(0), x)
    chex.assert_shape(variables["params"]["reduce"]["kernel"], (1, 1, 64, 16))
    chex.assert_shape(variables["params"]["expand"]["kernel"], (1, 1, 16, 64))


def test_registry_lists_and_creates_blocks():
    catalogue = {"se", "eca", "cbam", "bam", "gc", "nonlocal", "coord", "simam", "sk", "triplet", "mhsa"}
    timm = {"ese", "ecam", "ceca", "ge", "gca", "lcbam", "splat", "lambda", "bottleneck", "halo"}
    external_attention = {"external", "psa", "shuffle", "danet", "criss_cross", "axial"}
    assert set(blocks.names()) == catalogue | timm | external_attention | {"seed", "softmax"}
    assert blocks.names() == sorted(blocks.names())
    assert isinstance(blocks.create("seed", reduction=4), SeedAttention)
    assert blocks.create("seed", reduction=4).reduction == 4
    assert isinstance(blocks.create("softmax"), SoftmaxAttention)


def test_unknown_block_name_lists_valid_names():
    with pytest.raises(
        ValueError,
        match=r"unknown attention block 'sse'; valid names: axial, bam, .*, splat, triplet",
    ):
        blocks.create("sse")


@pytest.mark.parametrize("shape", [(8, 8, 3), (2, 64), (1, 2, 8, 8, 3)])
@pytest.mark.parametrize("name", ["seed", "softmax"])
def test_wrong_rank_names_the_expected_layout(name, shape):
    with pytest.raises(ValueError, match=r"NHWC, rank 4.*got shape"):
        blocks.create(name).init(jax.random.key(0), jnp.zeros(shape))


def test_zero_reduction_is_rejected():
    with pytest.raises(ValueError, match="reduction must be >= 1"):
        SeedAttention(reduction=0).init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))


@pytest.mark.parametrize("name", ["seed", "softmax"])
def test_blocks_take_the_train_flag(name):
    x = random_images((2, 6, 6, 16))
    block = blocks.create(name)
    variables = block.init(jax.random.key(0), x)
    np.testing.assert_allclose(block.apply(variables, x, train=True), block.apply(variables, x, train=False))
