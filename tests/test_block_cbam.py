"""CBAM: outputs, maps and gradients against a PyTorch CBAM written from the paper, and its properties."""

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
from torch_reference import flax_to_torch_state, nchw_to_nhwc, nhwc_to_nchw, random_images, random_variables

from attnjax import blocks
from attnjax.blocks.cbam import CBAM, channel_pool, global_max_pool

TOL = 1e-5
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


def setup(shape, seed=0):
    x = random_images(shape, seed)
    block = CBAM()
    params = random_variables(block, x, seed + 1)["params"]
    reference = TorchCBAM(shape[-1])
    reference.load_state_dict(flax_to_torch_state(params), strict=True)
    return x, block, params, reference


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_and_maps_match_pytorch(shape):
    x, block, params, reference = setup(shape)
    y, state = jax.jit(partial(block.apply, mutable=["intermediates"]))({"params": params}, x)
    with torch.no_grad():
        expected_y, expected_mc, expected_ms = map(nchw_to_nhwc, reference(nhwc_to_nchw(x)))
    np.testing.assert_allclose(y, expected_y, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(state["intermediates"]["channel"][0], expected_mc, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(state["intermediates"]["spatial"][0], expected_ms, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("shape", PARITY_SHAPES[:2])
def test_gradients_match_pytorch(shape):
    x, block, params, reference = setup(shape, seed=3)
    cotangent = random_images(shape, seed=9)  # a scalar loss sum(y * r) with every output weighted differently

    def loss(x, params):
        return jnp.sum(block.apply({"params": params}, x) * cotangent)

    grad_x, grad_params = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, params)
    x_torch = nhwc_to_nchw(x).requires_grad_(True)
    (reference(x_torch)[0] * nhwc_to_nchw(cotangent)).sum().backward()

    np.testing.assert_allclose(grad_x, nchw_to_nhwc(x_torch.grad), rtol=TOL, atol=TOL)
    expected = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    got = flax_to_torch_state(grad_params)
    assert set(got) == set(expected)
    for name, value in got.items():
        np.testing.assert_allclose(value.numpy(), expected[name], rtol=TOL, atol=TOL, err_msg=name)


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_gates_and_sown_maps(shape):
    x = random_images(shape)
    block = blocks.create("cbam")
    y, state = jax.jit(partial(block.apply, mutable=["intermediates"]))(random_variables(block, x), x)
    maps = state["intermediates"]
    assert sorted(maps) == ["channel", "spatial"]
    (channel,), (spatial,) = maps["channel"], maps["spatial"]
    n, h, w, c = shape
    chex.assert_shape(y, shape)
    chex.assert_shape(channel, (n, 1, 1, c))
    chex.assert_shape(spatial, (n, h, w, 1))
    chex.assert_tree_all_finite((y, channel, spatial))
    for gate in (channel, spatial):
        assert jnp.all(gate > 0) and jnp.all(gate < 1)
    np.testing.assert_allclose(y, x * channel * spatial, rtol=1e-5, atol=1e-6)


def test_init_shapes_and_finite_output():
    x = random_images((2, 3, 3, 20))
    block = CBAM()
    variables = block.init(jax.random.key(0), x)
    params = variables["params"]
    chex.assert_shape(params["reduce"]["kernel"], (20, 8))
    chex.assert_shape(params["expand"]["kernel"], (8, 20))
    chex.assert_shape(params["spatial_conv"]["kernel"], (7, 7, 2, 1))
    chex.assert_tree_all_finite((variables, block.apply(variables, x)))


def test_pooling_functions():
    x = random_images((2, 3, 4, 5))
    np.testing.assert_allclose(global_max_pool(x), x.max(axis=(1, 2), keepdims=True))
    pooled = channel_pool(x)
    chex.assert_shape(pooled, (2, 3, 4, 2))
    np.testing.assert_allclose(pooled[..., 0], x.mean(axis=-1), rtol=1e-6)  # mean first, as in the paper
    np.testing.assert_allclose(pooled[..., 1], x.max(axis=-1))
    check_grads(global_max_pool, (x,), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
    check_grads(channel_pool, (x,), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("shape", [(8, 8, 3), (2, 64), (1, 2, 8, 8, 3)])
def test_wrong_rank_names_the_expected_layout(shape):
    with pytest.raises(ValueError, match=r"CBAM expects .*NHWC, rank 4.*got shape"):
        CBAM().init(jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize(
    "options, message",
    [({"reduction": 0}, "reduction must be >= 1"), ({"kernel_size": 6}, "kernel_size must be a positive odd number")],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        CBAM(**options).init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))
