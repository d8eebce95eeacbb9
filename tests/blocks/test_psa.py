"""PolarizedSelfAttention: output and all four maps against a PyTorch PSA (parallel layout) written from the paper,
and its properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from block_harness import apply_jit, check_forward, load, random_maps, setup, sown_maps
from jax.test_util import check_grads
from torch import nn
from torch_reference import random_images, random_variables

from attnjax.blocks.primitives import attention_pool
from attnjax.blocks.psa import PolarizedSelfAttention, parallel_polarized, spatial_only_logits
from attnjax.compare.pytorch import nchw_to_nhwc, nhwc_to_nchw

pytestmark = pytest.mark.torch

PROPERTY_SHAPES = [(2, 8, 8, 64), (2, 7, 7, 13), (2, 1, 1, 3), (3, 5, 9, 37)]
PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (2, 1, 1, 12), (2, 3, 10, 13), (1, 4, 4, 3)]


class TorchPSA(nn.Module):
    """Liu et al. 2021, parallel layout, NCHW; 1x1 convs without bias, inner width max(C // 2, min(C, 8)).

    Channel-only: w = softmax_HW(Wq x), c = Wv x . w, A_ch = sigmoid(LN_C(Wz c)).
    Spatial-only: s = softmax_C/2(GAP(Wq x)), A_sp = sigmoid(s . Wv x). y = A_ch * x + A_sp * x.
    Returns (y, A_ch (N,C,1,1), A_sp (N,1,H,W), w (N,1,H,W), s (N,C/2,1,1)).
    """

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 2, min(channels, 8))
        self.channel_query = nn.Conv2d(channels, 1, 1, bias=False)
        self.channel_value = nn.Conv2d(channels, inner, 1, bias=False)
        self.channel_out = nn.Conv2d(inner, channels, 1, bias=False)
        self.channel_norm = nn.LayerNorm(channels)
        self.spatial_query = nn.Conv2d(channels, inner, 1, bias=False)
        self.spatial_value = nn.Conv2d(channels, inner, 1, bias=False)

    def forward(self, x):
        n, c, h, w = x.shape
        # channel-only branch
        q = torch.softmax(self.channel_query(x).reshape(n, h * w, 1), dim=1)  # (N, HW, 1)
        v = self.channel_value(x).reshape(n, -1, h * w)  # (N, C/2, HW)
        context = torch.bmm(v, q)[..., None]  # (N, C/2, 1, 1)
        z = self.channel_out(context).reshape(n, c)
        a_ch = torch.sigmoid(self.channel_norm(z)).reshape(n, c, 1, 1)
        # spatial-only branch
        s = torch.softmax(self.spatial_query(x).mean(dim=(2, 3)), dim=1)  # (N, C/2)
        v = self.spatial_value(x).reshape(n, -1, h * w)  # (N, C/2, HW)
        a_sp = torch.sigmoid(torch.bmm(s[:, None, :], v)).reshape(n, 1, h, w)
        y = a_ch * x + a_sp * x
        return y, a_ch, a_sp, q.reshape(n, 1, h, w), s[:, :, None, None]


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_and_maps_match_pytorch(shape):
    block = PolarizedSelfAttention()
    x, variables, reference = setup(block, TorchPSA(shape[-1]), shape)
    check_forward(block, x, variables, reference, maps=["channel", "spatial", "channel_softmax", "spatial_softmax"])


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_gates_and_softmax_maps(shape):
    x, y, maps = random_maps(PolarizedSelfAttention(), shape)  # the default options, as blocks.create("psa") builds it
    assert sorted(maps) == ["channel", "channel_softmax", "spatial", "spatial_softmax"]
    n, h, w, c = shape
    inner = max(c // 2, min(c, 8))
    chex.assert_shape(y, shape)
    chex.assert_shape(maps["channel"], (n, 1, 1, c))
    chex.assert_shape(maps["spatial"], (n, h, w, 1))
    chex.assert_shape(maps["channel_softmax"], (n, h, w, 1))
    chex.assert_shape(maps["spatial_softmax"], (n, 1, 1, inner))
    chex.assert_tree_all_finite((y, maps))
    for name in ("channel", "spatial"):
        assert jnp.all(maps[name] > 0) and jnp.all(maps[name] < 1), name
    np.testing.assert_allclose(maps["channel_softmax"].sum(axis=(1, 2, 3)), np.ones(n), rtol=1e-5)
    np.testing.assert_allclose(maps["spatial_softmax"].sum(axis=(1, 2, 3)), np.ones(n), rtol=1e-5)
    np.testing.assert_allclose(y, x * maps["channel"] + x * maps["spatial"], rtol=1e-5, atol=1e-6)


def test_init_shapes_no_biases_and_finite_output():
    x = random_images((2, 3, 5, 20))
    block = PolarizedSelfAttention()
    params = jax.jit(block.init)(jax.random.key(0), x)["params"]
    assert set(params) == {
        "channel_query",
        "channel_value",
        "channel_out",
        "channel_norm",
        "spatial_query",
        "spatial_value",
    }
    for name in params:
        if name != "channel_norm":
            assert set(params[name]) == {"kernel"}, name
    chex.assert_shape(params["channel_query"]["kernel"], (1, 1, 20, 1))
    chex.assert_shape(params["channel_value"]["kernel"], (1, 1, 20, 10))
    chex.assert_shape(params["channel_out"]["kernel"], (1, 1, 10, 20))
    chex.assert_shape(params["spatial_query"]["kernel"], (1, 1, 20, 10))
    chex.assert_shape(params["channel_norm"]["scale"], (20,))
    y = jax.jit(block.apply)({"params": params}, x)
    chex.assert_tree_all_finite(y)


def test_layer_norm_is_robust_to_a_large_mean():
    """W_z outputs with a large common offset and a small spread: a one-pass variance (E[z^2] - E[z]^2) loses the
    spread in float32; the block's two-pass LayerNorm keeps it (compared with the reference in float64)."""
    x = random_images((2, 4, 4, 16))
    block = PolarizedSelfAttention()
    params = jax.tree.map(np.array, random_variables(block, x, 1)["params"])
    kernel = params["channel_out"]["kernel"]
    params["channel_out"]["kernel"] = (1e3 + 1e-2 * kernel).astype(np.float32)  # z_j = 1e3 sum(c) + 1e-2 (...)_j
    maps = sown_maps(apply_jit(block, {"params": params}, x)[1])
    reference = load(TorchPSA(16), {"params": params}).double()
    with torch.no_grad():
        expected = nchw_to_nhwc(reference(nhwc_to_nchw(x.astype(np.float64)))[1])
    assert expected.std() > 0.05  # the gate varies over the channels
    np.testing.assert_allclose(maps["channel"], expected, atol=1e-2)


def test_branch_formulas_and_gradients():
    values = random_images((2, 3, 4, 5))
    query = random_images((2, 3, 4, 5), seed=2)
    logits, s = spatial_only_logits(values, query)
    pooled = query.mean(axis=(1, 2), keepdims=True)
    e = np.exp(pooled - pooled.max(axis=-1, keepdims=True))
    expected_s = e / e.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(s, expected_s, rtol=1e-5)
    np.testing.assert_allclose(logits, (expected_s * values).sum(axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)

    x = random_images((2, 3, 4, 5), seed=3)
    channel_logits = random_images((2, 1, 1, 5), seed=4)
    spatial_logits = random_images((2, 3, 4, 1), seed=5)
    y, a_ch, a_sp = parallel_polarized(x, channel_logits, spatial_logits)
    np.testing.assert_allclose(a_ch, 1 / (1 + np.exp(-channel_logits)), rtol=1e-6)
    np.testing.assert_allclose(a_sp, 1 / (1 + np.exp(-spatial_logits)), rtol=1e-6)
    np.testing.assert_allclose(y, x * a_ch + x * a_sp, rtol=1e-5, atol=1e-6)

    for f, args in [
        (attention_pool, (values, query[..., :1])),  # the channel-only branch's pooling
        (spatial_only_logits, (values, query)),
        (parallel_polarized, (x, channel_logits, spatial_logits)),
    ]:
        check_grads(jax.jit(f), args, order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
