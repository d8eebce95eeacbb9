"""ResNet-18/34: shapes, one attention block per residual block, its placement, sync batch norm.

Shape and parameter tests trace the real ResNet-18/34 with ``jax.eval_shape`` (no compute).
Tests that run numbers use a small ``ResNet`` (1-2 blocks per stage): the same module code,
compiled in seconds on CPU instead of half a minute.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import blocks, data, models
from attnjax.blocks import SeedAttention
from attnjax.models import CifarBasicBlock, CifarResNet, CifarResNet18, CifarResNet34
from attnjax.train import create_train_state, parallel, train_step
from attnjax.train.cli import parse_args

STAGES = {"cifar_resnet18": (2, 2, 2, 2), "cifar_resnet34": (3, 4, 6, 3)}


class Scale(nn.Module):
    """A parameter-free stand-in for an attention block: multiplies its input by ``factor``."""

    factor: float

    @nn.compact
    def __call__(self, x, train=False):
        self.sow("intermediates", "attention", jnp.full_like(x, self.factor))
        return x * self.factor


def init_shapes(net, image_shape):
    x = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    return jax.eval_shape(lambda x: net.init(jax.random.key(0), x), x), x


def residual_block_names(name):
    return [f"layer{stage}_{i}" for stage, size in enumerate(STAGES[name], start=1) for i in range(size)]


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["cifar_resnet18", "cifar_resnet34"])
@pytest.mark.parametrize(
    "image_shape, stem, stage_sizes",
    [
        ((8, 8, 1), "cifar", (8, 4, 2, 1)),
        ((32, 32, 3), "cifar", (32, 16, 8, 4)),
        ((28, 28, 1), "cifar", (28, 14, 7, 4)),
        ((32, 32, 3), "imagenet", (8, 4, 2, 1)),  # 7x7 stride 2, then max pool stride 2
        ((8, 8, 1), "imagenet", (2, 1, 1, 1)),
    ],
)
def test_logits_and_feature_map_shapes(name, image_shape, stem, stage_sizes):
    # The seed block's gate has the shape of its input, so the sown gates show every residual block's map.
    net = models.create(name, num_classes=7, block="seed", stem=stem)
    variables, x = init_shapes(net, image_shape)
    logits, state = jax.eval_shape(
        lambda v, x: net.apply(v, x, train=True, mutable=["intermediates", "batch_stats"]), variables, x
    )
    chex.assert_shape(logits, (2, 7))
    assert logits.dtype == jnp.float32
    params = variables["params"]
    kernel = (3, 3) if stem == "cifar" else (7, 7)
    chex.assert_shape(params["conv1"]["kernel"], (*kernel, image_shape[-1], 64))
    chex.assert_shape(params["fc"]["kernel"], (512, 7))
    sown = state["intermediates"]
    assert sorted(sown) == sorted(residual_block_names(name))
    for layer in residual_block_names(name):
        stage = int(layer[5])
        (gate,) = sown[layer]["block"]["attention"]
        size = stage_sizes[stage - 1]
        chex.assert_shape(gate, (2, size, size, 64 * 2 ** (stage - 1)))


@pytest.mark.parametrize("image_shape", [(8, 8, 1), (32, 32, 3), (28, 28, 1)])
@pytest.mark.parametrize("name", ["cifar_resnet18", "cifar_resnet34"])
def test_baseline_shapes_and_no_block_parameters(name, image_shape):
    variables, x = init_shapes(models.create(name, num_classes=10, block="none"), image_shape)
    logits = jax.eval_shape(lambda v, x: models.create(name, num_classes=10).apply(v, x), variables, x)
    chex.assert_shape(logits, (2, 10))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables["params"])]
    assert not any("block" in p for p in paths)
    assert sorted(k for k in variables["params"] if k.startswith("layer")) == sorted(residual_block_names(name))


@pytest.mark.parametrize("block", ["se", "cbam", "seed"])
@pytest.mark.parametrize("name", ["cifar_resnet18", "cifar_resnet34"])
def test_each_residual_block_has_its_own_attention_parameters(name, block):
    with_block, _ = init_shapes(models.create(name, num_classes=10, block=block), (8, 8, 1))
    without, _ = init_shapes(models.create(name, num_classes=10, block="none"), (8, 8, 1))
    params = with_block["params"]
    assert "block" not in params  # no copy shared by all residual blocks
    owners = [k for k in params if "block" in params[k]]
    assert sorted(owners) == sorted(residual_block_names(name))

    # One block's own parameter count at each residual block's width and map size (8x8 input).
    expected = 0
    for stage, size in enumerate(STAGES[name], start=1):
        side = 8 >> (stage - 1)
        x = jax.ShapeDtypeStruct((1, side, side, 64 * 2 ** (stage - 1)), jnp.float32)
        one = jax.eval_shape(lambda x: blocks.create(block).init(jax.random.key(0), x), x)
        expected += size * count(one["params"])
    assert count(params) - count(without["params"]) == expected > 0


def test_models_create_passes_the_block_and_options():
    net = models.create("cifar_resnet18", num_classes=10, block="cbam")
    assert isinstance(net, CifarResNet18) and net.block.func is blocks.CBAM  # a factory: one block per residual block
    assert net.stem == "cifar" and not net.zero_init_residual
    net = models.create("cifar_resnet34", num_classes=5, stem="imagenet", zero_init_residual=True)
    assert isinstance(net, CifarResNet34) and net.block is None and net.stem == "imagenet" and net.zero_init_residual
    assert {"cifar_resnet18", "cifar_resnet34"} <= set(models.names())
    config, _, _ = parse_args(["--model", "cifar_resnet34", "--block", "none", "--workdir", "unused"])
    assert config.model == "cifar_resnet34"


def jit_init(net, image_shape, batch=4):
    x = jax.random.normal(jax.random.key(1), (batch, *image_shape))
    return jax.jit(net.init)(jax.random.key(0), x), x


def test_zeroing_block_leaves_relu_of_the_shortcut():
    identity = CifarBasicBlock(16, block=Scale(0.0))
    variables, x = jit_init(identity, (4, 4, 16))
    np.testing.assert_array_equal(identity.apply(variables, x, train=True, mutable=["batch_stats"])[0], nn.relu(x))

    # With a projection shortcut the output is relu(bn(conv1x1(x))): the baseline with bn2 silenced.
    down = CifarBasicBlock(32, strides=2, block=Scale(0.0))
    variables, x = jit_init(down, (4, 4, 16))
    silenced = jax.tree_util.tree_map_with_path(
        lambda p, v: v * 0 if "bn2" in jax.tree_util.keystr(p) else v, variables["params"]
    )
    want = CifarBasicBlock(32, strides=2).apply({**variables, "params": silenced}, x, train=True, mutable=["batch_stats"])[0]
    got = down.apply(variables, x, train=True, mutable=["batch_stats"])[0]
    np.testing.assert_array_equal(got, want)
    assert np.all(got >= 0) and np.any(got > 0)


@pytest.mark.parametrize("factor", [0.0, 2.0])
def test_block_acts_after_the_second_batch_norm_and_before_the_residual_add(factor):
    # y = block(bn2(z)) = factor * bn2(z), so the attention ResNet equals the baseline with bn2's scale
    # and offset multiplied by factor. In training mode batch norm would undo a factor applied before
    # it, and a factor after the residual add or the ReLU would also scale the shortcut.
    net = CifarResNet(num_classes=10, block=Scale(factor), stage_sizes=(1, 2))
    variables, x = jit_init(net, (8, 8, 1), batch=8)
    keys = iter(jax.random.split(jax.random.key(2), 100))
    bn2 = {}

    def perturb(path, v):  # random bn2 scales and offsets, so that neither is trivially 1 or 0
        if "bn2" not in jax.tree_util.keystr(path):
            return v
        bn2[jax.tree_util.keystr(path)] = v = jax.random.uniform(next(keys), v.shape, minval=0.5, maxval=1.5)
        return v

    params = jax.tree_util.tree_map_with_path(perturb, variables["params"])
    scaled = jax.tree_util.tree_map_with_path(
        lambda p, v: v * factor if "bn2" in jax.tree_util.keystr(p) else v, params
    )
    assert len(bn2) == 2 * 3  # scale and bias in each of the three residual blocks

    apply = jax.jit(
        lambda n, p: n.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"])[0], static_argnums=0
    )
    got = apply(net, params)
    want = apply(CifarResNet(num_classes=10, stage_sizes=(1, 2)), scaled)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, apply(CifarResNet(num_classes=10, stage_sizes=(1, 2)), params), atol=1e-3)


def test_zero_init_residual_starts_each_residual_block_as_the_identity():
    variables, _ = jit_init(CifarResNet(stage_sizes=(2,), zero_init_residual=True), (8, 8, 1))
    for layer in ("layer1_0", "layer1_1"):
        np.testing.assert_array_equal(variables["params"][layer]["bn2"]["scale"], 0)
        np.testing.assert_array_equal(variables["params"][layer]["bn1"]["scale"], 1)
    np.testing.assert_array_equal(variables["params"]["bn1"]["scale"], 1)


def test_attention_resnet_trains_one_pmap_step_with_synchronised_batch_norm(devices):
    net = CifarResNet(num_classes=10, block=blocks.create("coord"), stage_sizes=(1, 1))
    state = jax.jit(create_train_state, static_argnums=(1, 2, 3))(jax.random.key(0), net, (8, 8, 1), 1e-3)
    # Batch norm in the stem, in both residual blocks, in the projection shortcut and inside each coord block.
    assert any("block" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.batch_stats))
    ds = data.load("digits")
    raw = ds.train.get_batch(np.arange(64))
    batch = {"image": data.augment.normalize(raw["image"], ds.mean, ds.std), "label": raw["label"]}

    p_step = parallel.pmap_step(train_step, devices)
    new, metrics = p_step(parallel.replicate(state, devices), parallel.shard(batch, len(devices)))
    single, single_metrics = jax.jit(train_step)(state, batch)

    assert np.isfinite(float(metrics["loss"]))
    np.testing.assert_allclose(metrics["loss"], single_metrics["loss"], rtol=1e-5)
    old = jax.tree.leaves(state.batch_stats)
    got = jax.tree.leaves(new.batch_stats)
    want = jax.tree.leaves(single.batch_stats)
    assert len(got) == len(want) == len(old) == 2 * 8  # mean and var of 8 batch norms
    # Every running variance moves. (The coord blocks' running means stay near 0: their input, bn2's
    # output, has zero batch mean per channel at initialisation.)
    variances = [
        k for k, (p, _) in enumerate(jax.tree_util.tree_leaves_with_path(state.batch_stats)) if "var" in str(p)
    ]
    assert len(variances) == 8 and all(not np.allclose(got[k], old[k]) for k in variances)
    for g, w in zip(got, want, strict=True):
        # Each device's copy: unsynchronised batch norm would leave a different one on each device.
        copies = [np.asarray(shard.data) for shard in g.addressable_shards]
        assert len(copies) == len(devices)
        for copy in copies:
            np.testing.assert_array_equal(copy, copies[0])
        np.testing.assert_allclose(copies[0], w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 8, 3), (4, 1, 8, 8, 3), (4, 64)])
def test_wrong_input_rank_is_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"CifarResNet18 expects images of shape \(batch, height, width, channels\)"):
        jax.eval_shape(lambda x: CifarResNet18().init(jax.random.key(0), x), jnp.zeros(shape))


def test_wrong_channel_count_for_a_trained_model_is_a_clear_error():
    net = CifarResNet34(block=SeedAttention())
    variables, _ = init_shapes(net, (8, 8, 1))
    with pytest.raises(ValueError, match=r"CifarResNet34 was built for 1-channel images but got 3 channels"):
        jax.eval_shape(net.apply, variables, jnp.zeros((2, 8, 8, 3)))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"stem": "tiny"}, r"unknown stem 'tiny'; valid stems: cifar, imagenet"),
        ({"stage_sizes": (1, 1, 1, 1, 1)}, r"stage_sizes must be 1 to 4 positive block counts"),
        ({"stage_sizes": (2, 0)}, r"stage_sizes must be 1 to 4 positive block counts"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        init_shapes(CifarResNet(**options), (8, 8, 1))
