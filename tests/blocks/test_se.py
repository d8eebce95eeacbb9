"""SqueezeExcitation: against a PyTorch SE written from the paper (outputs and gradients), and its properties."""

import chex
import jax
import jax.numpy as jnp
import pytest
import torch
import torch.nn.functional as F
from block_harness import assert_gated, check_forward, check_gradients, random_maps, setup
from torch import nn
from torch_reference import random_images

from attnjax import blocks
from attnjax.blocks.se import SqueezeExcitation

pytestmark = pytest.mark.torch

PROPERTY_SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 3, 4, 20)]
PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (1, 1, 1, 12), (2, 4, 6, 160)]


class TorchSE(nn.Module):
    """Hu et al. 2018, NCHW: s = sigmoid(W2 relu(W1 GAP(x))), y = x * s; hidden width max(C // r, min(C, 8))."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, min(channels, 8))
        self.reduce = nn.Linear(channels, hidden)
        self.expand = nn.Linear(hidden, channels)

    def forward(self, x):
        z = x.mean(dim=(2, 3))
        s = torch.sigmoid(self.expand(F.relu(self.reduce(z))))
        return x * s[:, :, None, None]


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_matches_pytorch(shape):
    block = SqueezeExcitation()
    check_forward(block, *setup(block, TorchSE(shape[-1]), shape))


@pytest.mark.parametrize("shape", PARITY_SHAPES[:2])
def test_gradients_match_pytorch(shape):
    block = SqueezeExcitation()
    x, variables, reference = setup(block, TorchSE(shape[-1]), shape, seed=3)
    check_gradients(block, x, variables, reference, random_images(shape, seed=9))


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_gate_and_sown_map(shape):
    x, y, maps = random_maps(blocks.create("se"), shape)
    assert list(maps) == ["attention"]
    chex.assert_shape(maps["attention"], (shape[0], 1, 1, shape[-1]))
    assert_gated(y, x, maps["attention"])


@pytest.mark.parametrize("channels, hidden", [(64, 8), (256, 16), (20, 8), (12, 8), (3, 3)])
def test_bottleneck_width(channels, hidden):
    params = jax.eval_shape(SqueezeExcitation().init, jax.random.key(0), jnp.zeros((1, 2, 2, channels)))["params"]
    chex.assert_shape(params["reduce"]["kernel"], (channels, hidden))
    chex.assert_shape(params["expand"]["kernel"], (hidden, channels))


def test_init_gives_finite_parameters_and_output():
    x = random_images((2, 3, 3, 16))
    block = SqueezeExcitation()
    variables = block.init(jax.random.key(0), x)
    chex.assert_tree_all_finite((variables, block.apply(variables, x)))
