"""EfficientChannelAttentionMLP ('ecam'): outputs, gate and gradients against a PyTorch ECA-with-MLP written
from the design of timm's EcaModule(use_mlp=True) (Conv1d 1 -> m, ReLU, Conv1d m -> 1 of width k across
channels), its width rule, and its properties."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from block_harness import apply_jit, assert_gated, check_forward, check_gradients, load, sown_maps
from jax.test_util import check_grads
from torch import nn
from torch_reference import random_images

from attnjax.blocks.eca import channel_conv
from attnjax.blocks.ecam import EfficientChannelAttentionMLP, make_divisible, mlp_channel_conv

pytestmark = pytest.mark.torch

PROPERTY_SHAPES = [(2, 7, 7, 13), (2, 1, 1, 3), (3, 5, 9, 37), (1, 8, 8, 64)]
PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (1, 1, 1, 3), (2, 3, 2, 256), (2, 5, 3, 95)]  # m = 8, 8, 8, 32, 16


def reference_width(channels, reduction=8, divisor=8):
    """C / r to the nearest multiple of the divisor (at least the divisor), one more if that lost over 10%."""
    v = channels / reduction
    m = max(divisor, math.floor(v / divisor + 0.5) * divisor)
    return m + divisor if m < 0.9 * v else m


class TorchECAM(nn.Module):
    """NCHW: z = GAP(x) as a length-C sequence with 1 feature; h = relu(Conv1d(1 -> m, k=1)(z));
    t = Conv1d(m -> 1, width k, zero padding (k-1)/2)(h); s = sigmoid(t); y = x * s. Returns (y, s)."""

    def __init__(self, channels: int, gamma: float = 2, b: float = 1):
        super().__init__()
        t = int(abs((math.log2(channels) + b) / gamma))
        k = t if t % 2 else t + 1
        hidden = reference_width(channels)
        self.conv = nn.Conv1d(1, hidden, 1)
        self.conv2 = nn.Conv1d(hidden, 1, k, padding=(k - 1) // 2)

    def forward(self, x):
        z = x.mean(dim=(2, 3))[:, None, :]  # (N, 1, C)
        s = torch.sigmoid(self.conv2(torch.relu(self.conv(z))))[:, 0][:, :, None, None]
        return x * s, s


def to_torch_state(variables):
    """u (m,) -> conv.weight (m, 1, 1); w (k, m) -> conv2.weight (1, m, k); beta () -> conv2.bias (1,)."""
    p = {name: torch.from_numpy(np.array(value)) for name, value in variables["params"].items()}
    return {
        "conv.weight": p["hidden_kernel"].reshape(-1, 1, 1),
        "conv.bias": p["hidden_bias"],
        "conv2.weight": p["kernel"].T.contiguous()[None],
        "conv2.bias": p["bias"].reshape(1),
    }


def setup_ecam(shape, seed=0):
    x = random_images(shape, seed)
    block = EfficientChannelAttentionMLP()
    reference = TorchECAM(shape[-1])
    k, m = reference.conv2.weight.shape[2], reference.conv2.weight.shape[1]
    rng = np.random.default_rng(seed + 1)
    params = {
        "hidden_kernel": rng.normal(size=m),
        "hidden_bias": 0.3 * rng.normal(size=m),  # makes some hidden units cut by the ReLU, others not
        "kernel": rng.normal(size=(k, m)) / np.sqrt(k * m),
        "bias": 0.3 * rng.normal(size=()),
    }
    variables = {"params": {name: np.asarray(value, np.float32) for name, value in params.items()}}
    return block, x, variables, load(reference, variables, to_torch_state)


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_and_gate_match_pytorch(shape):
    block, x, variables, reference = setup_ecam(shape)
    chex.assert_trees_all_equal_shapes(variables, jax.eval_shape(block.init, jax.random.key(0), x))
    check_forward(block, x, variables, reference, maps=["attention"])


@pytest.mark.parametrize("shape", [PARITY_SHAPES[1], PARITY_SHAPES[3]])
def test_gradients_match_pytorch(shape):
    cotangent = random_images(shape, seed=9)
    check_gradients(*setup_ecam(shape, seed=3), cotangent, to_state=to_torch_state, float64=True)


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_gate_and_sown_map(shape):
    x = random_images(shape)
    block = EfficientChannelAttentionMLP()
    variables = jax.jit(block.init)(jax.random.key(1), x)
    y, state = apply_jit(block, variables, x)
    maps = sown_maps(state)
    assert list(maps) == ["attention"]
    chex.assert_shape(maps["attention"], (shape[0], 1, 1, shape[-1]))
    chex.assert_tree_all_finite(variables)
    assert_gated(y, x, maps["attention"])


@pytest.mark.parametrize(
    "channels, width", [(1, 8), (3, 8), (64, 8), (95, 16), (100, 16), (200, 24), (256, 32), (300, 40), (2048, 256)]
)
def test_hidden_width_follows_timms_rule(channels, width):
    assert make_divisible(channels / 8, 8) == width == reference_width(channels)
    params = jax.eval_shape(EfficientChannelAttentionMLP().init, jax.random.key(0), jnp.zeros((1, 2, 2, channels)))
    assert params["params"]["hidden_kernel"].shape == (width,)


def test_width_rule_over_a_range():
    for channels in range(1, 3000):
        assert make_divisible(channels / 8, 8) == reference_width(channels), channels


def test_eca_is_the_special_case_u_equal_plus_minus_one():
    """With hidden u = (1, -1), a = 0, w[:, 0] = v, w[:, 1] = -v, beta = 0: relu(z) - relu(-z) = z, so t is
    ECA's zero-padded conv of z with kernel v."""
    z = random_images((2, 1, 1, 17))
    v = np.random.default_rng(0).normal(size=5).astype(np.float32)
    t = mlp_channel_conv(z, np.array([1.0, -1.0], np.float32), np.zeros(2, np.float32), np.stack([v, -v], 1), 0.0)
    np.testing.assert_allclose(t, channel_conv(z, v), rtol=1e-5, atol=1e-6)


def test_mlp_channel_conv_gradients():
    z = random_images((2, 1, 1, 6))
    rng = np.random.default_rng(1)
    args = (z, rng.normal(size=4), 0.3 + rng.normal(size=4), rng.normal(size=(3, 4)), np.float32(0.1))
    args = tuple(np.asarray(a, np.float32) for a in args)
    check_grads(mlp_channel_conv, args, order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
