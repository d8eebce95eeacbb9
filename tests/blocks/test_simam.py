"""SimAM: PyTorch parity, no parameters, the 1x1 case, shapes, weights, gradients and bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from block_harness import TOL, apply_jit, jax_images
from jax.test_util import check_grads
from torch import nn

from attnjax.blocks import SimAMAttention
from attnjax.blocks.simam import simam
from attnjax.compare.pytorch import nhwc_to_nchw

pytestmark = pytest.mark.torch

SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 3, 4, 5)]
SIGMOID_HALF = 1 / (1 + np.exp(-0.5))


class TorchSimAM(nn.Module):
    """Yang et al. 2021, eq. (5) and their PyTorch listing, NCHW: x * sigmoid(d / (4 (v + lambda)) + 0.5)."""

    def __init__(self, e_lambda: float = 1e-4):
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x):
        n = x.shape[2] * x.shape[3] - 1
        d = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2)
        e_inv = d / (4 * (d.sum(dim=(2, 3), keepdim=True) / n + self.e_lambda)) + 0.5
        return x * torch.sigmoid(e_inv)


def random_images(shape, seed=0, scale=1.0):
    return scale * jax_images(shape, seed)


def jit_apply(**options):
    """``SimAMAttention(**options)`` under jit, as a function of x returning ``(y, intermediates)``."""

    def run(x):
        y, state = apply_jit(SimAMAttention(**options), {}, x)
        return y, state["intermediates"]

    return run


def torch_simam(x, **options):
    return TorchSimAM(**options)(nhwc_to_nchw(np.array(x))).numpy().transpose(0, 2, 3, 1)


# The paper's n = H*W - 1 is 0 on 1x1 maps (NaN in the reference); that case has its own test below.
@pytest.mark.parametrize("shape, scale", [(s, 1.0) for s in SHAPES if s[1] * s[2] > 1] + [(SHAPES[-1], 0.01)])
def test_matches_pytorch(shape, scale):
    x = random_images(shape, seed=1, scale=scale)  # scale 0.01: v ~ 1e-4, where lambda matters
    y, _ = jit_apply()(x)
    np.testing.assert_allclose(np.asarray(y), torch_simam(x), rtol=TOL, atol=TOL * scale)


def test_lambda_is_passed_through():
    x = random_images(SHAPES[-1], seed=2, scale=0.01)
    y, _ = jit_apply(e_lambda=1e-2)(x)
    np.testing.assert_allclose(np.asarray(y), torch_simam(x, e_lambda=1e-2), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_has_no_parameters_keeps_shape_and_weights_lie_in_range(shape):
    x = random_images(shape, seed=3)
    variables = jax.eval_shape(SimAMAttention().init, jax.random.key(0), x)
    assert not jax.tree.leaves(variables.get("params", {}))
    y, intermediates = jit_apply()(x)
    assert list(intermediates) == ["attention"]
    (weights,) = intermediates["attention"]
    chex.assert_shape((y, weights), shape)
    chex.assert_tree_all_finite((y, weights))
    # E_inv >= 0.5, so the weights lie in [sigmoid(0.5), 1)
    assert jnp.all(weights >= SIGMOID_HALF - 1e-6) and jnp.all(weights <= 1)
    np.testing.assert_allclose(y, x * weights, rtol=1e-6, atol=1e-6)


def test_single_position_maps_scale_by_sigmoid_of_one_half():
    x = random_images((3, 1, 1, 32), seed=4)
    y, intermediates = jit_apply()(x)
    np.testing.assert_allclose(intermediates["attention"][0], np.full(x.shape, SIGMOID_HALF), rtol=1e-6)
    np.testing.assert_allclose(y, x * SIGMOID_HALF, rtol=1e-6)


def test_constant_channel_gets_the_neutral_weight_and_stays_finite():
    x = random_images(SHAPES[-1], seed=5).at[..., 0].set(1.0)
    y, intermediates = jit_apply()(x)
    chex.assert_tree_all_finite(y)
    np.testing.assert_allclose(intermediates["attention"][0][..., 0], np.full(SHAPES[-1][:3], SIGMOID_HALF), rtol=1e-6)


def test_outlier_gets_the_largest_weight():
    x = jnp.zeros(SHAPES[-1]).at[1, 2, 3, 4].set(4.0)
    _, intermediates = jit_apply()(x)
    weights = intermediates["attention"][0][1, :, :, 4]
    assert jnp.unravel_index(jnp.argmax(weights), weights.shape) == (2, 3)


def test_pure_function_has_correct_gradients():
    x = random_images((2, 3, 4, 2), seed=6)
    check_grads(jax.jit(simam), (x,), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


def test_dtype_sets_the_dtype_of_the_weights():
    x = random_images(SHAPES[-1], seed=7)
    y, intermediates = jit_apply(dtype=jnp.bfloat16)(x)
    weights = intermediates["attention"][0]
    chex.assert_type(weights, jnp.float32)  # every sown map is float32 (blocks/primitives/precision.py)
    chex.assert_type(y, jnp.float32)  # x * weights promotes, as in the other blocks
    np.testing.assert_allclose(y, jit_apply()(x)[0], rtol=2e-2, atol=2e-2)
