"""CoordinateAttention: output, maps and batch-norm statistics against a PyTorch coordinate attention written
from the paper (eval and train mode), and its properties.

Train mode is compared in float64, for the reason given in test_bam.py: batch norm over few values
amplifies float32 rounding differences between any two correct implementations beyond 1e-5.
"""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import assert_gated, check_forward, check_running_stats, random_maps, setup
from jax.test_util import check_grads
from torch import nn
from torch_reference import random_images

from attnjax import blocks
from attnjax.blocks.coord import (
    CoordinateAttention,
    coordinate_gate,
    directional_pool,
    h_swish,
    split_directions,
    stack_directions,
)

pytestmark = pytest.mark.torch
PROPERTY_SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 3, 4, 20)]
PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (1, 1, 1, 12), (2, 3, 10, 320)]  # mip = 8, 8, 8, 10


class TorchCoordinateAttention(nn.Module):
    """Hou et al. 2021, NCHW: pool along W and along H, shared 1x1 conv + BN + h_swish on both, a 1x1 conv and
    a sigmoid per direction; y = x * a_h * a_w. mip = max(8, C // 32). Returns (y, a_h, a_w)."""

    def __init__(self, channels: int, reduction: int = 32):
        super().__init__()
        mip = max(8, channels // reduction)
        self.reduce = nn.Conv2d(channels, mip, 1)
        self.bn = nn.BatchNorm2d(mip)
        self.expand_h = nn.Conv2d(mip, channels, 1)
        self.expand_w = nn.Conv2d(mip, channels, 1)

    def forward(self, x):
        h, w = x.shape[2:]
        z_h = x.mean(dim=3, keepdim=True)  # (N, C, H, 1)
        z_w = x.mean(dim=2, keepdim=True).transpose(2, 3)  # (N, C, W, 1)
        f = F.hardswish(self.bn(self.reduce(torch.cat([z_h, z_w], dim=2))))
        f_h, f_w = torch.split(f, [h, w], dim=2)
        a_h = torch.sigmoid(self.expand_h(f_h))  # (N, C, H, 1)
        a_w = torch.sigmoid(self.expand_w(f_w.transpose(2, 3)))  # (N, C, 1, W)
        return x * a_h * a_w, a_h, a_w


def setup_coord(shape, seed=0):
    block = CoordinateAttention()
    return block, *setup(block, TorchCoordinateAttention(shape[-1]), shape, seed)


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_eval_mode_matches_pytorch_with_running_statistics(shape):
    check_forward(*setup_coord(shape), maps=["height", "width"])


@pytest.mark.parametrize("shape", PARITY_SHAPES[1:])
def test_train_mode_matches_pytorch_and_updates_the_same_running_statistics(shape):
    block, x, variables, reference = setup_coord(shape, seed=5)
    _, state = check_forward(block, x, variables, reference, maps=["height", "width"], train=True, float64=True)
    n, h, w, _ = shape
    # the BN sees the H + W pooled positions of every image
    check_running_stats(state, reference, old=variables["batch_stats"], counts=lambda name: n * (h + w))


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_gates_and_sown_maps(shape):
    x, y, maps = random_maps(blocks.create("coord"), shape)
    assert sorted(maps) == ["height", "width"]
    n, h, w, c = shape
    chex.assert_shape(maps["height"], (n, h, 1, c))
    chex.assert_shape(maps["width"], (n, 1, w, c))
    assert_gated(y, x, maps["height"], maps["width"], rtol=1e-5)


@pytest.mark.parametrize("channels, mip", [(3, 3), (8, 8), (20, 8), (256, 8), (320, 10), (1024, 32)])
def test_mip_width(channels, mip):
    variables = jax.eval_shape(CoordinateAttention().init, jax.random.key(0), jnp.zeros((1, 2, 3, channels)))
    chex.assert_shape(variables["params"]["reduce"]["kernel"], (1, 1, channels, mip))
    chex.assert_shape(variables["batch_stats"]["bn"]["mean"], (mip,))


def test_init_gives_finite_output_in_both_modes():
    x = random_images((2, 3, 5, 20))
    block = CoordinateAttention()
    variables = jax.jit(block.init)(jax.random.key(0), x)
    y_train, _ = jax.jit(partial(block.apply, train=True, mutable=["batch_stats"]))(variables, x)
    chex.assert_tree_all_finite((variables, y_train))


def test_direction_helpers_round_trip():
    x = random_images((2, 3, 5, 4))
    z_h, z_w = directional_pool(x)
    np.testing.assert_allclose(z_h, x.mean(axis=2, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(z_w, x.mean(axis=1, keepdims=True), rtol=1e-6)
    stacked = stack_directions(z_h, z_w)
    chex.assert_shape(stacked, (2, 3 + 5, 1, 4))
    back_h, back_w = split_directions(stacked, 3)
    np.testing.assert_array_equal(back_h, z_h)
    np.testing.assert_array_equal(back_w, z_w)


def test_h_swish_and_gate_formulas_and_gradients():
    v = np.linspace(-5, 5, 41, dtype=np.float32)
    np.testing.assert_allclose(h_swish(v), v * np.clip(v + 3, 0, 6) / 6, rtol=1e-6)
    x = random_images((2, 3, 4, 5))
    logits_h, logits_w = random_images((2, 3, 1, 5), seed=1), random_images((2, 1, 4, 5), seed=2)
    y, _, _ = coordinate_gate(x, logits_h, logits_w)
    np.testing.assert_allclose(y, x / (1 + np.exp(-logits_h)) / (1 + np.exp(-logits_w)), rtol=1e-5, atol=1e-6)
    check_grads(h_swish, (x,), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
    check_grads(coordinate_gate, (x, logits_h, logits_w), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
