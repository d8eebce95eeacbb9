"""Splat (ResNeSt split attention): PyTorch parity in eval and train mode, gradients, radix weights, widths."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import (
    apply_jit,
    assert_train_mode_uses_batch_statistics,
    check_forward,
    check_gradients,
    check_running_stats,
    load,
    sown_maps,
)
from torch import nn
from torch_reference import random_images, random_variables

from attnjax.blocks.splat import SplitAttention, radix_softmax, splat_widths, split_attention

pytestmark = pytest.mark.torch


class TorchSplat(nn.Module):
    """Zhang et al. 2020, split attention as an in-place block, NCHW.

    u = relu(BN(grouped conv3x3 C -> R*C)); the R splits are u's channel chunks [r*C, (r+1)*C);
    s = GAP(sum of the splits); z = relu(BN(fc1 s)); logits = fc2 z, laid out (K, R, C/K);
    a = softmax over R (sigmoid for R = 1); y = sum_r a_r U_r. Returns (y, a) with a of shape (N, R, C).
    """

    def __init__(self, channels, radix, cardinality, conv_groups, hidden):
        super().__init__()
        self.radix, self.cardinality = radix, cardinality
        self.conv = nn.Conv2d(channels, radix * channels, 3, padding=1, groups=conv_groups, bias=False)
        self.bn0 = nn.BatchNorm2d(radix * channels)
        self.fc1 = nn.Conv2d(channels, hidden, 1, groups=cardinality, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, radix * channels, 1, groups=cardinality)

    def forward(self, x):
        n, c, h, w = x.shape
        splits = F.relu(self.bn0(self.conv(x))).reshape(n, self.radix, c, h, w)
        s = splits.sum(dim=1).mean(dim=(2, 3), keepdim=True)
        logits = self.fc2(F.relu(self.bn1(self.fc1(s)))).reshape(n, self.cardinality, self.radix, c // self.cardinality)
        a = torch.softmax(logits, dim=2) if self.radix > 1 else torch.sigmoid(logits)
        a = a.permute(0, 2, 1, 3).reshape(n, self.radix, c)
        return (a[:, :, :, None, None] * splits).sum(dim=1), a


def paper_widths(channels, radix=2, cardinality=1):
    """K: the largest divisor of C up to the asked cardinality; conv groups gcd(C, R*K) (R*K when it divides C);
    hidden max(R*C // 4, 32) capped at R*C, rounded up to a multiple of K."""
    k = max(g for g in range(1, cardinality + 1) if channels % g == 0)
    hidden = max(radix * channels // 4, min(radix * channels, 32))
    return k, math.gcd(channels, radix * k), math.ceil(hidden / k) * k


def init(block, x, seed=0):
    return random_variables(block, x, seed, scale_range=(0.5, 2.0))


def reference_for(variables, shape, radix=2, cardinality=1):
    channels = shape[-1]
    k, groups, hidden = paper_widths(channels, radix, cardinality)
    return load(TorchSplat(channels, radix, k, groups, hidden), variables)


def radix_weights(weights):
    """The reference's (N, R, C) weights in the block's layout (N, 1, 1, C, R)."""
    return weights.numpy().transpose(0, 2, 1)[:, None, None]


# (shape, radix, cardinality): the default R = 2, K = 1 on even and odd C (13, 37: a dense conv), and
# other radixes and cardinalities, including ones that adapt (K = 3 on C = 20 -> 2) and G != R*K (18, R=4, K=3 -> 6).
CASES = [
    ((2, 8, 8, 64), 2, 1),
    ((1, 7, 7, 13), 2, 1),
    ((2, 5, 9, 37), 2, 1),
    ((3, 1, 1, 3), 2, 1),
    ((2, 4, 6, 24), 1, 1),
    ((2, 5, 5, 24), 3, 4),
    ((2, 4, 4, 20), 2, 3),
    ((2, 3, 5, 18), 4, 3),
]


@pytest.mark.parametrize("shape, radix, cardinality", CASES)
def test_matches_pytorch_in_eval_mode_with_running_statistics(shape, radix, cardinality):
    x = random_images(shape, seed=2)
    block = SplitAttention(radix=radix, cardinality=cardinality)
    variables = init(block, x)
    reference = reference_for(variables, shape, radix, cardinality)
    check_forward(block, x, variables, reference, maps=[("attention", radix_weights)])


@pytest.mark.parametrize("shape, radix, cardinality", [CASES[0], CASES[2], ((2, 1, 1, 3), 2, 1), CASES[7]])
def test_matches_pytorch_in_train_mode_with_batch_statistics(shape, radix, cardinality):
    """In float64, so that the comparison is of the math, not of float32 rounding in batch statistics."""
    x = random_images(shape, seed=3)
    block = SplitAttention(radix=radix, cardinality=cardinality)
    variables = init(block, x)
    reference = reference_for(variables, shape, radix, cardinality)
    maps = [("attention", radix_weights)]
    _, state = check_forward(block, x, variables, reference, maps=maps, train=True, float64=True)
    # Running means move the same way (Flax's momentum 0.9 = PyTorch's 0.1); PyTorch's running variance is unbiased.
    check_running_stats(state, reference)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape, radix, cardinality", [((2, 5, 7, 13), 2, 1), ((2, 4, 3, 24), 3, 4)])
def test_gradients_match_pytorch(shape, radix, cardinality, train):
    """Gradients of sum(y * r) with respect to the input and every parameter, against torch's autograd (float64)."""
    x = random_images(shape, seed=5)
    block = SplitAttention(radix=radix, cardinality=cardinality)
    variables = init(block, x, seed=7)
    reference = reference_for(variables, shape, radix, cardinality)
    check_gradients(block, x, variables, reference, random_images(shape, seed=6), train=train, float64=True)


@pytest.mark.parametrize("shape", [(2, 7, 7, 13), (2, 1, 1, 3), (3, 5, 9, 37)])
def test_default_block_keeps_the_shape_and_radix_weights_sum_to_one(shape):
    x = random_images(shape, seed=4)
    block = SplitAttention()
    variables = init(block, x)
    for train in (False, True):
        y, state = apply_jit(block, variables, x, train)
        weights = sown_maps(state)["attention"]
        chex.assert_shape(y, shape)
        chex.assert_shape(weights, (shape[0], 1, 1, shape[-1], 2))
        chex.assert_tree_all_finite((y, weights))
        assert jnp.all(weights >= 0)
        np.testing.assert_allclose(weights.sum(axis=-1), np.ones((shape[0], 1, 1, shape[-1])), rtol=1e-5)


def test_radix_one_is_a_sigmoid_gate():
    x = random_images((2, 4, 4, 16), seed=8)
    block = SplitAttention(radix=1)
    _, state = apply_jit(block, init(block, x), x)
    weights = sown_maps(state)["attention"]
    chex.assert_shape(weights, (2, 1, 1, 16, 1))
    assert jnp.all((weights > 0) & (weights < 1))


@pytest.mark.parametrize(
    "channels, radix, cardinality, expected",
    [
        (64, 2, 1, (1, 2, 32)),  # the paper's ResNeSt-50 first stage: hidden max(128 // 4, 32) = 32
        (256, 2, 1, (1, 2, 128)),
        (128, 2, 2, (2, 4, 64)),
        (13, 2, 1, (1, 1, 26)),  # odd C: a dense conv; hidden capped at R*C = 26
        (3, 2, 1, (1, 1, 6)),
        (37, 2, 1, (1, 1, 32)),
        (20, 2, 3, (2, 4, 32)),  # K = 3 does not divide 20: 2
        (18, 4, 3, (3, 6, 33)),  # G = gcd(18, 12) = 6; hidden 32 rounded up to a multiple of 3
        (16, 1, 1, (1, 1, 16)),
    ],
)
def test_widths(channels, radix, cardinality, expected):
    assert splat_widths(channels, radix, cardinality) == expected
    assert paper_widths(channels, radix, cardinality) == expected


@pytest.mark.parametrize("channels, radix, cardinality", [(64, 2, 1), (13, 2, 1), (24, 3, 4), (18, 4, 3)])
def test_parameter_shapes_follow_the_widths(channels, radix, cardinality):
    block = SplitAttention(radix=radix, cardinality=cardinality)
    variables = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 3, 3, channels)))
    params = variables["params"]
    k, groups, hidden = paper_widths(channels, radix, cardinality)
    chex.assert_shape(params["conv"]["kernel"], (3, 3, channels // groups, radix * channels))
    chex.assert_shape(params["fc1"]["kernel"], (1, 1, channels // k, hidden))
    chex.assert_shape(params["fc2"]["kernel"], (1, 1, hidden // k, radix * channels))
    chex.assert_shape(params["fc2"]["bias"], (radix * channels,))
    assert set(params) == {"conv", "bn0", "fc1", "bn1", "fc2"} and "bias" not in params["fc1"]
    chex.assert_shape(variables["batch_stats"]["bn0"]["mean"], (radix * channels,))
    chex.assert_shape(variables["batch_stats"]["bn1"]["mean"], (hidden,))


def test_radix_softmax_layout_and_split_attention():
    """Logit k*R*C/K + r*C/K + j is split r's for channel k*C/K + j; the weights sum to 1 over r."""
    radix, cardinality, per_group = 3, 2, 4
    logits = random_images((2, radix * cardinality * per_group), seed=9)
    weights = radix_softmax(jnp.asarray(logits), radix, cardinality)
    chex.assert_shape(weights, (2, cardinality * per_group, radix))
    g = logits.reshape(2, cardinality, radix, per_group)
    e = np.exp(g - g.max(axis=2, keepdims=True))
    expected = (e / e.sum(axis=2, keepdims=True)).transpose(0, 1, 3, 2).reshape(2, -1, radix)
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        radix_softmax(jnp.asarray(logits), 1, 4), 1 / (1 + np.exp(-logits))[..., None], rtol=1e-5
    )
    splits = random_images((2, 3, 3, 8, radix), seed=10)
    y = split_attention(jnp.asarray(splits), weights[:, None, None])
    np.testing.assert_allclose(y, (splits * np.asarray(weights)[:, None, None]).sum(-1), rtol=1e-5, atol=1e-6)


def test_flax_init_and_train_mode_uses_batch_statistics_and_updates_running_averages():
    assert_train_mode_uses_batch_statistics(SplitAttention(), random_images((2, 4, 4, 20), seed=11), "bn0")
