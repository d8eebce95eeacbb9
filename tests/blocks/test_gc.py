"""GlobalContext: output and softmax map against a PyTorch GC block written from the paper, and its properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import check_forward, load, random_maps, setup, torch_state_with_map_norm
from torch import nn
from torch_reference import random_images

from attnjax import blocks
from attnjax.blocks.gc import GlobalContext
from attnjax.compare.pytorch import nchw_to_nhwc, nhwc_to_nchw

pytestmark = pytest.mark.torch
PROPERTY_SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 3, 4, 20)]
PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (1, 1, 1, 12), (2, 3, 10, 160)]


class TorchGC(nn.Module):
    """Cao et al. 2019, NCHW: a = softmax_{HW}(W_k x), c = sum_j a_j x_j, y = x + W_v2 relu(LN(W_v1 c)).

    LayerNorm over (C/r, 1, 1) as in the official code. Returns (y, a).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, min(channels, 8))
        self.context = nn.Conv2d(channels, 1, 1, bias=False)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.norm = nn.LayerNorm([hidden, 1, 1])
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        a = torch.softmax(self.context(x).reshape(n, h * w, 1), dim=1)
        context = torch.bmm(x.reshape(n, c, h * w), a).reshape(n, c, 1, 1)
        t = self.expand(F.relu(self.norm(self.reduce(context))))
        return x + t, a.reshape(n, 1, h, w)


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_and_map_match_pytorch(shape):
    block = GlobalContext()
    x, variables, reference = setup(block, TorchGC(shape[-1]), shape, to_state=torch_state_with_map_norm)
    check_forward(block, x, variables, reference, maps=["attention"])


def with_large_layer_norm_mean(params, x, ratio):
    """``params`` with the reduce conv's bias set so that the LayerNorm input's mean over its channels is ``ratio``
    times its spread (the mean over images of the per-image standard deviation)."""
    params = jax.tree.map(np.array, params)
    kernel = params["context"]["kernel"][0, 0, :, 0]
    logits = np.einsum("nhwc,c->nhw", x.astype(np.float64), kernel)
    weights = np.exp(logits - logits.max(axis=(1, 2), keepdims=True))
    weights /= weights.sum(axis=(1, 2), keepdims=True)
    context = np.einsum("nhw,nhwc->nc", weights, x)
    t = context @ params["reduce"]["kernel"][0, 0]
    params["reduce"]["bias"] = np.full_like(params["reduce"]["bias"], ratio * t.std(axis=-1).mean())
    return params


@pytest.mark.parametrize("ratio", [100, 2000])
def test_layer_norm_is_accurate_in_float32_when_its_input_mean_dwarfs_its_spread(ratio):
    """Float32 GC against the reference in float64, with a LayerNorm input whose mean is ``ratio`` times its spread.

    Rounding the LayerNorm input to float32 already costs about eps * ratio relative to its spread, so no float32
    implementation does better than that (PyTorch's float32 reaches 6e-5 at 100 and 9e-4 at 2000). The one-pass
    variance E[t^2] - E[t]^2 loses eps * ratio^2 instead: 2e-3 at 100, and 1.4 at 2000 (a variance of 0).
    """
    shape = (3, 5, 7, 48)
    block = GlobalContext()
    x, variables, _ = setup(block, TorchGC(shape[-1]), shape, seed=4, to_state=torch_state_with_map_norm)
    variables = {"params": with_large_layer_norm_mean(variables["params"], x, ratio)}
    y = jax.jit(block.apply)(variables, x)
    reference = load(TorchGC(shape[-1]), variables, torch_state_with_map_norm).double()
    with torch.no_grad():
        expected = nchw_to_nhwc(reference(nhwc_to_nchw(x).double())[0])
    tol = 2e-6 * ratio  # about 3x PyTorch's float32 error, 10x below the one-pass variance's
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_and_softmax_map(shape):
    x, y, maps = random_maps(blocks.create("gc"), shape)
    assert list(maps) == ["attention"]
    weights = maps["attention"]
    n, h, w, _ = shape
    chex.assert_shape(y, shape)
    chex.assert_shape(weights, (n, h, w, 1))
    chex.assert_tree_all_finite((y, weights))
    assert jnp.all(weights > 0)
    np.testing.assert_allclose(weights.sum(axis=(1, 2, 3)), np.ones(n), rtol=1e-5)


def test_init_starts_as_the_identity_unless_told_otherwise():
    x = random_images((2, 3, 5, 20))
    block = GlobalContext()
    variables = jax.jit(block.init)(jax.random.key(0), x)
    chex.assert_shape(variables["params"]["reduce"]["kernel"], (1, 1, 20, 8))
    chex.assert_shape(variables["params"]["expand"]["kernel"], (1, 1, 8, 20))
    assert not jnp.any(variables["params"]["expand"]["kernel"])
    np.testing.assert_array_equal(jax.jit(block.apply)(variables, x), x)
    other = jax.jit(GlobalContext(zero_init_last=False).init)(jax.random.key(0), x)
    assert jnp.all(other["params"]["expand"]["kernel"] != 0)
    chex.assert_tree_all_finite(other)
