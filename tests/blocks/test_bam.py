"""BAM: outputs, maps and batch-norm statistics against a PyTorch BAM written from the paper (eval and train
mode), and its properties.

Train mode is compared in float64. Batch norm over a small batch divides by the batch's standard
deviation, which for a channel whose few values nearly coincide is tiny (e.g. two images whose channel
means differ by 0.008): float32 rounding differences between any two correct implementations are then
amplified far beyond 1e-5. Float64 removes that rounding noise, so what is compared is the math.
"""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import TOL, check_forward, check_running_stats, random_maps, setup
from jax.test_util import check_grads
from torch import nn
from torch_reference import random_images, torch_state_with_stats

from attnjax import blocks
from attnjax.blocks.bam import BAM, bam_attention
from attnjax.compare.pytorch import nhwc_to_nchw
from attnjax.layers import flax_running_var

pytestmark = pytest.mark.torch
PROPERTY_SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 3, 4, 20)]
PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (2, 1, 1, 12), (4, 3, 10, 48)]


class TorchBAM(nn.Module):
    """Park et al. 2018, NCHW, with attnjax's documented choices (hidden BN + ReLU, final BNs, sum fusion).

    Mc = BN(FC(relu(BN(FC(AvgPool(x)))))), Ms = BN(conv1x1(g(g(g0(x))))) with g0 = relu(BN(conv1x1)) and
    g = relu(BN(conv3x3, dilation 4)); M = sigmoid(Mc + Ms); y = x + x * M. Returns (y, Mc, Ms, M).
    """

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4):
        super().__init__()
        hidden = max(channels // reduction, min(channels, 8))
        self.channel_reduce = nn.Linear(channels, hidden)
        self.channel_reduce_bn = nn.BatchNorm1d(hidden)
        self.channel_expand = nn.Linear(hidden, channels)
        self.channel_bn = nn.BatchNorm1d(channels)
        self.spatial_reduce = nn.Conv2d(channels, hidden, 1)
        self.spatial_reduce_bn = nn.BatchNorm2d(hidden)
        self.spatial_dilated_0 = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation)
        self.spatial_dilated_0_bn = nn.BatchNorm2d(hidden)
        self.spatial_dilated_1 = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation)
        self.spatial_dilated_1_bn = nn.BatchNorm2d(hidden)
        self.spatial_final = nn.Conv2d(hidden, 1, 1)
        self.spatial_bn = nn.BatchNorm2d(1)

    def forward(self, x):
        mc = F.relu(self.channel_reduce_bn(self.channel_reduce(x.mean(dim=(2, 3)))))
        mc = self.channel_bn(self.channel_expand(mc))[:, :, None, None]
        ms = F.relu(self.spatial_reduce_bn(self.spatial_reduce(x)))
        ms = F.relu(self.spatial_dilated_0_bn(self.spatial_dilated_0(ms)))
        ms = F.relu(self.spatial_dilated_1_bn(self.spatial_dilated_1(ms)))
        ms = self.spatial_bn(self.spatial_final(ms))
        m = torch.sigmoid(mc + ms)
        return x + x * m, mc, ms, m


MAPS = ["channel", "spatial", "attention"]


def setup_bam(shape, seed=0):
    block = BAM()
    return block, *setup(block, TorchBAM(shape[-1]), shape, seed)


def counts(shape):
    """The values per channel each BN averages: the channel branch sees (N, 1, 1, C) maps."""
    n, h, w, _ = shape
    return lambda name: n if name.startswith("channel") else n * h * w


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_eval_mode_matches_pytorch_with_running_statistics(shape):
    check_forward(*setup_bam(shape), maps=MAPS)


@pytest.mark.parametrize("shape", PARITY_SHAPES[1:])
def test_train_mode_matches_pytorch_and_updates_the_same_running_statistics(shape):
    block, x, variables, reference = setup_bam(shape, seed=5)
    _, state = check_forward(block, x, variables, reference, maps=MAPS, train=True, float64=True)
    check_running_stats(state, reference, old=variables["batch_stats"], counts=counts(shape))


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_gate_and_sown_maps(shape):
    x, y, maps = random_maps(blocks.create("bam"), shape)
    assert sorted(maps) == ["attention", "channel", "spatial"]
    channel, spatial, gate = maps["channel"], maps["spatial"], maps["attention"]
    n, h, w, c = shape
    chex.assert_shape(y, shape)
    chex.assert_shape(channel, (n, 1, 1, c))
    chex.assert_shape(spatial, (n, h, w, 1))
    chex.assert_shape(gate, shape)
    chex.assert_tree_all_finite((y, channel, spatial, gate))
    assert jnp.all(gate > 0) and jnp.all(gate < 1)
    np.testing.assert_allclose(gate, jax.nn.sigmoid(channel + spatial), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, x + x * gate, rtol=1e-5, atol=1e-6)


def test_init_shapes_and_finite_output():
    x = random_images((2, 3, 3, 20))
    block = BAM()
    variables = jax.jit(block.init)(jax.random.key(0), x)
    params = variables["params"]
    chex.assert_shape(params["channel_reduce"]["kernel"], (20, 8))
    chex.assert_shape(params["spatial_dilated_0"]["kernel"], (3, 3, 8, 8))
    chex.assert_shape(params["spatial_final"]["kernel"], (1, 1, 8, 1))
    assert set(variables["batch_stats"]) == {k for k in params if k.endswith("bn")}
    y_train, _ = jax.jit(partial(block.apply, train=True, mutable=["batch_stats"]))(variables, x)
    chex.assert_tree_all_finite((variables, y_train))


def test_bam_attention_formula_and_gradients():
    x = random_images((2, 3, 4, 5))
    channel = random_images((2, 1, 1, 5), seed=1)
    spatial = random_images((2, 3, 4, 1), seed=2)
    y, gate = bam_attention(x, channel, spatial)
    expected = 1 / (1 + np.exp(-(channel + spatial)))
    np.testing.assert_allclose(gate, expected, rtol=1e-6)
    np.testing.assert_allclose(y, x * (1 + expected), rtol=1e-5)
    check_grads(bam_attention, (x, channel, spatial), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


def test_running_variances_trained_a_step_in_each_framework_agree_after_the_correction():
    """Flax's BNs keep the biased batch variance, PyTorch's the unbiased one: n/(n-1), 2x on the channel branch here.

    ``torch_state_with_stats(..., running_var_count=, steps=)`` converts Flax's to what PyTorch's training stores.
    """
    shape = (2, 6, 5, 16)
    block, x, variables, reference = setup_bam(shape, seed=7)
    fresh = jax.tree.map(
        lambda s: {"mean": np.zeros_like(s["mean"]), "var": np.ones_like(s["var"])},
        variables["batch_stats"],
        is_leaf=lambda s: "var" in s,
    )
    variables = {**variables, "batch_stats": fresh}  # both frameworks start from a fresh BN's statistics
    reference.load_state_dict(torch_state_with_stats(variables), strict=True)
    x, variables = jax.tree.map(lambda a: a.astype(np.float64), (x, variables))
    with jax.enable_x64(True):
        _, state = jax.jit(partial(block.apply, train=True, mutable=["batch_stats"]))(variables, x)
    with torch.no_grad():
        reference.double().train()(nhwc_to_nchw(x))

    count = counts(shape)
    trained = {**variables, "batch_stats": state["batch_stats"]}
    want = reference.state_dict()
    plain = torch_state_with_stats(trained)
    corrected = torch_state_with_stats(trained, running_var_count=count, steps=1)
    for name in state["batch_stats"]:
        key = f"{name}.running_var"
        np.testing.assert_allclose(corrected[key], want[key], rtol=TOL, atol=TOL)
        assert not np.allclose(plain[key], want[key], rtol=TOL, atol=TOL)  # the uncorrected copy differs
        assert int(corrected[f"{name}.num_batches_tracked"]) == int(want[f"{name}.num_batches_tracked"]) == 1
        back = flax_running_var(want[key].numpy(), count(name), steps=1)
        np.testing.assert_allclose(back, state["batch_stats"][name]["var"], rtol=TOL, atol=TOL)
