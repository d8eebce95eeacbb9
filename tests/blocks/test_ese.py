"""EffectiveSqueezeExcitation (eSE): outputs, gate and gradients against a PyTorch eSE written from the paper,
with both gates, and its properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import apply_jit, assert_gated, check_forward, check_gradients, load, random_maps, sown_maps
from torch import nn
from torch_reference import random_images, random_variables

from attnjax.blocks.ese import EffectiveSqueezeExcitation, ese_attention

pytestmark = pytest.mark.torch

PROPERTY_SHAPES = [(2, 7, 7, 13), (2, 1, 1, 3), (3, 5, 9, 37), (1, 8, 8, 64)]
PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (1, 1, 1, 3), (2, 3, 10, 13)]


class TorchESE(nn.Module):
    """Lee & Park 2020, NCHW: g = gate(FC(GAP(x))) with one FC C -> C; y = x * g. Returns (y, g).

    The hard sigmoid is written as the official code's relu6(t + 3) / 6.
    """

    def __init__(self, channels: int, gate: str = "hard_sigmoid"):
        super().__init__()
        self.fc = nn.Linear(channels, channels)
        self.gate = gate

    def forward(self, x):
        t = self.fc(x.mean(dim=(2, 3)))
        g = F.relu6(t + 3) / 6 if self.gate == "hard_sigmoid" else torch.sigmoid(t)
        g = g[:, :, None, None]
        return x * g, g


def setup_ese(shape, gate="hard_sigmoid", seed=0, bias_scale=1.0):
    block = EffectiveSqueezeExcitation(gate=gate)
    x = random_images(shape, seed)
    params = random_variables(block, x, seed + 1)["params"]
    variables = {"params": {"fc": {**params["fc"], "bias": params["fc"]["bias"] * bias_scale}}}
    return block, x, variables, load(TorchESE(shape[-1], gate), variables)


@pytest.mark.parametrize("gate", ["hard_sigmoid", "sigmoid"])
@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_and_gate_match_pytorch(shape, gate):
    # bias_scale 12 puts many channels outside the hard sigmoid's linear range (|t| > 3), the rest inside
    check_forward(*setup_ese(shape, gate, bias_scale=12.0), maps=["attention"])


def test_the_parity_weights_reach_both_regimes_of_the_hard_sigmoid():
    block, x, variables, _ = setup_ese(PARITY_SHAPES[0], bias_scale=12.0)
    gate = sown_maps(apply_jit(block, variables, x)[1])["attention"]
    saturated = (gate == 0) | (gate == 1)
    assert jnp.any(gate == 0) and jnp.any(gate == 1) and jnp.any(~saturated)


@pytest.mark.parametrize("gate", ["hard_sigmoid", "sigmoid"])
@pytest.mark.parametrize("shape", [(3, 7, 5, 20), (2, 3, 2, 48)])
def test_gradients_match_pytorch(shape, gate):
    cotangent = random_images(shape, seed=9)
    check_gradients(*setup_ese(shape, gate, seed=3, bias_scale=6.0), cotangent, float64=True)


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_gate_and_sown_map(shape):
    x, y, maps = random_maps(EffectiveSqueezeExcitation(), shape)
    assert list(maps) == ["attention"]
    chex.assert_shape(maps["attention"], (shape[0], 1, 1, shape[-1]))
    assert_gated(y, x, maps["attention"], closed=True)


def test_init_is_one_full_width_fc():
    x = random_images((2, 3, 3, 20))
    variables = jax.jit(EffectiveSqueezeExcitation().init)(jax.random.key(0), x)
    chex.assert_shape(variables["params"]["fc"]["kernel"], (20, 20))
    chex.assert_shape(variables["params"]["fc"]["bias"], (20,))
    assert set(variables) == {"params"}


def test_hard_sigmoid_gate_formula():
    x = random_images((2, 1, 1, 9))
    logits = np.linspace(-5, 5, 9, dtype=np.float32).reshape(1, 1, 1, 9)
    y, gate = ese_attention(x, logits)
    expected = np.clip(logits / 6 + 0.5, 0, 1)
    np.testing.assert_allclose(gate, np.broadcast_to(expected, gate.shape), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(y, x * expected, rtol=1e-6, atol=1e-7)
    _, sigmoid = ese_attention(x, logits, "sigmoid")
    np.testing.assert_allclose(sigmoid, np.broadcast_to(1 / (1 + np.exp(-logits)), gate.shape), rtol=1e-6)
