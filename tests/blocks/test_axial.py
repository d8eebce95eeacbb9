"""Axial attention: PyTorch parity, heads rule, span bound at init, softmax maps, relative offsets, gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from block_harness import check_forward, jit_intermediates, load, plain
from jax.test_util import check_grads
from torch import nn
from torch_reference import random_images, random_variables

from attnjax.blocks.axial import AxialAttention, axial_attention_1d, relative_embeddings
from attnjax.blocks.primitives import resolve_heads
from attnjax.validate import InputError

pytestmark = pytest.mark.torch

# (shape, max_heads option): heads used = the largest divisor of C up to it.
CASES = [
    ((2, 8, 8, 64), 8),  # 8 heads, d_v = 8, d_qk = 4
    ((1, 7, 7, 16), 8),  # 8 heads, d_v = 2, d_qk = 1
    ((3, 1, 1, 32), 8),  # 1x1: one position per line
    ((2, 5, 9, 24), 8),  # 8 heads, odd d_v = 3, d_qk = 1
    ((2, 4, 3, 15), 8),  # 5 heads, d_v = 3
    ((2, 6, 5, 13), 8),  # prime C: 1 head, d_v = 13, d_qk = 6
    ((1, 5, 6, 12), 2),  # 2 heads, d_v = 6, d_qk = 3
]


class TorchAxialLayer(nn.Module):
    """Wang et al. 2020, eq. 4, along the height (axis 2 of NCHW) or the width (axis 3), global over the line.

    l = q_o.k_p + q_o.r^q_{p-o} + k_p.r^k_{p-o}, a = softmax_p(l), y_o = sum_p a (v_p + r^v_{p-o}),
    with one table of 2 S - 1 offsets [r^q | r^k | r^v] shared by the heads; 1x1 projection without bias.
    """

    def __init__(self, channels, heads, span, width):
        super().__init__()
        self.heads, self.width = heads, width
        self.d_v = channels // heads
        self.d_qk = max(self.d_v // 2, 1)
        self.qkv = nn.Conv2d(channels, heads * (2 * self.d_qk + self.d_v), 1, bias=False)
        self.relative = nn.Parameter(torch.zeros(2 * span - 1, 2 * self.d_qk + self.d_v))

    def forward(self, x):
        if self.width:  # attend along W: treat W as the "height" of the transposed map
            x = x.transpose(2, 3)
        n, c, length, other = x.shape
        qkv = self.qkv(x).reshape(n, self.heads, 2 * self.d_qk + self.d_v, length, other)
        q, k, v = qkv.split([self.d_qk, self.d_qk, self.d_v], dim=2)  # (N, heads, d, L, other)
        span = (self.relative.shape[0] + 1) // 2
        o, p = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
        r = self.relative[p - o + span - 1]  # (L_o, L_p, d): the offset p - o
        rq, rk, rv = r.split([self.d_qk, self.d_qk, self.d_v], dim=-1)
        logits = (
            torch.einsum("ngcox,ngcpx->ngoxp", q, k)
            + torch.einsum("ngcox,opc->ngoxp", q, rq)
            + torch.einsum("ngcpx,opc->ngoxp", k, rk)
        )
        a = torch.softmax(logits, dim=-1)  # (N, heads, L, other, L)
        y = torch.einsum("ngoxp,ngcpx->ngcox", a, v) + torch.einsum("ngoxp,opc->ngcox", a, rv)
        y = y.reshape(n, c, length, other)
        if self.width:
            return y.transpose(2, 3), a.transpose(2, 3)  # a: (N, heads, H, W, W)
        return y, a  # a: (N, heads, H, W, H)


class TorchAxial(nn.Module):
    def __init__(self, channels, heads, spans):
        super().__init__()
        self.height_attention = TorchAxialLayer(channels, heads, spans[0], width=False)
        self.width_attention = TorchAxialLayer(channels, heads, spans[1], width=True)

    def forward(self, x):
        y, a_h = self.height_attention(x)
        y, a_w = self.width_attention(y)
        return y, a_h, a_w


def jit_apply(max_heads=8, max_span=None):
    return jit_intermediates(AxialAttention(max_heads=max_heads, max_span=max_span), numpy=True)


def torch_reference(variables, channels, heads):
    params = variables["params"]
    spans = [(params[axis]["relative"].shape[0] + 1) // 2 for axis in ("height_attention", "width_attention")]
    return load(TorchAxial(channels, heads, spans), variables)


def check_against_pytorch(variables, x, heads, max_heads=8, max_span=None):
    block = AxialAttention(max_heads=max_heads, max_span=max_span)
    reference = torch_reference(variables, x.shape[-1], heads)
    check_forward(block, x, variables, reference, maps=[("height", plain), ("width", plain)])


@pytest.mark.parametrize("shape, max_heads", CASES)
def test_matches_pytorch(shape, max_heads):
    x = random_images(shape, seed=1)
    variables = random_variables(AxialAttention(max_heads=max_heads), x)
    check_against_pytorch(variables, x, resolve_heads(shape[-1], None, max_heads, "AxialAttention"), max_heads)


def test_matches_pytorch_on_a_smaller_input_than_at_init():
    """The span is bound at init (7 x 9 here); a 5 x 4 input uses the central offsets of each table."""
    variables = random_variables(AxialAttention(), random_images((1, 7, 9, 16)))
    chex.assert_shape(
        variables["params"]["height_attention"]["relative"], (13, 2 + 2)
    )  # 2 * 7 - 1 offsets; d_qk=1, d_v=2
    chex.assert_shape(variables["params"]["width_attention"]["relative"], (17, 4))
    check_against_pytorch(variables, random_images((2, 5, 4, 16), seed=2), heads=8)


@pytest.mark.parametrize("shape, max_heads", CASES)
def test_maps_are_softmaxes_over_each_line(shape, max_heads):
    x = random_images(shape, seed=3)
    variables = random_variables(AxialAttention(max_heads=max_heads), x, seed=3)
    y, intermediates = jit_apply(max_heads)(variables, x)  # compiled by test_matches_pytorch
    chex.assert_shape(y, shape)
    assert sorted(intermediates) == ["height", "width"]
    n, h, w, c = shape
    heads = resolve_heads(c, None, max_heads, "AxialAttention")
    (height,), (width,) = intermediates["height"], intermediates["width"]
    chex.assert_shape(height, (n, heads, h, w, h))
    chex.assert_shape(width, (n, heads, h, w, w))
    chex.assert_tree_all_finite((y, height, width))
    for weights in (height, width):
        assert np.all(weights >= 0)
        np.testing.assert_allclose(weights.sum(axis=-1), np.ones(weights.shape[:-1]), rtol=1e-5)


@pytest.mark.parametrize(
    "channels, max_heads, heads",
    [
        (64, 8, 8),
        (24, 8, 8),
        (16, 8, 8),
        (12, 8, 6),
        (15, 8, 5),
        (13, 8, 1),
        (37, 8, 1),
        (3, 8, 3),
        (1, 8, 1),
        (6, 4, 3),
    ],
)
def test_heads_are_the_largest_divisor_of_c_up_to_max_heads(channels, max_heads, heads):
    assert resolve_heads(channels, None, max_heads, "AxialAttention") == heads
    x = jnp.zeros((1, 3, 4, channels))
    params = jax.eval_shape(AxialAttention(max_heads=max_heads).init, jax.random.key(0), x)["params"]
    exact = jax.eval_shape(AxialAttention(num_heads=heads).init, jax.random.key(0), x)["params"]
    assert params == exact  # num_heads sets the same count exactly
    d_v = channels // heads
    d_qk = max(d_v // 2, 1)
    for axis, span in (("height_attention", 3), ("width_attention", 4)):
        chex.assert_shape(params[axis]["qkv"]["kernel"], (1, 1, channels, heads * (2 * d_qk + d_v)))
        chex.assert_shape(params[axis]["relative"], (2 * span - 1, 2 * d_qk + d_v))


def test_longer_input_than_the_span_is_a_clear_error_and_max_span_covers_it():
    """Shapes only (``jax.eval_shape``): the checks run while tracing, nothing is compiled."""

    def init(block, shape):
        return jax.eval_shape(block.init, jax.random.key(0), jnp.zeros(shape))

    def apply(block, variables, shape):
        return jax.eval_shape(block.apply, variables, jnp.zeros(shape))

    variables = init(AxialAttention(), (1, 4, 6, 8))
    with pytest.raises(InputError, match=r"AxialAttention: the input's height is 5, longer than the span 4.*max_span"):
        apply(AxialAttention(), variables, (1, 5, 6, 8))
    with pytest.raises(InputError, match=r"the input's width is 7, longer than the span 6"):
        apply(AxialAttention(), variables, (1, 4, 7, 8))

    block = AxialAttention(max_span=10)
    variables = init(block, (1, 4, 6, 8))
    chex.assert_shape(variables["params"]["height_attention"]["relative"], (19, 3))  # 8 heads: d_v = d_qk = 1
    chex.assert_shape(apply(block, variables, (1, 10, 9, 8)), (1, 10, 9, 8))
    with pytest.raises(InputError, match=r"max_span must be >= 1"):
        init(AxialAttention(max_span=0), (1, 4, 6, 8))
    with pytest.raises(InputError, match=r"longer than the span 3"):
        init(AxialAttention(max_span=3), (1, 4, 2, 8))


def test_relative_embeddings_depend_on_the_offset_key_minus_query():
    table = jnp.arange(9.0)[:, None] * jnp.array([1.0, 10.0])  # S = 5: offsets -4 .. 4
    e = relative_embeddings(table, 3)
    chex.assert_shape(e, (3, 3, 2))
    o, p = np.meshgrid(np.arange(3), np.arange(3), indexing="ij")
    np.testing.assert_array_equal(e[..., 0], p - o + 4)


def test_position_terms_make_the_layers_position_sensitive():
    """Without the relative terms, attention along a line commutes with moving the content along it (cyclically);
    with them it does not."""
    x = random_images((2, 5, 6, 16), seed=4)
    variables = random_variables(AxialAttention(), x)
    zero_tables = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.zeros_like(v) if path[-1].key == "relative" else v, variables
    )
    run = jit_apply()

    def moved(t):
        return jnp.roll(t, (1, 2), axis=(1, 2))

    np.testing.assert_allclose(run(zero_tables, moved(x))[0], moved(run(zero_tables, x)[0]), rtol=1e-5, atol=1e-5)
    assert np.abs(run(variables, moved(x))[0] - moved(run(variables, x)[0])).max() > 1e-2


def test_an_image_gives_the_same_output_alone_as_in_a_batch():
    x = random_images((3, 5, 9, 37), seed=11)
    variables = random_variables(AxialAttention(), x)
    batched, _ = jit_apply()(variables, x)
    alone, _ = jit_apply()(variables, x[1:2])
    np.testing.assert_array_equal(batched[1:2], alone)


def test_pure_function_has_correct_gradients():
    q, k = (random_images((2, 4, 3, 2), seed=s) for s in (5, 6))
    v = random_images((2, 4, 3, 5), seed=7)
    rq, rk = (random_images((4, 4, 2), seed=s) for s in (8, 9))
    rv = random_images((4, 4, 5), seed=10)
    check_grads(jax.jit(axial_attention_1d), (q, k, v, rq, rk, rv), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
