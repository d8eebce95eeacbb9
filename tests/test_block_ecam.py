"""EfficientChannelAttentionMLP ('ecam'): outputs, gate and gradients against a PyTorch ECA-with-MLP written
from the design of timm's EcaModule(use_mlp=True) (Conv1d 1 -> m, ReLU, Conv1d m -> 1 of width k across
channels), its width rule, and its properties."""

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
from torch_reference import nchw_to_nhwc, nhwc_to_nchw, random_images

from attnjax.blocks.eca import channel_conv
from attnjax.blocks.ecam import EfficientChannelAttentionMLP, make_divisible, mlp_channel_conv

TOL = 1e-5
PROPERTY_SHAPES = [(2, 7, 7, 13), (2, 1, 1, 3), (3, 5, 9, 37), (1, 8, 8, 64)]
PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (1, 1, 1, 3), (2, 3, 2, 256), (2, 5, 3, 95)]  # m = 8, 8, 8, 32, 16


def reference_width(channels, reduction=8, divisor=8):
    """C / r to the nearest multiple of the divisor (at least the divisor), one more if that lost over 10%."""
    v = channels / reduction
    m = max(divisor, math.floor(v / divisor + 0.5) * divisor)
    return m + divisor if m < 0.9 * v else m


class TorchECAM(nn.Module):
    """NCHW: z = GAP(x) as a length-C sequence with 1 feature; h = relu(Conv1d(1 -> m, k=1)(z));
    t = Conv1d(m -> 1, width k, zero padding (k-1)/2)(h); s = sigmoid(t); y = x * s. Returns (y, s)."""

    def __init__(self, channels: int, gamma: float = 2, b: float = 1):
        super().__init__()
        t = int(abs((math.log2(channels) + b) / gamma))
        k = t if t % 2 else t + 1
        hidden = reference_width(channels)
        self.conv = nn.Conv1d(1, hidden, 1)
        self.conv2 = nn.Conv1d(hidden, 1, k, padding=(k - 1) // 2)

    def forward(self, x):
        z = x.mean(dim=(2, 3))[:, None, :]  # (N, 1, C)
        s = torch.sigmoid(self.conv2(torch.relu(self.conv(z))))[:, 0][:, :, None, None]
        return x * s, s


def to_torch_state(params):
    """u (m,) -> conv.weight (m, 1, 1); w (k, m) -> conv2.weight (1, m, k); beta () -> conv2.bias (1,)."""
    p = {name: torch.from_numpy(np.ascontiguousarray(np.asarray(value))) for name, value in params.items()}
    return {
        "conv.weight": p["hidden_kernel"].reshape(-1, 1, 1),
        "conv.bias": p["hidden_bias"],
        "conv2.weight": p["kernel"].T.contiguous()[None],
        "conv2.bias": p["bias"].reshape(1),
    }


def setup(shape, seed=0):
    x = random_images(shape, seed)
    block = EfficientChannelAttentionMLP()
    reference = TorchECAM(shape[-1])
    k, m = reference.conv2.weight.shape[2], reference.conv2.weight.shape[1]
    rng = np.random.default_rng(seed + 1)
    params = {
        "hidden_kernel": rng.normal(size=m),
        "hidden_bias": 0.3 * rng.normal(size=m),  # makes some hidden units cut by the ReLU, others not
        "kernel": rng.normal(size=(k, m)) / np.sqrt(k * m),
        "bias": 0.3 * rng.normal(size=()),
    }
    params = {name: np.asarray(value, np.float32) for name, value in params.items()}
    reference.load_state_dict(to_torch_state(params), strict=True)
    return x, block, params, reference


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_and_gate_match_pytorch(shape):
    x, block, params, reference = setup(shape)
    chex.assert_trees_all_equal_shapes(params, jax.eval_shape(block.init, jax.random.key(0), x)["params"])
    y, state = jax.jit(partial(block.apply, mutable=["intermediates"]))({"params": params}, x)
    with torch.no_grad():
        expected_y, expected_s = map(nchw_to_nhwc, reference(nhwc_to_nchw(x)))
    np.testing.assert_allclose(y, expected_y, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(state["intermediates"]["attention"][0], expected_s, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("shape", [PARITY_SHAPES[1], PARITY_SHAPES[3]])
def test_gradients_match_pytorch(shape):
    x, block, params, reference = setup(shape, seed=3)
    cotangent = random_images(shape, seed=9)
    with jax.enable_x64(True):
        x64, cot64, params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), (x, cotangent, params))

        def loss(x, params):
            return jnp.sum(block.apply({"params": params}, x) * cot64)

        grad_x, grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(x64, params64)
    reference.double()
    x_torch = nhwc_to_nchw(x64).requires_grad_(True)
    (reference(x_torch)[0] * nhwc_to_nchw(cot64)).sum().backward()
    np.testing.assert_allclose(grad_x, nchw_to_nhwc(x_torch.grad), rtol=TOL, atol=TOL)
    expected = {
        "hidden_kernel": reference.conv.weight.grad.numpy().ravel(),
        "hidden_bias": reference.conv.bias.grad.numpy(),
        "kernel": reference.conv2.weight.grad.numpy()[0].T,
        "bias": reference.conv2.bias.grad.numpy()[0],
    }
    for name, value in expected.items():
        np.testing.assert_allclose(grad[name], value, rtol=TOL, atol=TOL, err_msg=name)


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_gate_and_sown_map(shape):
    x = random_images(shape)
    block = EfficientChannelAttentionMLP()
    variables = jax.jit(block.init)(jax.random.key(1), x)
    y, state = jax.jit(partial(block.apply, mutable=["intermediates"]))(variables, x)
    assert list(state["intermediates"]) == ["attention"]
    (gate,) = state["intermediates"]["attention"]
    chex.assert_shape(y, shape)
    chex.assert_shape(gate, (shape[0], 1, 1, shape[-1]))
    chex.assert_tree_all_finite((variables, y, gate))
    assert jnp.all(gate > 0) and jnp.all(gate < 1)
    np.testing.assert_allclose(y, x * gate, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "channels, width", [(1, 8), (3, 8), (64, 8), (95, 16), (100, 16), (200, 24), (256, 32), (300, 40), (2048, 256)]
)
def test_hidden_width_follows_timms_rule(channels, width):
    assert make_divisible(channels / 8, 8) == width == reference_width(channels)
    params = jax.eval_shape(EfficientChannelAttentionMLP().init, jax.random.key(0), jnp.zeros((1, 2, 2, channels)))
    assert params["params"]["hidden_kernel"].shape == (width,)


def test_width_rule_over_a_range():
    for channels in range(1, 3000):
        assert make_divisible(channels / 8, 8) == reference_width(channels), channels


def test_eca_is_the_special_case_u_equal_plus_minus_one():
    """With hidden u = (1, -1), a = 0, w[:, 0] = v, w[:, 1] = -v, beta = 0: relu(z) - relu(-z) = z, so t is
    ECA's zero-padded conv of z with kernel v."""
    z = random_images((2, 1, 1, 17))
    v = np.random.default_rng(0).normal(size=5).astype(np.float32)
    t = mlp_channel_conv(z, np.array([1.0, -1.0], np.float32), np.zeros(2, np.float32), np.stack([v, -v], 1), 0.0)
    np.testing.assert_allclose(t, channel_conv(z, v), rtol=1e-5, atol=1e-6)


def test_mlp_channel_conv_gradients():
    z = random_images((2, 1, 1, 6))
    rng = np.random.default_rng(1)
    args = (z, rng.normal(size=4), 0.3 + rng.normal(size=4), rng.normal(size=(3, 4)), np.float32(0.1))
    args = tuple(np.asarray(a, np.float32) for a in args)
    check_grads(mlp_channel_conv, args, order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("shape", [(8, 8, 3), (2, 64), (1, 2, 8, 8, 3)])
def test_wrong_rank_names_the_expected_layout(shape):
    with pytest.raises(ValueError, match=r"EfficientChannelAttentionMLP expects .*NHWC, rank 4.*got shape"):
        EfficientChannelAttentionMLP().init(jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kernel_size": 4}, "kernel_size must be a positive odd number"),
        ({"gamma": 0}, "gamma must be > 0"),
        ({"reduction": 0}, "reduction must be >= 1"),
        ({"divisor": 0}, "divisor must be >= 1"),
    ],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        EfficientChannelAttentionMLP(**options).init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))
