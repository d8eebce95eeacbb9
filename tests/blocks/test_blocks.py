"""The seed blocks (seed, softmax): shapes, numerics, gradients, sown maps; and the registry."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from attnjax import blocks
from attnjax.blocks import SeedAttention, SoftmaxAttention, sigmoid_gate, softmax_attention
from attnjax.validate import InputError

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


def test_pure_functions_have_correct_gradients():
    x = random_images((2, 3, 4, 5), seed=2)
    w = random_images((2, 3, 4, 5), seed=3)
    check_grads(sigmoid_gate, (x, w), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
    check_grads(softmax_attention, (x, w), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


def test_seed_block_bottleneck_width_follows_reduction():
    x = random_images((1, 4, 4, 64))
    variables = SeedAttention(reduction=4).init(jax.random.key(0), x)
    chex.assert_shape(variables["params"]["reduce"]["kernel"], (1, 1, 64, 16))
    chex.assert_shape(variables["params"]["expand"]["kernel"], (1, 1, 16, 64))


# Every registered name and the class it builds.
CLASSES = {
    "axial": blocks.AxialAttention,
    "bam": blocks.BAM,
    "bat": blocks.BilinearAttentionalTransform,
    "bottleneck": blocks.BottleneckAttention,
    "cbam": blocks.CBAM,
    "ceca": blocks.CircularEfficientChannelAttention,
    "coord": blocks.CoordinateAttention,
    "criss_cross": blocks.CrissCrossAttention,
    "danet": blocks.DualAttention,
    "eca": blocks.EfficientChannelAttention,
    "ecam": blocks.EfficientChannelAttentionMLP,
    "ela": blocks.EfficientLocalAttention,
    "ese": blocks.EffectiveSqueezeExcitation,
    "external": blocks.ExternalAttention,
    "gc": blocks.GlobalContext,
    "gca": blocks.GlobalContextGate,
    "ge": blocks.GatherExcite,
    "halo": blocks.HaloAttention,
    "lambda": blocks.LambdaLayer,
    "lcbam": blocks.LightCBAM,
    "mhsa": blocks.MultiHeadSelfAttention,
    "nonlocal": blocks.NonLocalAttention,
    "psa": blocks.PolarizedSelfAttention,
    "scoord": blocks.SimpleCoordinateAttention,
    "se": blocks.SqueezeExcitation,
    "seed": SeedAttention,
    "shuffle": blocks.ShuffleAttention,
    "simam": blocks.SimAMAttention,
    "sk": blocks.SelectiveKernelAttention,
    "softmax": SoftmaxAttention,
    "splat": blocks.SplitAttention,
    "strip": blocks.StripAttention,
    "triplet": blocks.TripletAttention,
}


def test_registry_lists_and_creates_blocks():
    catalogue = {"se", "eca", "cbam", "bam", "gc", "nonlocal", "coord", "simam", "sk", "triplet", "mhsa"}
    timm = {"ese", "ecam", "ceca", "ge", "gca", "lcbam", "splat", "lambda", "bottleneck", "halo"}
    timm |= {"scoord", "ela", "strip", "bat"}
    external_attention = {"external", "psa", "shuffle", "danet", "criss_cross", "axial"}
    assert set(blocks.names()) == catalogue | timm | external_attention | {"seed", "softmax"} == set(CLASSES)
    assert blocks.names() == sorted(blocks.names())
    for name, cls in CLASSES.items():
        assert type(blocks.create(name)) is cls, name
    assert isinstance(blocks.create("seed", reduction=4), SeedAttention)
    assert blocks.create("seed", reduction=4).reduction == 4
    assert blocks.create("mhsa", num_heads=2).num_heads == 2


def test_create_checks_the_options_as_factory_does():
    message = r"^attention block 'cbam' has no option reductio; its options: reduction=16, kernel_size=7$"
    with pytest.raises(InputError, match=message):
        blocks.create("cbam", reductio=8)
    with pytest.raises(InputError, match=message):
        blocks.factory("cbam", reductio=8)
    with pytest.raises(InputError, match=r"'softmax' has no option reduction, scale; its options: none$"):
        blocks.create("softmax", scale=2, reduction=4)
    # the fields a host sets per site are not options, but a module built directly may take them
    block = blocks.create("cbam", reduction=8, name="attention", dtype=jnp.bfloat16)
    assert (block.reduction, block.name, block.dtype) == (8, "attention", jnp.bfloat16)


def test_unknown_block_name_lists_valid_names():
    with pytest.raises(
        ValueError,
        match=r"unknown attention block 'sse'; valid names: axial, bam, .*, splat, strip, triplet",
    ):
        blocks.create("sse")


@pytest.mark.parametrize("name", ["seed", "softmax"])
def test_blocks_take_the_train_flag(name):
    x = random_images((2, 6, 6, 16))
    block = blocks.create(name)
    variables = block.init(jax.random.key(0), x)
    np.testing.assert_allclose(block.apply(variables, x, train=True), block.apply(variables, x, train=False))
