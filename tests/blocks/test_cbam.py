"""CBAM: outputs, maps and gradients against a PyTorch CBAM written from the paper, and its properties."""

import chex
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import assert_gated, check_forward, check_gradients, random_maps, setup
from jax.test_util import check_grads
from torch import nn
from torch_reference import random_images

from attnjax import blocks
from attnjax.blocks.cbam import CBAM, channel_pool

pytestmark = pytest.mark.torch

PROPERTY_SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 3, 4, 20)]
PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (1, 1, 1, 12), (2, 3, 10, 48)]


class TorchCBAM(nn.Module):
    """Woo et al. 2018, NCHW, as the paper's equations (no BN in the spatial gate).

    Mc = sigmoid(MLP(AvgPool(x)) + MLP(MaxPool(x))), x' = x * Mc;
    Ms = sigmoid(conv7x7([AvgPool_c(x'); MaxPool_c(x')])), y = x' * Ms.
    Returns (y, Mc, Ms).
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(channels // reduction, min(channels, 8))
        self.reduce = nn.Linear(channels, hidden)
        self.expand = nn.Linear(hidden, channels)
        self.spatial_conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def mlp(self, z):
        return self.expand(F.relu(self.reduce(z)))

    def forward(self, x):
        mc = torch.sigmoid(self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3))))[:, :, None, None]
        x = x * mc
        ms = torch.sigmoid(self.spatial_conv(torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], 1)))
        return x * ms, mc, ms


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_and_maps_match_pytorch(shape):
    block = CBAM()
    check_forward(block, *setup(block, TorchCBAM(shape[-1]), shape), maps=["channel", "spatial"])


@pytest.mark.parametrize("shape", PARITY_SHAPES[:2])
def test_gradients_match_pytorch(shape):
    block = CBAM()
    x, variables, reference = setup(block, TorchCBAM(shape[-1]), shape, seed=3)
    check_gradients(block, x, variables, reference, random_images(shape, seed=9))


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
@pytest.mark.parametrize("name", ["cbam", "lcbam"])  # LightCBAM: CBAM's gates, other poolings
def test_shape_gates_and_sown_maps(name, shape):
    x, y, maps = random_maps(blocks.create(name), shape)
    assert sorted(maps) == ["channel", "spatial"]
    n, h, w, c = shape
    chex.assert_shape(maps["channel"], (n, 1, 1, c))
    chex.assert_shape(maps["spatial"], (n, h, w, 1))
    assert_gated(y, x, maps["channel"], maps["spatial"], rtol=1e-5)


def test_init_shapes_and_finite_output():
    x = random_images((2, 3, 3, 20))
    block = CBAM()
    variables = block.init(jax.random.key(0), x)
    params = variables["params"]
    chex.assert_shape(params["reduce"]["kernel"], (20, 8))
    chex.assert_shape(params["expand"]["kernel"], (8, 20))
    chex.assert_shape(params["spatial_conv"]["kernel"], (7, 7, 2, 1))
    chex.assert_tree_all_finite((variables, block.apply(variables, x)))


def test_channel_pool_is_mean_then_max():
    x = random_images((2, 3, 4, 5))
    pooled = channel_pool(x)
    chex.assert_shape(pooled, (2, 3, 4, 2))
    np.testing.assert_allclose(pooled[..., 0], x.mean(axis=-1), rtol=1e-6)  # mean first, as in the paper
    np.testing.assert_allclose(pooled[..., 1], x.max(axis=-1))
    check_grads(channel_pool, (x,), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
