"""EfficientChannelAttention: its kernel size against the paper's formula, outputs and gradients against a
PyTorch ECA written from the paper, and its properties."""

import math

import chex
import jax
import numpy as np
import pytest
import torch
from block_harness import apply_jit, assert_gated, check_forward, check_gradients, conv1d_state, setup, sown_maps
from jax.test_util import check_grads
from torch import nn
from torch_reference import random_images

from attnjax import blocks
from attnjax.blocks.eca import EfficientChannelAttention, channel_conv, eca_kernel_size

pytestmark = pytest.mark.torch

PROPERTY_SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 3, 4, 20)]
PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (1, 1, 1, 4), (2, 3, 2, 256)]  # k = 3, 3, 1, 5


class TorchECA(nn.Module):
    """Wang et al. 2020, NCHW: s = sigmoid(conv1d_k(GAP(x))) across channels, no bias, 'same' padding; y = x * s."""

    def __init__(self, channels: int, gamma: float = 2, b: float = 1):
        super().__init__()
        t = int(abs((math.log2(channels) + b) / gamma))
        k = t if t % 2 else t + 1
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x):
        z = x.mean(dim=(2, 3))  # (N, C)
        s = torch.sigmoid(self.conv(z[:, None, :]))[:, 0]  # channels as the 1-D conv's length axis
        return x * s[:, :, None, None]


def paper_kernel_size(channels, gamma=2, b=1):
    """The paper's k = |t|_odd, t = log2(C)/gamma + b/gamma: the odd number nearest to t.

    For t in [2m, 2m+2) that is 2m+1; at a tie (t = 2m) the official code's rounding takes the larger.
    """
    t = abs(math.log2(channels) / gamma + b / gamma)
    return 2 * math.floor(t / 2) + 1


@pytest.mark.parametrize(
    "channels, k",
    [(1, 1), (2, 1), (4, 1), (8, 3), (16, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)],
)
def test_kernel_size_worked_examples(channels, k):
    assert eca_kernel_size(channels) == k


@pytest.mark.parametrize("gamma, b", [(2, 1), (1, 0), (2, 2)])
def test_kernel_size_matches_the_paper_formula(gamma, b):
    for channels in range(1, 4097):
        assert eca_kernel_size(channels, gamma, b) == paper_kernel_size(channels, gamma, b), channels


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_matches_pytorch(shape):
    block = EfficientChannelAttention()
    check_forward(block, *setup(block, TorchECA(shape[-1]), shape, to_state=conv1d_state))


@pytest.mark.parametrize("shape", [PARITY_SHAPES[1], PARITY_SHAPES[3]])
def test_gradients_match_pytorch(shape):
    block = EfficientChannelAttention()
    x, variables, reference = setup(block, TorchECA(shape[-1]), shape, seed=3, to_state=conv1d_state)
    check_gradients(block, x, variables, reference, random_images(shape, seed=9), to_state=conv1d_state)


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_gate_and_sown_map(shape):
    x = random_images(shape)
    block = blocks.create("eca")
    k = eca_kernel_size(shape[-1])
    params = {"kernel": np.random.default_rng(1).normal(size=k).astype(np.float32)}
    y, state = apply_jit(block, {"params": params}, x)
    maps = sown_maps(state)
    assert list(maps) == ["attention"]
    chex.assert_shape(maps["attention"], (shape[0], 1, 1, shape[-1]))
    assert_gated(y, x, maps["attention"])


def test_init_sizes_the_kernel_from_the_channels():
    x = random_images((2, 3, 3, 256))
    block = EfficientChannelAttention()
    variables = block.init(jax.random.key(0), x)
    chex.assert_shape(variables["params"]["kernel"], (5,))
    chex.assert_tree_all_finite((variables, block.apply(variables, x)))
    fixed = jax.eval_shape(EfficientChannelAttention(kernel_size=7).init, jax.random.key(0), x)
    chex.assert_shape(fixed["params"]["kernel"], (7,))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_channel_conv_is_a_same_padded_cross_correlation(k):
    z = random_images((2, 1, 1, 12))
    kernel = np.random.default_rng(k).normal(size=k).astype(np.float32)
    expected = np.stack([np.correlate(row, kernel, mode="same") for row in z.reshape(2, 12)]).reshape(z.shape)
    np.testing.assert_allclose(channel_conv(z, kernel), expected, rtol=1e-5, atol=1e-6)


def test_channel_conv_gradients():
    z = random_images((2, 1, 1, 6))
    kernel = np.random.default_rng(1).normal(size=3).astype(np.float32)
    check_grads(channel_conv, (z, kernel), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
