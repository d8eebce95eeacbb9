"""Bottleneck (BoTNet MHSA): PyTorch parity of output and map, timm parity with timm's widths, relative logits, heads
rule, size binding, properties."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from block_harness import check_forward, jit_intermediates, plain, setup
from timm_blocks import check_against_timm, create_attn, load_timm
from torch import nn
from torch_reference import random_images, random_variables, torch_state_with_stats

from attnjax.blocks.bottleneck import BottleneckAttention
from attnjax.validate import InputError

pytestmark = pytest.mark.torch


class TorchBottleneck(nn.Module):
    """Srinivas et al. 2021, the MHSA layer of a BoT block, NCHW, written per pair of positions.

    For query position (y, x) and key position (y', x'):
    logit = q.k / sqrt(d) + q . (r^H[y' - y] + r^W[x' - x])  (unscaled relative term, or both scaled),
    softmax over all keys, weighted sum of the values. Tables hold offsets -(H-1)..H-1 at rows 0..2H-2.
    """

    def __init__(self, channels, size, heads, dim_head=None, qkv_bias=False, scale_pos_embed=False):
        super().__init__()
        self.heads, self.d_v = heads, channels // heads
        self.d = dim_head or self.d_v
        self.scale_pos_embed = scale_pos_embed
        h, w = size
        self.qkv = nn.Conv2d(channels, 2 * heads * self.d + channels, 1, bias=qkv_bias)
        self.height_rel = nn.Parameter(torch.zeros(2 * h - 1, self.d))
        self.width_rel = nn.Parameter(torch.zeros(2 * w - 1, self.d))

    def forward(self, x):
        n, c, h, w = x.shape
        heads, d = self.heads, self.d
        q, k, v = torch.split(self.qkv(x), [heads * d, heads * d, c], dim=1)
        q, k = (t.reshape(n, heads, d, h * w).transpose(2, 3) for t in (q, k))  # (N, heads, P, d)
        v = v.reshape(n, heads, self.d_v, h * w).transpose(2, 3)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)  # row-major positions
        r = self.height_rel[ys[None, :] - ys[:, None] + h - 1] + self.width_rel[xs[None, :] - xs[:, None] + w - 1]
        content = q @ k.transpose(2, 3)  # (N, heads, P, P)
        relative = torch.einsum("nhid,ijd->nhij", q, r)
        scale = 1 / math.sqrt(d)
        logits = (content + relative) * scale if self.scale_pos_embed else content * scale + relative
        a = torch.softmax(logits, dim=-1)
        return (a @ v).transpose(2, 3).reshape(n, c, h, w), a


jit_apply = jit_intermediates


# (shape, options, heads the reference gets): odd sizes, C not divisible by 4, 1x1, all options.
CASES = [
    ((2, 8, 8, 32), {}, 4),
    ((1, 7, 7, 13), {}, 1),
    ((3, 1, 1, 12), {}, 4),
    ((2, 5, 9, 24), {}, 4),
    ((2, 4, 6, 18), {}, 3),
    ((2, 3, 5, 20), {"num_heads": 2, "dim_head": 6, "qkv_bias": True, "scale_pos_embed": True}, 2),
    ((1, 6, 2, 8), {"num_heads": 1}, 1),
]


@pytest.mark.parametrize("shape, options, heads", CASES)
def test_output_and_map_match_pytorch(shape, options, heads):
    block = BottleneckAttention(**options)
    reference = TorchBottleneck(
        shape[-1],
        shape[1:3],
        heads,
        options.get("dim_head"),
        options.get("qkv_bias", False),
        options.get("scale_pos_embed", False),
    )
    x, variables, reference = setup(block, reference, shape, seed=1, variables_seed=2)
    check_forward(block, x, variables, reference, maps=[("attention", plain)])


@pytest.mark.parametrize("shape", [(2, 7, 7, 13), (2, 1, 1, 3), (3, 5, 9, 37), (2, 4, 4, 64)])
def test_default_block_keeps_the_shape_and_rows_sum_to_one(shape):
    x = random_images(shape)
    block = BottleneckAttention()
    variables = jax.jit(block.init)(jax.random.key(0), x)
    y, intermediates = jit_apply(block)(variables, x)
    (weights,) = intermediates["attention"]
    n, h, w, c = shape
    heads = max(d for d in range(1, 5) if c % d == 0)
    chex.assert_shape(y, shape)
    chex.assert_shape(weights, (n, heads, h * w, h * w))
    chex.assert_tree_all_finite((y, weights, variables))
    assert jnp.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(axis=-1), np.ones((n, heads, h * w)), rtol=1e-5)


@pytest.mark.parametrize("channels, heads", [(13, 1), (3, 3), (37, 1), (64, 4), (18, 3), (6, 3), (8, 4), (2, 2)])
def test_default_heads_are_the_largest_divisor_of_c_up_to_4(channels, heads):
    x = jnp.zeros((1, 3, 3, channels))
    params = jax.eval_shape(BottleneckAttention().init, jax.random.key(0), x)["params"]
    d = channels // heads
    chex.assert_shape(params["qkv"]["kernel"], (1, 1, channels, 3 * channels))
    chex.assert_shape(params["height_rel"], (5, d))
    apply = functools.partial(BottleneckAttention().apply, mutable=["intermediates"])
    shapes = jax.eval_shape(apply, {"params": params}, x)
    chex.assert_shape(shapes[1]["intermediates"]["attention"][0], (1, heads, 9, 9))


def test_init_follows_timm():
    """qkv kernel ~ N(0, 1/C), tables ~ N(0, 1/d), both cut to [-2, 2]; no biases."""
    x = jnp.zeros((1, 16, 16, 256))
    params = jax.jit(BottleneckAttention().init)(jax.random.key(0), x)["params"]
    assert set(params) == {"qkv", "height_rel", "width_rel"} and set(params["qkv"]) == {"kernel"}
    np.testing.assert_allclose(np.std(params["qkv"]["kernel"]), 256**-0.5, rtol=0.02)
    np.testing.assert_allclose(np.std(params["height_rel"]), 64**-0.5, rtol=0.05)
    assert np.abs(params["height_rel"]).max() <= 2


def test_relative_logits_make_the_block_depend_on_position():
    """With q.k alone (tables at zero) the layer commutes with a cyclic shift of the map; the tables break that."""
    x = random_images((2, 5, 6, 8), seed=3)
    block = BottleneckAttention()
    variables = random_variables(block, x, seed=4)
    run = jit_apply(block)

    def moved(t):
        return jnp.roll(t, (1, 2), axis=(1, 2))

    zeroed = {"params": {**variables["params"], "height_rel": 0 * variables["params"]["height_rel"]}}
    zeroed["params"]["width_rel"] = 0 * variables["params"]["width_rel"]
    np.testing.assert_allclose(run(zeroed, moved(x))[0], moved(run(zeroed, x)[0]), rtol=1e-5, atol=1e-5)
    assert np.abs(run(variables, moved(x))[0] - moved(run(variables, x)[0])).max() > 1e-2


def test_other_sizes_are_a_clear_error_naming_the_bound_size_and_the_fix():
    block = BottleneckAttention()
    variables = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 5, 9, 8)))
    chex.assert_shape(jax.eval_shape(block.apply, variables, jnp.ones((3, 5, 9, 8))), (3, 5, 9, 8))  # any batch
    with pytest.raises(InputError, match=r"bound to 5x9 feature maps .*input is 9x5.*initialise a new block"):
        jax.eval_shape(block.apply, variables, jnp.zeros((1, 9, 5, 8)))
    with pytest.raises(InputError, match=r"bound to 4x4 feature maps \(feat_size=4\), but the input is 5x5"):
        jax.eval_shape(BottleneckAttention(feat_size=4).init, jax.random.key(0), jnp.zeros((1, 5, 5, 8)))
    params = jax.eval_shape(BottleneckAttention(feat_size=(3, 4)).init, jax.random.key(0), jnp.zeros((1, 3, 4, 8)))
    chex.assert_shape((params["params"]["height_rel"], params["params"]["width_rel"]), [(5, 2), (7, 2)])  # 4 heads of 2


# timm 1.0.29's BottleneckAttn (create_attn('bottleneck')): timm's width rule through qk_ratio.

TIMM_NAMES = {"height_rel": "pos_embed.height_rel", "width_rel": "pos_embed.width_rel"}


@pytest.mark.parametrize(
    "shape, options",
    [
        ((2, 5, 4, 20), {"qk_ratio": 1.0}),  # timm's defaults: 4 heads, q/k make_divisible(20, 8) / 4 = 6 (attnjax: 5)
        ((2, 4, 4, 64), {"qk_ratio": 0.5, "num_heads": 2, "qkv_bias": True, "scale_pos_embed": True}),
        ((1, 3, 5, 36), {"qk_ratio": 1.0, "num_heads": 3, "dim_head": 7}),  # dim_head wins, as in timm
    ],
)
def test_timm_options_give_timms_parameters_and_output(shape, options):
    block = BottleneckAttention(**options)
    x = random_images(shape, 1)
    variables = random_variables(block, x, 2)
    reference = create_attn("bottleneck", shape[-1], feat_size=shape[1:3], **options)
    check_against_timm(block, x, variables, load_timm(reference, torch_state_with_stats(variables), TIMM_NAMES))


def test_default_widths_are_attnjax_rule_and_timms_an_option():
    x = jnp.zeros((1, 3, 3, 20))
    for options, d in [({}, 5), ({"qk_ratio": 1.0}, 6)]:
        params = jax.eval_shape(BottleneckAttention(**options).init, jax.random.key(0), x)["params"]
        chex.assert_shape((params["qkv"]["kernel"], params["height_rel"]), [(1, 1, 20, 8 * d + 20), (5, d)])
    assert create_attn("bottleneck", 20, feat_size=3).dim_head_qk == 6


def test_timm_widths_refuse_what_timm_refuses():
    """18 channels: timm's 4 heads do not divide them (timm asserts); attnjax's default takes 3 heads."""
    with pytest.raises(AssertionError):
        create_attn("bottleneck", 18, feat_size=3)
    x = jnp.zeros((1, 3, 3, 18))
    with pytest.raises(
        InputError, match=r"^BottleneckAttention: timm's widths \(qk_ratio=1.0\) take num_heads=max_heads=4"
    ):
        jax.eval_shape(BottleneckAttention(qk_ratio=1.0).init, jax.random.key(0), x)
    with pytest.raises(InputError, match=r"(?m)^BottleneckAttention: qk_ratio must be > 0 or None, got 0$"):
        jax.eval_shape(BottleneckAttention(qk_ratio=0).init, jax.random.key(0), x)
    params = jax.eval_shape(BottleneckAttention().init, jax.random.key(0), x)["params"]
    chex.assert_shape(params["height_rel"], (5, 6))
