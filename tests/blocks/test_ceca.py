"""CircularEfficientChannelAttention: outputs, gate and gradients against a PyTorch circular ECA written from
the ECA paper with circular padding (timm's CecaModule design), and its properties."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import apply_jit, assert_gated, check_forward, check_gradients, conv1d_state, setup, sown_maps
from jax.test_util import check_grads
from torch import nn
from torch_reference import random_images

from attnjax.blocks.ceca import CircularEfficientChannelAttention, circular_channel_conv
from attnjax.blocks.eca import EfficientChannelAttention

pytestmark = pytest.mark.torch

PROPERTY_SHAPES = [(2, 7, 7, 13), (2, 1, 1, 3), (3, 5, 9, 37), (1, 8, 8, 64)]
# (shape, kernel_size): None is the adaptive k = 3, 3, 1, 5; then explicit sizes, up to k = C
PARITY_CASES = [
    ((2, 8, 8, 32), None),
    ((3, 7, 5, 20), None),
    ((1, 1, 1, 4), None),
    ((2, 3, 2, 256), None),
    ((2, 3, 3, 5), 5),
    ((2, 4, 1, 3), 3),
]


class TorchCECA(nn.Module):
    """Wang et al. 2020 with circular padding, NCHW: s = sigmoid(conv1d_k(circular_pad(GAP(x)))), no bias."""

    def __init__(self, channels: int, kernel_size: int | None = None, gamma: float = 2, b: float = 1):
        super().__init__()
        if kernel_size is None:
            t = int(abs((math.log2(channels) + b) / gamma))
            kernel_size = t if t % 2 else t + 1
        self.pad = (kernel_size - 1) // 2
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=0, bias=False)

    def forward(self, x):
        z = x.mean(dim=(2, 3))[:, None, :]  # (N, 1, C): channels as the 1-D conv's length axis
        s = torch.sigmoid(self.conv(F.pad(z, (self.pad, self.pad), mode="circular")))[:, 0]
        s = s[:, :, None, None]
        return x * s, s


def setup_circular(shape, kernel_size=None, seed=0):
    block = CircularEfficientChannelAttention(kernel_size=kernel_size)
    return block, *setup(block, TorchCECA(shape[-1], kernel_size), shape, seed, to_state=conv1d_state)


@pytest.mark.parametrize("shape, kernel_size", PARITY_CASES)
def test_output_and_gate_match_pytorch(shape, kernel_size):
    check_forward(*setup_circular(shape, kernel_size), maps=["attention"])


@pytest.mark.parametrize("shape, kernel_size", [PARITY_CASES[1], PARITY_CASES[4]])
def test_gradients_match_pytorch(shape, kernel_size):
    cotangent = random_images(shape, seed=9)
    check_gradients(*setup_circular(shape, kernel_size, seed=3), cotangent, to_state=conv1d_state)


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_gate_and_sown_map(shape):
    x = random_images(shape)
    block = CircularEfficientChannelAttention()
    y, state = apply_jit(block, jax.jit(block.init)(jax.random.key(1), x), x)
    maps = sown_maps(state)
    assert list(maps) == ["attention"]
    chex.assert_shape(maps["attention"], (shape[0], 1, 1, shape[-1]))
    assert_gated(y, x, maps["attention"])


def test_differs_from_eca_only_at_the_wrapped_channels():
    """Same kernel: the gates agree on every channel whose window stays inside [0, C)."""
    x = random_images((2, 3, 3, 256))  # k = 5, pad = 2
    params = {"params": {"kernel": np.random.default_rng(2).normal(size=5).astype(np.float32)}}
    _, circular = CircularEfficientChannelAttention().apply(params, x, mutable=["intermediates"])
    _, zeros = EfficientChannelAttention().apply(params, x, mutable=["intermediates"])
    circular, zeros = circular["intermediates"]["attention"][0], zeros["intermediates"]["attention"][0]
    np.testing.assert_allclose(circular[..., 2:-2], zeros[..., 2:-2], rtol=1e-6, atol=1e-7)
    assert jnp.all(jnp.abs(circular[..., :2] - zeros[..., :2]) > 1e-6)
    assert jnp.all(jnp.abs(circular[..., -2:] - zeros[..., -2:]) > 1e-6)


def test_rolling_the_channels_rolls_the_output():
    """Circular padding makes the block equivariant to cyclic shifts of the channels (zero padding is not)."""
    x = random_images((2, 4, 5, 24))
    block = CircularEfficientChannelAttention(kernel_size=5)
    variables = block.init(jax.random.key(0), x)
    shifted = block.apply(variables, np.roll(x, 7, axis=-1))
    np.testing.assert_allclose(shifted, np.roll(block.apply(variables, x), 7, axis=-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels, k", [(12, 1), (12, 3), (12, 5), (3, 7), (1, 3), (2, 9)])
def test_circular_channel_conv_wraps_mod_c(channels, k):
    """The definition, also for k > C: out[c] = sum_j w[j] z[(c + j - pad) mod C]."""
    z = random_images((2, 1, 1, channels))
    kernel = np.random.default_rng(k).normal(size=k).astype(np.float32)
    pad = (k - 1) // 2
    index = (np.arange(channels)[:, None] + np.arange(k)[None, :] - pad) % channels  # (C, k)
    expected = (z[..., index] * kernel).sum(-1)
    np.testing.assert_allclose(circular_channel_conv(z, kernel), expected, rtol=1e-5, atol=1e-6)


def test_circular_channel_conv_gradients():
    z = random_images((2, 1, 1, 6))
    kernel = np.random.default_rng(1).normal(size=3).astype(np.float32)
    check_grads(circular_channel_conv, (z, kernel), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


def test_kernel_size_is_ecas_adaptive_size():
    for channels, k in [(3, 1), (16, 3), (256, 5), (2048, 7)]:
        params = jax.eval_shape(
            CircularEfficientChannelAttention().init, jax.random.key(0), jnp.zeros((1, 2, 2, channels))
        )
        chex.assert_shape(params["params"]["kernel"], (k,))
