"""DANet (position + channel attention): PyTorch parity, identity at init, softmax maps, CAM logits, gradients."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from block_harness import TOL, check_forward, jit_intermediates, load, plain
from jax.test_util import check_grads
from torch import nn
from torch_reference import random_images, random_variables

from attnjax.blocks.danet import DualAttention, channel_attention, position_attention

pytestmark = pytest.mark.torch

# 9: odd C (C // 8 = 1, floored to 8); 3: C < 8 (C' = C); 1x1 and 5x9 maps.
SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 4, 3, 9), (2, 3, 5, 3)]


class TorchDANet(nn.Module):
    """Fu et al. 2019, NCHW: x + alpha * PAM attention term + beta * CAM attention term.

    PAM: S = softmax over keys of B^T C (query_conv B, key_conv C), out = D S^T.
    CAM: X = softmax over channels of the energy of A A^T, out = X A; ``official`` energy is
    rowmax(A A^T) - A A^T, ``paper`` energy is A A^T.
    """

    def __init__(self, channels: int, channel_energy: str = "official"):
        super().__init__()
        inner = max(channels // 8, min(channels, 8))
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.beta = nn.Parameter(torch.zeros(()))
        self.channel_energy = channel_energy

    def forward(self, x):
        n, c, h, w = x.shape
        b = self.query(x).flatten(2).transpose(1, 2)  # (N, HW, C')
        k = self.key(x).flatten(2)  # (N, C', HW)
        d = self.value(x).flatten(2)  # (N, C, HW)
        s = torch.softmax(torch.bmm(b, k), dim=-1)  # (N, HW, HW)
        pam = torch.bmm(d, s.transpose(1, 2)).reshape(n, c, h, w)

        a = x.flatten(2)  # (N, C, HW)
        energy = torch.bmm(a, a.transpose(1, 2))  # (N, C, C)
        if self.channel_energy == "official":
            energy = energy.amax(dim=-1, keepdim=True) - energy
        attention = torch.softmax(energy, dim=-1)
        cam = torch.bmm(attention, a).reshape(n, c, h, w)
        return x + self.alpha * pam + self.beta * cam, s, attention


def jit_apply(channel_energy="official"):
    return jit_intermediates(DualAttention(channel_energy=channel_energy), numpy=True)


jit_init = jax.jit(DualAttention().init)


def nonzero_scales(variables, alpha=0.7, beta=-0.4):
    """``variables`` with alpha and beta set non-zero, so that both attention terms reach the output."""
    return {"params": {**variables["params"], "alpha": jnp.float32(alpha), "beta": jnp.float32(beta)}}


@pytest.mark.parametrize(
    "shape, channel_energy", [(s, "official") for s in SHAPES] + [((2, 5, 9, 24), "paper"), ((2, 4, 3, 9), "paper")]
)
def test_matches_pytorch(shape, channel_energy):
    # Inputs scaled by 0.5: the CAM energies are sums over H*W products, and their float32 rounding
    # (relative 1e-7 of values near H*W) must stay below the 1e-5 tolerance in the softmax.
    x = random_images(shape, seed=1) * 0.5
    block = DualAttention(channel_energy=channel_energy)
    variables = nonzero_scales(random_variables(DualAttention(), x))
    reference = load(TorchDANet(shape[-1], channel_energy), variables)
    y, _ = check_forward(block, x, variables, reference, maps=[("position", plain), ("channel", plain)])
    assert not np.allclose(y, x, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_identity_at_init_and_maps_are_softmaxes(shape):
    x = random_images(shape, seed=2)
    variables = jit_init(jax.random.key(0), x)
    assert variables["params"]["alpha"] == 0 and variables["params"]["beta"] == 0
    y, intermediates = jit_apply()(variables, x)
    np.testing.assert_array_equal(np.asarray(y), x)  # alpha = beta = 0

    assert sorted(intermediates) == ["channel", "position"]
    n, h, w, c = shape
    (position,), (channel,) = intermediates["position"], intermediates["channel"]
    chex.assert_shape(position, (n, h * w, h * w))
    chex.assert_shape(channel, (n, c, c))
    chex.assert_tree_all_finite((position, channel))
    for weights in (position, channel):
        assert np.all(weights >= 0)
        np.testing.assert_allclose(weights.sum(axis=-1), np.ones(weights.shape[:-1]), rtol=1e-5)


def test_each_scale_switches_on_its_own_branch():
    x = random_images((2, 4, 5, 16), seed=3)
    variables = random_variables(DualAttention(), x)
    params = variables["params"]
    q = x @ params["query"]["kernel"][0, 0] + params["query"]["bias"]
    k = x @ params["key"]["kernel"][0, 0] + params["key"]["bias"]
    v = x @ params["value"]["kernel"][0, 0] + params["value"]["bias"]
    pam, _ = position_attention(q, k, v)
    cam, _ = channel_attention(x)
    y, _ = jit_apply()(nonzero_scales(variables, 0.5, 0.0), x)
    np.testing.assert_allclose(y, x + 0.5 * pam, rtol=TOL, atol=TOL)
    y, _ = jit_apply()(nonzero_scales(variables, 0.0, 2.0), x)
    np.testing.assert_allclose(y, x + 2.0 * cam, rtol=TOL, atol=TOL)


def test_official_channel_energy_is_the_softmax_of_the_negated_gram_matrix():
    """max - G is not only the stability shift: it negates G, so the least similar channels weigh most."""
    x = random_images((2, 3, 4, 6), seed=4)
    a = x.reshape(2, 12, 6)
    gram = np.einsum("npc,npd->ncd", a, a)
    negated = np.exp(-gram - (-gram).max(-1, keepdims=True))
    _, official = channel_attention(x, "official")
    np.testing.assert_allclose(official, negated / negated.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    plain = np.exp(gram - gram.max(-1, keepdims=True))
    _, paper = channel_attention(x, "paper")
    np.testing.assert_allclose(paper, plain / plain.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    # Each channel's own energy ||A_c||^2 is its row's largest: the paper's map favours the diagonal, the official not.
    diagonal = np.arange(6)
    assert np.all(np.argmax(paper, axis=-1) == diagonal)
    assert np.all(np.argmin(official, axis=-1) == diagonal)


@pytest.mark.parametrize("channels, inner", [(64, 8), (128, 16), (24, 8), (9, 8), (3, 3), (1, 1)])
def test_reduced_width_is_c_over_8_with_a_floor(channels, inner):
    params = jax.eval_shape(DualAttention().init, jax.random.key(0), jnp.zeros((1, 2, 2, channels)))["params"]
    chex.assert_shape(params["query"]["kernel"], (1, 1, channels, inner))
    chex.assert_shape(params["key"]["kernel"], (1, 1, channels, inner))
    chex.assert_shape(params["value"]["kernel"], (1, 1, channels, channels))


def test_pure_functions_have_correct_gradients():
    q, k = (random_images((2, 3, 2, 4), seed=s) for s in (5, 6))
    v = random_images((2, 3, 2, 5), seed=7)
    check_grads(jax.jit(position_attention), (q, k, v), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
    x = random_images((2, 3, 2, 4), seed=8) * 0.3
    for energy in ("official", "paper"):
        f = jax.jit(functools.partial(channel_attention, channel_energy=energy))
        check_grads(f, (x,), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
