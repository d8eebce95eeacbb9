"""ShuffleAttention: output and both gates against a PyTorch SA layer written from the paper (with attnjax's
documented group rule for C that 2G does not divide), and its properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from block_harness import apply_jit, check_forward, load, plain, sown_maps
from jax.test_util import check_grads
from torch import nn
from torch_reference import random_images, random_variables

from attnjax.blocks.shuffle import ShuffleAttention, channel_shuffle, instance_norm, shuffle_attention, shuffle_groups

pytestmark = pytest.mark.torch

PROPERTY_SHAPES = [(2, 8, 8, 64), (2, 7, 7, 13), (2, 1, 1, 3), (3, 5, 9, 37), (2, 3, 3, 1)]
PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (2, 1, 1, 12), (2, 3, 10, 13), (1, 4, 4, 3), (2, 4, 5, 384)]


class TorchShuffleAttention(nn.Module):
    """Zhang and Yang 2021, NCHW. G = the largest g <= groups with C divisible by 2g (1 for odd C); each group of
    C/G channels splits into its first ceil(C/2G) (channel branch) and the rest (spatial branch), with parameters
    shared by the groups. Returns (y, channel gate (N,1,1,C1), spatial gate (N,H,W,C2)) in group-major order.
    """

    def __init__(self, channels: int, groups: int = 64):
        super().__init__()
        self.groups = 1 if channels % 2 else max(g for g in range(1, groups + 1) if channels % (2 * g) == 0)
        size = channels // self.groups
        self.k1 = -(-size // 2)
        k2 = size - self.k1
        self.channel_weight = nn.Parameter(torch.zeros(self.k1))
        self.channel_bias = nn.Parameter(torch.ones(self.k1))
        self.norm = nn.GroupNorm(k2, k2)  # one group per channel
        self.spatial_weight = nn.Parameter(torch.zeros(k2))
        self.spatial_bias = nn.Parameter(torch.ones(k2))

    def forward(self, x):
        n, c, h, w = x.shape
        groups = x.reshape(n * self.groups, c // self.groups, h, w)
        x1, x2 = groups[:, : self.k1], groups[:, self.k1 :]
        s = x1.mean(dim=(2, 3), keepdim=True)
        channel_gate = torch.sigmoid(self.channel_weight[:, None, None] * s + self.channel_bias[:, None, None])
        spatial = self.spatial_weight[:, None, None] * self.norm(x2) + self.spatial_bias[:, None, None]
        spatial_gate = torch.sigmoid(spatial)
        z = torch.cat([x1 * channel_gate, x2 * spatial_gate], dim=1).reshape(n, c, h, w)
        half = -(-c // 2)  # riffle of the two halves: z_0, z_half, z_1, z_half+1, ...
        order = [i // 2 if i % 2 == 0 else half + i // 2 for i in range(c)]
        y = z[:, order]
        channel_gate = channel_gate.reshape(n, 1, 1, -1)
        spatial_gate = spatial_gate.reshape(n, self.groups, -1, h, w).permute(0, 3, 4, 1, 2).reshape(n, h, w, -1)
        return y, channel_gate, spatial_gate


def to_torch_state(variables):
    params = variables["params"]
    state = {k: torch.from_numpy(np.array(v)) for k, v in params.items() if not k.startswith("norm")}
    state["norm.weight"] = torch.from_numpy(np.array(params["norm_scale"]))
    state["norm.bias"] = torch.from_numpy(np.array(params["norm_bias"]))
    return state


def scaled_variables(block, x, seed=1):
    """Random parameters times 3, ~ N(0, 0.9^2): gates far from sigmoid(bias)."""
    return jax.tree.map(lambda p: p * 3, random_variables(block, x, seed))


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_and_gates_match_pytorch(shape):
    x = random_images(shape)
    block = ShuffleAttention()
    variables = scaled_variables(block, x)
    reference = load(TorchShuffleAttention(shape[-1]), variables, to_torch_state)
    check_forward(block, x, variables, reference, maps=[("channel", plain), ("spatial", plain)])


@pytest.mark.parametrize(
    "channels, groups, expected",
    [(128, 64, 64), (384, 64, 64), (64, 64, 32), (20, 64, 10), (100, 8, 5), (2, 64, 1), (13, 64, 1), (3, 64, 1)],
)
def test_group_rule(channels, groups, expected):
    assert shuffle_groups(channels, groups) == expected


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_gates_and_init(shape):
    x = random_images(shape)
    block = ShuffleAttention()  # the default options, as blocks.create("shuffle") builds it
    variables = jax.jit(block.init)(jax.random.key(0), x)
    y, state = apply_jit(block, variables, x)
    maps = sown_maps(state)
    assert sorted(maps) == ["channel", "spatial"]
    channel, spatial = maps["channel"], maps["spatial"]
    n, h, w, c = shape
    chex.assert_shape(y, shape)
    chex.assert_shape(channel, (n, 1, 1, (c + 1) // 2))
    chex.assert_shape(spatial, (n, h, w, c // 2))
    chex.assert_tree_all_finite((y, channel, spatial))
    # The official initialisation: W = 0, b = 1, so every gate is sigmoid(1) and y is the shuffled x times it.
    gate = 1 / (1 + np.exp(-1.0))
    np.testing.assert_allclose(channel, np.full(channel.shape, gate), rtol=1e-6)
    np.testing.assert_allclose(spatial, np.full(spatial.shape, gate), rtol=1e-6)
    np.testing.assert_allclose(y, channel_shuffle(x) * gate, rtol=1e-6, atol=1e-7)
    size = c // shuffle_groups(c, 64)
    assert sum(p.size for p in jax.tree.leaves(variables)) == 2 * ((size + 1) // 2) + 4 * (size // 2)  # 3C/G, C even


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_output_is_the_shuffled_input_times_the_gates(shape):
    x = random_images(shape)
    block = ShuffleAttention()
    y, state = apply_jit(block, scaled_variables(block, x), x)
    maps = sown_maps(state)
    channel, spatial = maps["channel"], maps["spatial"]
    assert jnp.all(channel > 0) and jnp.all(channel < 1) and jnp.all(spatial > 0) and jnp.all(spatial < 1)
    n, h, w, c = shape
    groups = shuffle_groups(c, 64)
    k1, k2 = channel.shape[-1] // groups, spatial.shape[-1] // groups
    gates = jnp.concatenate(
        [
            jnp.broadcast_to(channel, (n, h, w, channel.shape[-1])).reshape(n, h, w, groups, k1),
            spatial.reshape(n, h, w, groups, k2),
        ],
        axis=-1,
    ).reshape(shape)
    np.testing.assert_allclose(y, channel_shuffle(x * gates), rtol=1e-6, atol=1e-7)


def test_spatial_gate_on_a_1x1_map_is_the_norm_shift():
    x = random_images((2, 1, 1, 12))
    block = ShuffleAttention(groups=2)  # G = 2, k = 3
    variables = scaled_variables(block, x)
    params = variables["params"]
    _, state = apply_jit(block, variables, x)
    logits = params["spatial_weight"] * params["norm_bias"] + params["spatial_bias"]
    expected = np.tile(1 / (1 + np.exp(-logits)), (2, 1, 1, 2))
    np.testing.assert_allclose(sown_maps(state)["spatial"], expected, rtol=1e-6)


def test_channel_shuffle_even_and_odd():
    even = jnp.arange(8.0).reshape(1, 1, 1, 8)
    np.testing.assert_array_equal(channel_shuffle(even)[0, 0, 0], [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(
        channel_shuffle(even)[0, 0, 0], even.reshape(2, 4).T.reshape(-1)
    )  # ShuffleNet's reshape-transpose
    odd = jnp.arange(7.0).reshape(1, 1, 1, 7)
    np.testing.assert_array_equal(channel_shuffle(odd)[0, 0, 0], [0, 4, 1, 5, 2, 6, 3])
    np.testing.assert_array_equal(channel_shuffle(jnp.ones((2, 3, 3, 1))), jnp.ones((2, 3, 3, 1)))


def test_instance_norm_is_two_pass_and_formula_gradients():
    x = random_images((2, 3, 4, 5)) * 1e-2 + 1e2  # a large mean against a small spread (E[x^2] - E[x]^2 fails)
    x64 = x.astype(np.float64)
    centred = x64 - x64.mean(axis=(1, 2), keepdims=True)
    expected = centred / np.sqrt((centred**2).mean(axis=(1, 2), keepdims=True) + 1e-5)
    np.testing.assert_allclose(instance_norm(x), expected, rtol=1e-2, atol=1e-2)

    x = random_images((2, 3, 4, 6))
    params = [random_images((2,), seed=s) for s in range(6)]
    check_grads(
        jax.jit(lambda x, *p: shuffle_attention(x, 2, *p)[0]),
        (x, *params[:2], *[p[:1] for p in params[2:]]),
        order=1,
        modes=["fwd", "rev"],
        atol=1e-2,
        rtol=1e-2,
    )
