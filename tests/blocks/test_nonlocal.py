"""Non-local block (embedded Gaussian): PyTorch parity, identity at init, affinity, shapes, gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from block_harness import apply_jit, check_forward, jax_images, load, plain
from jax.test_util import check_grads
from torch import nn

from attnjax.blocks import NonLocalAttention
from attnjax.blocks.non_local import embedded_gaussian_affinity, non_local

pytestmark = pytest.mark.torch

SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 4, 3, 15)]  # 15: odd C, C // 2 = 7


class TorchNonLocal(nn.Module):
    """Wang et al. 2018, embedded Gaussian, NCHW: z = x + W_z(softmax(theta^T phi) g), no subsampling, no BN."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 2, 1)
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.w_z = nn.Conv2d(inner, channels, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (N, HW, C')
        phi = self.phi(x).flatten(2)  # (N, C', HW)
        g = self.g(x).flatten(2).transpose(1, 2)  # (N, HW, C')
        f = torch.softmax(theta @ phi, dim=-1)
        y = (f @ g).transpose(1, 2).reshape(n, -1, h, w)
        return x + self.w_z(y), f


random_images = jax_images


def with_random_output_projection(params, seed=1):
    """A copy of ``params`` whose zero-initialised W_z is random, so that y actually reaches the output."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    w_z = params["w_z"]
    return {
        **params,
        "w_z": {
            "kernel": jax.random.normal(k1, w_z["kernel"].shape) * 0.5,
            "bias": jax.random.normal(k2, w_z["bias"].shape) * 0.1,
        },
    }


BLOCK = NonLocalAttention()
_init = jax.jit(BLOCK.init)


def init(x):
    return _init(jax.random.key(0), x)


def apply(variables, x):
    """``BLOCK.apply`` under jit (compiled once per shape), returning ``(y, intermediates)``."""
    y, state = apply_jit(BLOCK, variables, x)
    return y, state["intermediates"]


@pytest.mark.parametrize("shape", SHAPES + [(2, 6, 6, 1)])
def test_matches_pytorch_with_nonzero_output_projection(shape):
    x = np.array(random_images(shape, seed=3))
    variables = {"params": with_random_output_projection(init(x)["params"])}
    reference = load(TorchNonLocal(shape[-1]), variables)
    y, _ = check_forward(BLOCK, x, variables, reference, maps=[("attention", plain)])
    assert not np.allclose(y, x, atol=1e-3)  # W_z is non-zero, so the comparison covers the attention path


@pytest.mark.parametrize("shape", SHAPES)
def test_identity_at_initialisation_shapes_and_affinity_rows_sum_to_one(shape):
    x = random_images(shape, seed=1)
    variables = init(x)
    y, _ = apply(variables, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))  # exactly: W_z(y) is 0 + 0

    y, intermediates = apply({"params": with_random_output_projection(variables["params"])}, x)
    assert list(intermediates) == ["attention"]
    (affinity,) = intermediates["attention"]
    n, h, w, _ = shape
    chex.assert_shape(y, shape)
    chex.assert_shape(affinity, (n, h * w, h * w))
    chex.assert_tree_all_finite((y, affinity))
    assert jnp.all(affinity >= 0)
    np.testing.assert_allclose(affinity.sum(axis=-1), np.ones((n, h * w)), rtol=1e-5)


@pytest.mark.parametrize("channels, inner", [(64, 32), (15, 7), (3, 1), (2, 1), (1, 1)])
def test_bottleneck_is_half_the_channels_with_a_floor_of_one(channels, inner):
    params = jax.eval_shape(BLOCK.init, jax.random.key(0), jnp.zeros((1, 2, 2, channels)))["params"]
    for name in ("theta", "phi", "g"):
        chex.assert_shape(params[name]["kernel"], (1, 1, channels, inner))
    chex.assert_shape(params["w_z"]["kernel"], (1, 1, inner, channels))


def test_affinity_formula():
    theta = random_images((2, 5, 3), seed=4)
    phi = random_images((2, 5, 3), seed=5)
    logits = np.einsum("nic,njc->nij", theta, phi)
    expected = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(embedded_gaussian_affinity(theta, phi), expected, rtol=1e-5)


def test_pure_functions_have_correct_gradients():
    theta, phi, g = (random_images((2, 3, 2, 4), seed=s) for s in (6, 7, 8))
    check_grads(jax.jit(non_local), (theta, phi, g), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
