"""EffectiveSqueezeExcitation (eSE): outputs, gate and gradients against a PyTorch eSE written from the paper,
with both gates, and its properties."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_reference import flax_to_torch_state, nchw_to_nhwc, nhwc_to_nchw, random_images, random_variables

from attnjax.blocks.ese import EffectiveSqueezeExcitation, ese_attention

TOL = 1e-5
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


def setup(shape, gate="hard_sigmoid", seed=0, bias_scale=1.0):
    x = random_images(shape, seed)
    block = EffectiveSqueezeExcitation(gate=gate)
    params = random_variables(block, x, seed + 1)["params"]
    params = {"fc": {**params["fc"], "bias": params["fc"]["bias"] * bias_scale}}
    reference = TorchESE(shape[-1], gate)
    reference.load_state_dict(flax_to_torch_state(params), strict=True)
    return x, block, params, reference


@pytest.mark.parametrize("gate", ["hard_sigmoid", "sigmoid"])
@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_and_gate_match_pytorch(shape, gate):
    # bias_scale 12 puts many channels outside the hard sigmoid's linear range (|t| > 3), the rest inside
    x, block, params, reference = setup(shape, gate, bias_scale=12.0)
    y, state = jax.jit(partial(block.apply, mutable=["intermediates"]))({"params": params}, x)
    with torch.no_grad():
        expected_y, expected_g = map(nchw_to_nhwc, reference(nhwc_to_nchw(x)))
    np.testing.assert_allclose(y, expected_y, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(state["intermediates"]["attention"][0], expected_g, rtol=TOL, atol=TOL)


def test_the_parity_weights_reach_both_regimes_of_the_hard_sigmoid():
    x, block, params, _ = setup(PARITY_SHAPES[0], bias_scale=12.0)
    _, state = block.apply({"params": params}, x, mutable=["intermediates"])
    (gate,) = state["intermediates"]["attention"]
    saturated = (gate == 0) | (gate == 1)
    assert jnp.any(gate == 0) and jnp.any(gate == 1) and jnp.any(~saturated)


@pytest.mark.parametrize("gate", ["hard_sigmoid", "sigmoid"])
@pytest.mark.parametrize("shape", [(3, 7, 5, 20), (2, 3, 2, 48)])
def test_gradients_match_pytorch(shape, gate):
    x, block, params, reference = setup(shape, gate, seed=3, bias_scale=6.0)
    cotangent = random_images(shape, seed=9)
    with jax.enable_x64(True):
        x64, cot64, params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), (x, cotangent, params))

        def loss(x, params):
            return jnp.sum(block.apply({"params": params}, x) * cot64)

        grad_x, grad_params = jax.jit(jax.grad(loss, argnums=(0, 1)))(x64, params64)
    reference.double()
    x_torch = nhwc_to_nchw(x64).requires_grad_(True)
    (reference(x_torch)[0] * nhwc_to_nchw(cot64)).sum().backward()
    np.testing.assert_allclose(grad_x, nchw_to_nhwc(x_torch.grad), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(grad_params["fc"]["kernel"], reference.fc.weight.grad.numpy().T, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(grad_params["fc"]["bias"], reference.fc.bias.grad.numpy(), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_gate_and_sown_map(shape):
    x = random_images(shape)
    block = EffectiveSqueezeExcitation()
    y, state = jax.jit(partial(block.apply, mutable=["intermediates"]))(random_variables(block, x), x)
    assert list(state["intermediates"]) == ["attention"]
    (gate,) = state["intermediates"]["attention"]
    chex.assert_shape(y, shape)
    chex.assert_shape(gate, (shape[0], 1, 1, shape[-1]))
    chex.assert_tree_all_finite((y, gate))
    assert jnp.all(gate >= 0) and jnp.all(gate <= 1)
    np.testing.assert_allclose(y, x * gate, rtol=1e-6, atol=1e-6)


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


def test_bad_gate_is_rejected():
    with pytest.raises(ValueError, match="gate must be one of hard_sigmoid, sigmoid, got 'relu'"):
        EffectiveSqueezeExcitation(gate="relu").init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))


@pytest.mark.parametrize("shape", [(8, 8, 3), (2, 64), (1, 2, 8, 8, 3)])
def test_wrong_rank_names_the_expected_layout(shape):
    with pytest.raises(ValueError, match=r"EffectiveSqueezeExcitation expects .*NHWC, rank 4.*got shape"):
        EffectiveSqueezeExcitation().init(jax.random.key(0), jnp.zeros(shape))
