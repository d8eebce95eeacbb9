"""SqueezeExcitation: against a PyTorch SE written from the paper (outputs and gradients), and its properties."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.test_util import check_grads
from torch import nn
from torch_reference import flax_to_torch_state, nhwc_to_nchw, random_images, random_variables

from attnjax import blocks
from attnjax.blocks.primitives import global_avg_pool
from attnjax.blocks.se import SqueezeExcitation

TOL = 1e-5
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


def setup(shape, seed=0):
    x = random_images(shape, seed)
    block = SqueezeExcitation()
    params = random_variables(block, x, seed + 1)["params"]
    reference = TorchSE(shape[-1])
    reference.load_state_dict(flax_to_torch_state(params), strict=True)
    return x, block, params, reference


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_matches_pytorch(shape):
    x, block, params, reference = setup(shape)
    with torch.no_grad():
        expected = reference(nhwc_to_nchw(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(jax.jit(block.apply)({"params": params}, x), expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("shape", PARITY_SHAPES[:2])
def test_gradients_match_pytorch(shape):
    x, block, params, reference = setup(shape, seed=3)
    cotangent = random_images(shape, seed=9)  # a scalar loss sum(y * r) with every output weighted differently

    def loss(x, params):
        return jnp.sum(block.apply({"params": params}, x) * cotangent)

    grad_x, grad_params = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, params)
    x_torch = nhwc_to_nchw(x).requires_grad_(True)
    (reference(x_torch) * nhwc_to_nchw(cotangent)).sum().backward()

    np.testing.assert_allclose(grad_x, x_torch.grad.numpy().transpose(0, 2, 3, 1), rtol=TOL, atol=TOL)
    expected = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    got = flax_to_torch_state(grad_params)
    assert set(got) == set(expected)
    for name, value in got.items():
        np.testing.assert_allclose(value.numpy(), expected[name], rtol=TOL, atol=TOL, err_msg=name)


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_gate_and_sown_map(shape):
    x = random_images(shape)
    block = blocks.create("se")
    y, state = jax.jit(partial(block.apply, mutable=["intermediates"]))(random_variables(block, x), x)
    assert list(state["intermediates"]) == ["attention"]
    (gate,) = state["intermediates"]["attention"]
    chex.assert_shape(y, shape)
    chex.assert_shape(gate, (shape[0], 1, 1, shape[-1]))
    chex.assert_tree_all_finite((y, gate))
    assert jnp.all(gate > 0) and jnp.all(gate < 1)
    np.testing.assert_allclose(y, x * gate, rtol=1e-6, atol=1e-6)


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


def test_global_avg_pool_formula_and_gradients():
    x = random_images((2, 3, 5, 4))
    np.testing.assert_allclose(global_avg_pool(x), np.asarray(x).mean(axis=(1, 2), keepdims=True), rtol=1e-6)
    check_grads(global_avg_pool, (x,), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("shape", [(8, 8, 3), (2, 64), (1, 2, 8, 8, 3)])
def test_wrong_rank_names_the_expected_layout(shape):
    with pytest.raises(ValueError, match=r"SqueezeExcitation expects .*NHWC, rank 4.*got shape"):
        SqueezeExcitation().init(jax.random.key(0), jnp.zeros(shape))


def test_zero_reduction_is_rejected():
    with pytest.raises(ValueError, match="reduction must be >= 1"):
        SqueezeExcitation(reduction=0).init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))
