"""LightCBAM (lcbam): outputs, maps and gradients against a PyTorch light CBAM written from its definition
(timm's LightCbamModule, with attnjax's CBAM choices), outputs against timm's own module with timm's options (eval and
train mode), and its properties (its gates: in test_cbam.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import check_forward, check_gradients, check_running_stats, setup
from jax.test_util import check_grads
from timm_blocks import check_against_timm, create_attn, load_timm
from torch import nn
from torch_reference import random_images, random_variables, torch_state_with_stats

from attnjax.blocks.lcbam import LightCBAM, light_channel_pool, light_global_pool

pytestmark = pytest.mark.torch

PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (1, 1, 1, 12), (2, 3, 10, 48), (2, 9, 4, 13)]


class TorchLightCBAM(nn.Module):
    """Light CBAM, NCHW: each gate pools avg and max, averages them, and runs its layer once.

    Mc = sigmoid(MLP((AvgPool(x) + MaxPool(x)) / 2)), x' = x * Mc;
    Ms = sigmoid(conv7x7((AvgPool_c(x') + MaxPool_c(x')) / 2)) (1 -> 1 channel, bias, no BN), y = x' * Ms.
    Returns (y, Mc, Ms).
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(channels // reduction, min(channels, 8))
        self.reduce = nn.Linear(channels, hidden)
        self.expand = nn.Linear(hidden, channels)
        self.spatial_conv = nn.Conv2d(1, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x):
        pooled = (x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))) / 2
        mc = torch.sigmoid(self.expand(F.relu(self.reduce(pooled))))[:, :, None, None]
        x = x * mc
        ms = torch.sigmoid(self.spatial_conv((x.mean(dim=1, keepdim=True) + x.amax(dim=1, keepdim=True)) / 2))
        return x * ms, mc, ms


def setup_light(shape, seed=0, kernel_size=7):
    block = LightCBAM(kernel_size=kernel_size)
    return block, *setup(block, TorchLightCBAM(shape[-1], kernel_size=kernel_size), shape, seed)


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_and_maps_match_pytorch(shape):
    check_forward(*setup_light(shape), maps=["channel", "spatial"])


def test_other_kernel_size_matches_pytorch():
    check_forward(*setup_light((2, 6, 5, 16), seed=2, kernel_size=3), maps=["channel", "spatial"])


@pytest.mark.parametrize("shape", PARITY_SHAPES[:2])
def test_gradients_match_pytorch(shape):
    check_gradients(*setup_light(shape, seed=3), random_images(shape, seed=9))


def test_init_shapes_and_fewer_parameters_than_cbam():
    x = random_images((2, 3, 3, 20))
    block = LightCBAM()
    variables = jax.jit(block.init)(jax.random.key(0), x)
    params = variables["params"]
    assert sorted(params) == ["expand", "reduce", "spatial_conv"]
    chex.assert_shape(params["reduce"]["kernel"], (20, 8))
    chex.assert_shape(params["expand"]["kernel"], (8, 20))
    chex.assert_shape(params["spatial_conv"]["kernel"], (7, 7, 1, 1))  # CBAM's has 2 input channels
    chex.assert_tree_all_finite((variables, jax.jit(block.apply)(variables, x)))


def test_pooling_functions():
    x = random_images((2, 3, 4, 5))
    pooled = light_global_pool(x)
    chex.assert_shape(pooled, (2, 1, 1, 5))
    expected = (x.mean(axis=(1, 2), keepdims=True) + x.max(axis=(1, 2), keepdims=True)) / 2
    np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-7)
    pooled = light_channel_pool(x)
    chex.assert_shape(pooled, (2, 3, 4, 1))
    expected = (x.mean(axis=-1, keepdims=True) + x.max(axis=-1, keepdims=True)) / 2
    np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-7)
    check_grads(light_global_pool, (x,), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
    check_grads(light_channel_pool, (x,), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


# timm 1.0.29's LightCbamModule (create_attn('lcbam')): timm's width rule, bias-free MLP and BN in the spatial gate.

TIMM_NAMES = {
    "reduce": "channel.fc1",
    "expand": "channel.fc2",
    "spatial_conv": "spatial.conv.conv",
    "spatial_bn": "spatial.conv.bn",
}
TIMM_BLOCK = {"rd_divisor": 1, "mlp_bias": False, "spatial_norm": True}  # timm's defaults, in attnjax's options
TIMM_CASES = [
    ({}, {}, (2, 5, 6, 64)),  # width round(64 / 16) = 4 (attnjax's default: 8)
    (
        {"rd_ratio": 1 / 8, "mlp_bias": True, "act_layer": "silu", "kernel_size": 5},
        {"rd_ratio": 1 / 8, "mlp_bias": True, "act_layer": nn.SiLU, "spatial_kernel_size": 5},
        (2, 6, 5, 40),
    ),
]


def setup_timm_lcbam(options, timm_options, shape, seed=0):
    block = LightCBAM(**{**TIMM_BLOCK, **options})
    x = random_images(shape, seed)
    variables = random_variables(block, x, seed + 1)
    reference = create_attn("lcbam", shape[-1], **timm_options)
    return block, x, variables, load_timm(reference, torch_state_with_stats(variables), TIMM_NAMES)


@pytest.mark.parametrize("options, timm_options, shape", TIMM_CASES)
def test_timm_options_give_timms_parameters_and_output(options, timm_options, shape):
    check_against_timm(*setup_timm_lcbam(options, timm_options, shape))


@pytest.mark.parametrize("options, timm_options, shape", TIMM_CASES)
def test_timm_options_match_timm_in_train_mode(options, timm_options, shape):
    """The spatial gate's batch statistics and its running mean after the step, in float64."""
    block, x, variables, reference = setup_timm_lcbam(options, timm_options, shape, seed=3)
    _, state = check_against_timm(block, x, variables, reference, train=True, float64=True)
    check_running_stats(state, reference, module_name=TIMM_NAMES.get)


def test_default_width_is_attnjax_rule_and_timms_is_an_option():
    x = jnp.zeros((1, 2, 2, 64))
    for options, width in [({}, 8), ({"rd_divisor": 1}, 4), ({"rd_ratio": 1 / 8}, 8), ({"rd_channels": 6}, 6)]:
        params = jax.eval_shape(LightCBAM(**options).init, jax.random.key(0), x)["params"]
        assert params["reduce"]["kernel"].shape == (64, width), options
        assert "spatial_bn" not in params and "bias" in params["spatial_conv"]
    assert create_attn("lcbam", 64).channel.fc1.out_channels == 4
