"""MHSA: PyTorch parity, identity at init, weights vs the fused path, position code, shapes, gradients, bad heads."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from block_harness import TOL, check_forward, jax_images, jit_intermediates, load, plain
from jax.test_util import check_grads
from torch import nn
from torch_reference import random_variables

from attnjax.blocks import MultiHeadSelfAttention
from attnjax.blocks.mhsa import attention_weights, multi_head_attention, sinusoidal_position_encoding_2d

pytestmark = pytest.mark.torch

SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 4, 3, 20)]


def torch_position_code(height, width, channels, temperature=10000.0):
    """DETR's interleaved sine/cosine code at integer positions, rows on the first C//2 channels; (C, H, W)."""

    def axis(length, c):
        i = torch.arange(c)
        angle = torch.arange(length, dtype=torch.float64)[:, None] / temperature ** (2 * (i // 2) / c)
        return torch.where(i % 2 == 0, angle.sin(), angle.cos())  # (length, c)

    rows, cols = axis(height, channels // 2), axis(width, channels - channels // 2)
    code = torch.cat([rows[:, None, :].expand(-1, width, -1), cols[None, :, :].expand(height, -1, -1)], dim=-1)
    return code.permute(2, 0, 1).float()


class TorchMHSA(nn.Module):
    """Multi-head self-attention over the H*W positions, NCHW, position code added to the queries' and keys' input."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query, self.key, self.value, self.out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        n, c, h, w = x.shape
        x_pos = x + torch_position_code(h, w, c)
        heads = self.num_heads

        def split(t):  # (N, C, H, W) -> (N, heads, HW, C / heads)
            return t.reshape(n, heads, c // heads, h * w).transpose(2, 3)

        q, k, v = split(self.query(x_pos)), split(self.key(x_pos)), split(self.value(x))
        a = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(c // heads), dim=-1)  # (N, heads, HW, HW)
        o = (a @ v).transpose(2, 3).reshape(n, c, h, w)
        return x + self.out(o), a


random_images = jax_images
jit_init = jax.jit(MultiHeadSelfAttention().init)


def jit_apply(num_heads=4):
    """``MultiHeadSelfAttention(num_heads)`` under jit, as a function returning ``(y, intermediates)``."""
    return jit_intermediates(MultiHeadSelfAttention(num_heads))


# SHAPES share their compiled functions with the tests below; heads 1 and 3 add two cases of their own.
@pytest.mark.parametrize("shape, num_heads", [(s, 4) for s in SHAPES] + [((2, 3, 9, 8), 1), ((1, 6, 6, 9), 3)])
def test_matches_pytorch(shape, num_heads):
    x = np.array(random_images(shape, seed=1))
    block = MultiHeadSelfAttention(num_heads)
    variables = random_variables(block, x)
    reference = load(TorchMHSA(shape[-1], num_heads), variables)
    check_forward(block, x, variables, reference, maps=[("attention", plain)])


@pytest.mark.parametrize("shape", SHAPES)
def test_identity_at_init_shapes_and_weights_sum_to_one(shape):
    x = random_images(shape, seed=2)
    y, _ = jit_apply()(jit_init(jax.random.key(0), x), x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))  # W_o starts at zero

    y, intermediates = jit_apply()(random_variables(MultiHeadSelfAttention(), x), x)
    assert list(intermediates) == ["attention"]
    (weights,) = intermediates["attention"]
    n, h, w, _ = shape
    chex.assert_shape(y, shape)
    chex.assert_shape(weights, (n, 4, h * w, h * w))
    chex.assert_tree_all_finite((y, weights))
    assert jnp.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(axis=-1), np.ones((n, 4, h * w)), rtol=1e-5)


def test_sown_weights_applied_to_v_give_the_fused_output():
    x = random_images((2, 5, 9, 24), seed=3)
    variables = random_variables(MultiHeadSelfAttention(), x)
    y, intermediates = jit_apply()(variables, x)
    params = variables["params"]
    v = (x @ params["value"]["kernel"][0, 0] + params["value"]["bias"]).reshape(2, 45, 4, 6)
    o = jnp.einsum("nhij,njhd->nihd", intermediates["attention"][0], v).reshape(x.shape)
    np.testing.assert_allclose(y, x + o @ params["out"]["kernel"][0, 0] + params["out"]["bias"], rtol=TOL, atol=TOL)


def test_pure_weights_match_dot_product_attention_and_have_correct_gradients():
    q, k, v = (random_images((2, 6, 3, 4), seed=s) for s in (4, 5, 6))
    np.testing.assert_allclose(
        jnp.einsum("nhij,njhd->nihd", attention_weights(q, k), v), multi_head_attention(q, k, v), rtol=TOL, atol=TOL
    )
    check_grads(jax.jit(multi_head_attention), (q, k, v), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
    check_grads(jax.jit(attention_weights), (q, k), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


def test_weights_are_computed_only_when_intermediates_are_mutable():
    """The einsum + softmax for the sown weights adds one exp to the graph; without ``intermediates`` it is absent."""
    x = jnp.zeros((1, 3, 3, 8))
    block = MultiHeadSelfAttention()
    variables = jax.eval_shape(block.init, jax.random.key(0), x)
    without = str(jax.make_jaxpr(lambda v: block.apply(v, x))(variables))
    with_weights = str(jax.make_jaxpr(lambda v: block.apply(v, x, mutable=["intermediates"]))(variables))
    assert with_weights.count(" exp ") == without.count(" exp ") + 1 >= 2


@pytest.mark.parametrize("shift", [(1, 0), (0, 2), (2, 3)])
def test_position_code_breaks_translation_equivariance(shift):
    """Without positions, self-attention with 1x1 projections commutes with moving the content (a cyclic shift
    here): f(shift(x)) = shift(f(x)). The position code is what makes the output depend on where content is."""
    x = random_images((2, 5, 9, 24), seed=7)
    variables = random_variables(MultiHeadSelfAttention(), x)
    run = jit_apply()

    def moved(t):
        return jnp.roll(t, shift, axis=(1, 2))

    y_of_moved, _ = run(variables, moved(x))
    y, _ = run(variables, x)
    assert np.abs(y_of_moved - moved(y)).max() > 1e-2


def test_position_code_layout_and_any_size_at_call_time():
    code = sinusoidal_position_encoding_2d(5, 7, 12)
    chex.assert_shape(code, (5, 7, 12))
    i, j = np.arange(5)[:, None], np.arange(7)[None, :]
    np.testing.assert_allclose(code[..., 0], np.broadcast_to(np.sin(i), (5, 7)), atol=1e-6)  # rows: first C//2
    np.testing.assert_allclose(code[..., 1], np.broadcast_to(np.cos(i), (5, 7)), atol=1e-6)
    np.testing.assert_allclose(code[..., 6], np.broadcast_to(np.sin(j), (5, 7)), atol=1e-6)  # columns: the rest
    np.testing.assert_allclose(code[..., 9], np.broadcast_to(np.cos(j / 10000 ** (2 / 6)), (5, 7)), atol=1e-6)
    # The parameters do not depend on H, W: those made at 4x4 run at 6x3.
    variables = random_variables(MultiHeadSelfAttention(), jnp.zeros((1, 4, 4, 8)))
    chex.assert_shape(jit_apply()(variables, random_images((2, 6, 3, 8)))[0], (2, 6, 3, 8))
