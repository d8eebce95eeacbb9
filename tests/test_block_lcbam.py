"""LightCBAM (lcbam): outputs, maps and gradients against a PyTorch light CBAM written from its definition
(timm's LightCbamModule, with attnjax's CBAM choices), and its properties."""

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

from attnjax.blocks.lcbam import LightCBAM, light_channel_pool, light_global_pool

TOL = 1e-5
PROPERTY_SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 3, 4, 20)]
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


def setup(shape, seed=0, kernel_size=7):
    x = random_images(shape, seed)
    block = LightCBAM(kernel_size=kernel_size)
    params = random_variables(block, x, seed + 1)["params"]
    reference = TorchLightCBAM(shape[-1], kernel_size=kernel_size)
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


def test_other_kernel_size_matches_pytorch():
    x, block, params, reference = setup((2, 6, 5, 16), seed=2, kernel_size=3)
    y = jax.jit(block.apply)({"params": params}, x)
    with torch.no_grad():
        expected = nchw_to_nhwc(reference(nhwc_to_nchw(x))[0])
    np.testing.assert_allclose(y, expected, rtol=TOL, atol=TOL)


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
    block = LightCBAM()
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


@pytest.mark.parametrize("shape", [(8, 8, 3), (2, 64), (1, 2, 8, 8, 3)])
def test_wrong_rank_names_the_expected_layout(shape):
    with pytest.raises(ValueError, match=r"LightCBAM expects .*NHWC, rank 4.*got shape"):
        LightCBAM().init(jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize(
    "options, message",
    [({"reduction": 0}, "reduction must be >= 1"), ({"kernel_size": 6}, "kernel_size must be a positive odd number")],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        LightCBAM(**options).init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))
