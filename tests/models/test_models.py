"""AttentionNet: shapes at every input size, pooling to about the tutorial's fc1, bad input."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import blocks, models
from attnjax.blocks import SeedAttention, SoftmaxAttention
from attnjax.models import AttentionNet


@pytest.mark.parametrize(
    "image_shape, fc1_inputs",
    [
        ((8, 8, 3), 128 * 8 * 8),  # the tutorial's size: no pooling
        ((32, 32, 3), 128 * 8 * 8),  # 32 -> 16 -> 8
        ((28, 28, 1), 128 * 7 * 7),  # 28 -> 14 -> 7
        ((8, 8, 1), 128 * 8 * 8),
        ((7, 7, 3), 128 * 7 * 7),
        ((1, 1, 1), 128),
        ((64, 64, 3), 128 * 8 * 8),  # 64 -> 32 -> 16 -> 8
        ((10, 40, 3), 128 * 5 * 5),  # each axis pooled on its own
    ],
)
@pytest.mark.parametrize("block", [None, "seed", "softmax"])
def test_logits_shape_and_fc1_size(image_shape, fc1_inputs, block):
    net = models.create("attention_net", num_classes=7, block=block)
    x = jax.random.uniform(jax.random.key(0), (2, *image_shape))
    variables = net.init(jax.random.key(1), x)
    logits = net.apply(variables, x)
    chex.assert_shape(logits, (2, 7))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    chex.assert_shape(variables["params"]["fc1"]["kernel"], (fc1_inputs, 512))
    chex.assert_shape(variables["params"]["conv1"]["kernel"], (3, 3, image_shape[-1], 64))


def test_block_argument_places_the_block_between_the_convs():
    x = jnp.ones((1, 32, 32, 3))
    net = AttentionNet(block=SeedAttention())
    _, state = net.apply(net.init(jax.random.key(0), x), x, mutable=["intermediates"])
    gate = state["intermediates"]["block"]["attention"][0]
    chex.assert_shape(gate, (1, 16, 16, 64))  # after conv1 (64 channels) and the first pool
    assert "block" not in AttentionNet().init(jax.random.key(0), x)["params"]


def test_models_create_accepts_names_none_and_modules():
    assert models.create("attention_net", num_classes=10, block="none").block is None
    assert models.create("attention_net", num_classes=10).block is None
    # A name becomes a factory (the host builds the block at each site), as in Flax and timm.
    factory = models.create("attention_net", num_classes=10, block="softmax").block
    assert isinstance(factory, functools.partial) and factory.func is SoftmaxAttention
    module = SeedAttention(reduction=2)
    assert models.create("attention_net", num_classes=10, block=module).block is module


def test_unknown_model_and_block_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model 'resnet9'.*attention_net"):
        models.create("resnet9", num_classes=10)
    with pytest.raises(
        ValueError, match=r"unknown attention block 'se2'; valid names: none, axial, bam, .*, splat, strip, triplet$"
    ):
        models.create("attention_net", num_classes=10, block="se2")


@pytest.mark.parametrize("shape", [(8, 8, 3), (4, 1, 8, 8, 3), (4, 64)])
def test_wrong_input_rank_is_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"AttentionNet expects images of shape \(batch, height, width, channels\)"):
        AttentionNet().init(jax.random.key(0), jnp.zeros(shape))


def test_wrong_channel_count_for_a_trained_model_is_a_clear_error():
    net = AttentionNet(block=SeedAttention())
    variables = net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))  # trained on grayscale
    with pytest.raises(ValueError, match=r"built for 1-channel images but got 3 channels"):
        net.apply(variables, jnp.zeros((2, 8, 8, 3)))


@pytest.mark.parametrize(
    "shape, window", [((2, 8, 8, 3), (2, 2)), ((1, 9, 7, 4), (2, 2)), ((2, 10, 5, 2), (2, 1)), ((1, 3, 16, 1), (1, 2))]
)
def test_max_pool_2x2_equals_flax_max_pool(shape, window):
    from flax import linen as nn

    from attnjax.models.attention_net import max_pool_2x2

    x = jax.random.normal(jax.random.key(0), shape)
    expected = nn.max_pool(x, window, strides=window, padding="VALID")
    np.testing.assert_array_equal(max_pool_2x2(x, window), expected)


def test_block_options_reach_every_site_and_the_hosts_dtype_reaches_the_block():
    x = jnp.ones((2, 8, 8, 3))
    net = models.create("cifar_resnet18", num_classes=10, block="se", block_options={"reduction": 4})
    params = net.init(jax.random.key(0), x)["params"]
    hidden = {p["block"]["reduce"]["kernel"].shape[-1] for n, p in params.items() if n.startswith("layer")}
    assert hidden == {64 // 4, 128 // 4, 256 // 4, 512 // 4}  # one block per residual block, each with the option
    net = models.create("attention_net", num_classes=10, block="seed", dtype=jnp.bfloat16)
    variables = net.init(jax.random.key(0), x)
    built = []  # the dtype of each attention block the host builds (its sown maps are float32 in any dtype)

    def record(call, args, kwargs, context):
        if isinstance(context.module, SeedAttention) and context.method_name == "__call__":
            built.append(context.module.dtype)
        return call(*args, **kwargs)

    with nn.intercept_methods(record):
        net.apply(variables, x)
    assert built == [jnp.bfloat16]


def test_unknown_or_badly_typed_options_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"'cbam' has no option reduce; its options: reduction=16, kernel_size=7"):
        models.create("attention_net", num_classes=10, block="cbam", block_options={"reduce": 8})
    with pytest.raises(ValueError, match=r"model 'cifar_resnet18' has no option stems; its options: .*stem='cifar'"):
        models.create("cifar_resnet18", num_classes=10, stems="imagenet")
    with pytest.raises(ValueError, match=r"kernel_size: 'big' is not an integer"):
        blocks.parse_options("cbam", ["kernel_size=big"])
    with pytest.raises(ValueError, match=r"not key=value"):
        blocks.parse_options("cbam", ["reduction"])
