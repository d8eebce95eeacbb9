"""EfficientChannelAttention: its kernel size against the paper's formula, outputs and gradients against a
PyTorch ECA written from the paper, and its properties."""

import math
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads
from torch import nn
from torch_reference import nhwc_to_nchw, random_images

from attnjax import blocks
from attnjax.blocks.eca import EfficientChannelAttention, channel_conv, eca_kernel_size

TOL = 1e-5
PROPERTY_SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 3, 4, 20)]
PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (1, 1, 1, 4), (2, 3, 2, 256)]  # k = 3, 3, 1, 5


class TorchECA(nn.Module):
    """Wang et al. 2020, NCHW: s = sigmoid(conv1d_k(GAP(x))) across channels, no bias, 'same' padding; y = x * s."""

    def __init__(self, channels: int, gamma: float = 2, b: float = 1):
        super().__init__()
        t = int(abs((math.log2(channels) + b) / gamma))
        k = t if t % 2 else t + 1
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x):
        z = x.mean(dim=(2, 3))  # (N, C)
        s = torch.sigmoid(self.conv(z[:, None, :]))[:, 0]  # channels as the 1-D conv's length axis
        return x * s[:, :, None, None]


def paper_kernel_size(channels, gamma=2, b=1):
    """The paper's k = |t|_odd, t = log2(C)/gamma + b/gamma: the odd number nearest to t.

    For t in [2m, 2m+2) that is 2m+1; at a tie (t = 2m) the official code's rounding takes the larger.
    """
    t = abs(math.log2(channels) / gamma + b / gamma)
    return 2 * math.floor(t / 2) + 1


def setup(shape, seed=0):
    x = random_images(shape, seed)
    block = EfficientChannelAttention()
    reference = TorchECA(shape[-1])
    k = reference.conv.weight.shape[-1]
    params = {"kernel": np.random.default_rng(seed + 1).normal(size=k).astype(np.float32)}
    # attnjax keeps the kernel as (k,), PyTorch's Conv1d as (out=1, in=1, k)
    reference.load_state_dict({"conv.weight": torch.from_numpy(params["kernel"].reshape(1, 1, k))}, strict=True)
    return x, block, params, reference


@pytest.mark.parametrize(
    "channels, k",
    [(1, 1), (2, 1), (4, 1), (8, 3), (16, 3), (64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)],
)
def test_kernel_size_worked_examples(channels, k):
    assert eca_kernel_size(channels) == k


@pytest.mark.parametrize("gamma, b", [(2, 1), (1, 0), (2, 2)])
def test_kernel_size_matches_the_paper_formula(gamma, b):
    for channels in range(1, 4097):
        assert eca_kernel_size(channels, gamma, b) == paper_kernel_size(channels, gamma, b), channels


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_matches_pytorch(shape):
    x, block, params, reference = setup(shape)
    with torch.no_grad():
        expected = reference(nhwc_to_nchw(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(jax.jit(block.apply)({"params": params}, x), expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("shape", [PARITY_SHAPES[1], PARITY_SHAPES[3]])
def test_gradients_match_pytorch(shape):
    x, block, params, reference = setup(shape, seed=3)
    cotangent = random_images(shape, seed=9)  # a scalar loss sum(y * r) with every output weighted differently

    def loss(x, params):
        return jnp.sum(block.apply({"params": params}, x) * cotangent)

    grad_x, grad_params = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, params)
    x_torch = nhwc_to_nchw(x).requires_grad_(True)
    (reference(x_torch) * nhwc_to_nchw(cotangent)).sum().backward()

    np.testing.assert_allclose(grad_x, x_torch.grad.numpy().transpose(0, 2, 3, 1), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(grad_params["kernel"], reference.conv.weight.grad.numpy().ravel(), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_gate_and_sown_map(shape):
    x = random_images(shape)
    block = blocks.create("eca")
    k = eca_kernel_size(shape[-1])
    params = {"kernel": np.random.default_rng(1).normal(size=k).astype(np.float32)}
    y, state = jax.jit(partial(block.apply, mutable=["intermediates"]))({"params": params}, x)
    assert list(state["intermediates"]) == ["attention"]
    (gate,) = state["intermediates"]["attention"]
    chex.assert_shape(y, shape)
    chex.assert_shape(gate, (shape[0], 1, 1, shape[-1]))
    chex.assert_tree_all_finite((y, gate))
    assert jnp.all(gate > 0) and jnp.all(gate < 1)
    np.testing.assert_allclose(y, x * gate, rtol=1e-6, atol=1e-6)


def test_init_sizes_the_kernel_from_the_channels():
    x = random_images((2, 3, 3, 256))
    block = EfficientChannelAttention()
    variables = block.init(jax.random.key(0), x)
    chex.assert_shape(variables["params"]["kernel"], (5,))
    chex.assert_tree_all_finite((variables, block.apply(variables, x)))
    fixed = jax.eval_shape(EfficientChannelAttention(kernel_size=7).init, jax.random.key(0), x)
    chex.assert_shape(fixed["params"]["kernel"], (7,))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_channel_conv_is_a_same_padded_cross_correlation(k):
    z = random_images((2, 1, 1, 12))
    kernel = np.random.default_rng(k).normal(size=k).astype(np.float32)
    expected = np.stack([np.correlate(row, kernel, mode="same") for row in z.reshape(2, 12)]).reshape(z.shape)
    np.testing.assert_allclose(channel_conv(z, kernel), expected, rtol=1e-5, atol=1e-6)


def test_channel_conv_gradients():
    z = random_images((2, 1, 1, 6))
    kernel = np.random.default_rng(1).normal(size=3).astype(np.float32)
    check_grads(channel_conv, (z, kernel), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("shape", [(8, 8, 3), (2, 64), (1, 2, 8, 8, 3)])
def test_wrong_rank_names_the_expected_layout(shape):
    with pytest.raises(ValueError, match=r"EfficientChannelAttention expects .*NHWC, rank 4.*got shape"):
        EfficientChannelAttention().init(jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize(
    "options, message",
    [({"kernel_size": 4}, "kernel_size must be a positive odd number"), ({"gamma": 0}, "gamma must be > 0")],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        EfficientChannelAttention(**options).init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))
