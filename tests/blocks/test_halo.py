"""Halo (HaloNet): PyTorch parity of output, map and gradients, timm parity with timm's widths and tables, padding of
odd sizes, locality, heads rule, errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import TOL, apply_jit, check_gradients, jit_intermediates, setup, sown_maps
from timm_blocks import check_against_timm, create_attn, load_timm
from torch import nn
from torch_reference import random_images, random_variables, torch_state_with_stats

from attnjax.blocks.halo import HaloAttention
from attnjax.compare.pytorch import nchw_to_nhwc, nhwc_to_nchw
from attnjax.validate import InputError

pytestmark = pytest.mark.torch


class TorchHalo(nn.Module):
    """Vaswani et al. 2021, blocked local self-attention with a halo, NCHW, written per query position.

    The query at (y, x) lies in block (y // b, x // b); its keys are the (b + 2h)^2 positions
    (y', x') with y' in [b (y // b) - h, b (y // b) + b + h) (likewise x'), zero keys and values
    outside the image. logit = q.k / sqrt(d) + q . (r^H[y' - y] + r^W[x' - x]), with the tables
    holding offsets -(b + h - 1) .. b + h - 1 at rows 0 .. 2(b + h) - 2; softmax over the window.
    Per-head channels of the kv conv: d key channels, then C / heads value channels.
    Returns the output and the weights (N, heads, H, W, window^2).
    """

    def __init__(self, channels, heads, block_size, halo_size, dim_head=None, qkv_bias=False, scale_pos_embed=False):
        super().__init__()
        self.heads, self.d_v = heads, channels // heads
        self.d = dim_head or self.d_v
        self.b, self.halo, self.scale_pos_embed = block_size, halo_size, scale_pos_embed
        self.q = nn.Conv2d(channels, heads * self.d, 1, bias=qkv_bias)
        self.kv = nn.Conv2d(channels, heads * (self.d + self.d_v), 1, bias=qkv_bias)
        rows = 2 * (block_size + halo_size) - 1
        self.height_rel = nn.Parameter(torch.zeros(rows, self.d))
        self.width_rel = nn.Parameter(torch.zeros(rows, self.d))

    def forward(self, x):
        n, c, h, w = x.shape
        heads, d, b, halo = self.heads, self.d, self.b, self.halo
        window = b + 2 * halo
        q = self.q(x).reshape(n, heads, d, h, w)
        kv = self.kv(x).reshape(n, heads, d + self.d_v, h, w)
        big = b + 2 * halo  # enough zeros below/right for the last block's window
        kv = F.pad(kv, (halo, big, halo, big))  # image position p sits at padded index p + halo

        def starts(length):  # (length, window): image coordinates of each query's window
            return (torch.arange(length) // b * b - halo)[:, None] + torch.arange(window)[None, :]

        key_y, key_x = starts(h), starts(w)
        windows = kv[
            :, :, :, key_y[:, None, :, None] + halo, key_x[None, :, None, :] + halo
        ]  # (n, heads, ., h, w, win, win)
        k, v = windows[:, :, :d], windows[:, :, d:]
        centre = b + halo - 1
        r_h = self.height_rel[key_y - torch.arange(h)[:, None] + centre]  # (h, win, d)
        r_w = self.width_rel[key_x - torch.arange(w)[:, None] + centre]  # (w, win, d)
        relative = (
            torch.einsum("nhdyx,yrd->nhyxr", q, r_h)[..., :, None]
            + torch.einsum("nhdyx,xsd->nhyxs", q, r_w)[..., None, :]
        )
        content = torch.einsum("nhdyx,nhdyxrs->nhyxrs", q, k)
        scale = 1 / math.sqrt(d)
        logits = (content + relative) * scale if self.scale_pos_embed else content * scale + relative
        a = torch.softmax(logits.reshape(n, heads, h, w, window * window), dim=-1)
        o = torch.einsum("nhyxk,nhdyxk->nhdyx", a, v.reshape(n, heads, self.d_v, h, w, window * window))
        return o.reshape(n, c, h, w), a


def reference_for(shape, options):
    channels = shape[-1]
    heads = options.get("num_heads") or max(g for g in range(1, 9) if channels % g == 0)
    return TorchHalo(
        channels,
        heads,
        options.get("block_size", 8),
        options.get("halo_size", 3),
        options.get("dim_head"),
        options.get("qkv_bias", False),
        options.get("scale_pos_embed", False),
    )


def map_per_query(weights, shape):
    """The block's (N, heads, nh, nw, b*b, win*win) map as (N, heads, H, W, win*win), padded queries cropped."""
    n, heads, nh, nw, bb, ww = weights.shape
    b = math.isqrt(bb)
    per_query = weights.reshape(n, heads, nh, nw, b, b, ww).transpose(0, 1, 2, 4, 3, 5, 6)
    return per_query.reshape(n, heads, nh * b, nw * b, ww)[:, :, : shape[1], : shape[2]]


jit_apply = jit_intermediates


CASES = [
    ((2, 16, 16, 16), {}),  # timm's defaults, divisible: b = 8, h = 3, 8 heads
    ((1, 7, 7, 13), {}),  # padded to 8x8, one head
    ((2, 1, 1, 3), {}),
    ((2, 5, 9, 24), {"block_size": 4, "halo_size": 1}),
    ((2, 12, 8, 32), {"block_size": 4, "halo_size": 2, "num_heads": 2, "dim_head": 6, "qkv_bias": True}),
    ((1, 9, 7, 8), {"block_size": 2, "halo_size": 3, "scale_pos_embed": True}),  # halo wider than the block
    ((1, 6, 10, 12), {"block_size": 3, "halo_size": 0, "num_heads": 3}),
]


@pytest.mark.parametrize("shape, options", CASES)
def test_output_and_map_match_pytorch(shape, options):
    block = HaloAttention(**options)
    x, variables, reference = setup(block, reference_for(shape, options), shape, seed=1, variables_seed=2)
    y, state = apply_jit(block, variables, x)
    with torch.no_grad():
        expected, expected_a = reference(nhwc_to_nchw(x))
    np.testing.assert_allclose(y, nchw_to_nhwc(expected), rtol=TOL, atol=TOL)
    weights = sown_maps(state)["attention"]
    np.testing.assert_allclose(map_per_query(weights, shape), expected_a.numpy(), rtol=TOL, atol=TOL)
    assert jnp.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(axis=-1), np.ones(weights.shape[:-1]), rtol=1e-5)  # padded rows too


@pytest.mark.parametrize(
    "shape, options",
    [((2, 7, 7, 13), {}), ((2, 6, 10, 12), {"block_size": 4, "halo_size": 1, "num_heads": 2, "qkv_bias": True})],
)
def test_gradients_match_pytorch_autograd(shape, options):
    """d/dx and d/dparams of sum(y * g), float64 in both frameworks."""
    block = HaloAttention(**options)
    x, variables, reference = setup(block, reference_for(shape, options), shape, seed=3, variables_seed=4)
    cotangent = np.random.default_rng(5).normal(size=shape)
    _, grad_params = check_gradients(block, x, variables, reference, cotangent, float64=True)
    assert np.abs(grad_params["height_rel"]).max() > 0


def test_odd_sizes_equal_the_zero_padded_map_cropped():
    """At its positions a 7x7 map gives what the zero-padded 8x8 or 16x16 map gives: padding is zeros, as the halo."""
    x = random_images((2, 7, 7, 13), seed=6)
    block = HaloAttention()
    variables = random_variables(block, x, seed=7)
    run = jit_apply(block)
    y, _ = run(variables, x)
    for size in (8, 16):
        padded = np.zeros((2, size, size, 13), np.float32)
        padded[:, :7, :7] = x
        np.testing.assert_allclose(run(variables, padded)[0][:, :7, :7], y, rtol=1e-5, atol=1e-6)


def test_outputs_depend_only_on_the_haloed_window():
    """Block (0, 0) of a 12x12 map with b = 4, h = 1 sees rows and columns -1..4: changing x at 5 and beyond
    leaves its outputs unchanged, changing x at 4 does not."""
    x = random_images((1, 12, 12, 8), seed=8)
    block = HaloAttention(block_size=4, halo_size=1)
    variables = random_variables(block, x, seed=9)
    run = jit_apply(block)
    y, _ = run(variables, x)
    far, near = x.copy(), x.copy()
    far[:, 5:, :] += 3.0
    far[:, :, 5:] += 3.0
    near[:, 4, 4] += 3.0
    np.testing.assert_array_equal(run(variables, far)[0][:, :4, :4], y[:, :4, :4])
    assert np.abs(run(variables, near)[0][:, :4, :4] - y[:, :4, :4]).min() > 0


@pytest.mark.parametrize("shape", [(2, 7, 7, 13), (2, 1, 1, 3), (3, 5, 9, 37)])
def test_default_block_on_the_catalogue_shapes(shape):
    x = random_images(shape)
    block = HaloAttention()
    variables = jax.jit(block.init)(jax.random.key(0), x)
    y, intermediates = jit_apply(block)(variables, x)
    (weights,) = intermediates["attention"]
    n, h, w, c = shape
    heads = max(g for g in range(1, 9) if c % g == 0)
    chex.assert_shape(y, shape)
    chex.assert_shape(weights, (n, heads, -(-h // 8), -(-w // 8), 64, 196))
    chex.assert_tree_all_finite((y, weights, variables))
    np.testing.assert_allclose(weights.sum(axis=-1), np.ones(weights.shape[:-1]), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(block.apply)(variables, x[:1]), y[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels, heads", [(13, 1), (3, 3), (37, 1), (64, 8), (24, 8), (12, 6), (20, 5), (7, 7)])
def test_default_heads_are_the_largest_divisor_of_c_up_to_8(channels, heads):
    x = jnp.zeros((1, 4, 4, channels))
    params = jax.eval_shape(HaloAttention().init, jax.random.key(0), x)["params"]
    d = channels // heads
    chex.assert_shape(params["q"]["kernel"], (1, 1, channels, channels))
    chex.assert_shape(params["kv"]["kernel"], (1, 1, channels, 2 * channels))
    chex.assert_shape((params["height_rel"], params["width_rel"]), [(21, d), (21, d)])  # 2 (b + h) - 1 rows


def test_init_follows_timm_and_any_size_runs_with_the_same_parameters():
    block = HaloAttention()
    params = jax.jit(block.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 256)))["params"]
    assert set(params) == {"q", "kv", "height_rel", "width_rel"} and set(params["kv"]) == {"kernel"}
    np.testing.assert_allclose(np.std(params["kv"]["kernel"]), 256**-0.5, rtol=0.02)
    np.testing.assert_allclose(np.std(params["height_rel"]), 32**-0.5, rtol=0.1)
    assert np.abs(params["height_rel"]).max() <= 2
    shapes = jax.eval_shape(block.apply, {"params": params}, jnp.zeros((2, 11, 3, 256)))
    chex.assert_shape(shapes, (2, 11, 3, 256))


# timm 1.0.29's HaloAttn (create_attn('halo')): timm's width rule through qk_ratio, its tables with full_tables.

TIMM_NAMES = {"height_rel": "pos_embed.height_rel", "width_rel": "pos_embed.width_rel"}
TIMM_CASES = [
    ((2, 8, 8, 64), {"qk_ratio": 1.0}),  # timm's defaults: 8 heads, b = 8, h = 3
    ((2, 8, 8, 20), {"qk_ratio": 1.0, "num_heads": 4, "block_size": 4, "halo_size": 1}),  # q/k 6 (attnjax: 5)
    (
        (1, 6, 9, 24),
        {"qk_ratio": 0.5, "num_heads": 2, "block_size": 3, "halo_size": 2, "qkv_bias": True, "scale_pos_embed": True},
    ),
]


def setup_timm_halo(shape, options):
    block = HaloAttention(**options, full_tables=True)
    x = random_images(shape, 1)
    variables = random_variables(block, x, 2)
    reference = create_attn("halo", shape[-1], **options)
    return block, x, variables, load_timm(reference, torch_state_with_stats(variables), TIMM_NAMES)


@pytest.mark.parametrize("shape, options", TIMM_CASES)
def test_timm_options_give_timms_parameters_and_output(shape, options):
    check_against_timm(*setup_timm_halo(shape, options))


@pytest.mark.parametrize("shape, options", TIMM_CASES[1:])
def test_timms_tables_load_into_the_default_layout_as_their_last_rows(shape, options):
    """Without ``full_tables`` the tables are timm's rows 2h onwards: the same output, without the unread rows."""
    _, x, variables, reference = setup_timm_halo(shape, options)
    halo = options["halo_size"]
    params = {**variables["params"], **{t: variables["params"][t][2 * halo :] for t in ("height_rel", "width_rel")}}
    check_against_timm(HaloAttention(**options), x, {"params": params}, reference)


def test_at_100_channels_the_default_takes_5_heads_and_timms_widths_refuse_as_timm_does():
    with pytest.raises(AssertionError):
        create_attn("halo", 100)
    x = jnp.zeros((1, 8, 8, 100))
    params = jax.eval_shape(HaloAttention().init, jax.random.key(0), x)["params"]
    chex.assert_shape(params["height_rel"], (21, 20))  # 5 heads of 20 channels
    with pytest.raises(InputError, match=r"^HaloAttention: timm's widths \(qk_ratio=1.0\) take num_heads=max_heads=8"):
        jax.eval_shape(HaloAttention(qk_ratio=1.0).init, jax.random.key(0), x)
    with pytest.raises(InputError, match=r"^HaloAttention: num_heads=8 does not divide the 100 input channels"):
        jax.eval_shape(HaloAttention(num_heads=8).init, jax.random.key(0), x)
    params = jax.eval_shape(HaloAttention(qk_ratio=1.0, num_heads=4).init, jax.random.key(0), x)["params"]
    chex.assert_shape((params["q"]["kernel"], params["height_rel"]), [(1, 1, 100, 104), (21, 26)])
    assert create_attn("halo", 100, num_heads=4).dim_head_qk == 26
