"""Bottleneck (BoTNet MHSA): PyTorch parity of output and map, relative logits, heads rule, size binding, properties."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads
from torch import nn
from torch_reference import flax_to_torch_state, nhwc_to_nchw, random_images, random_variables

from attnjax.blocks.bottleneck import BottleneckAttention
from attnjax.blocks.relative_position import rel_to_abs, relative_logits_1d, relative_logits_2d
from attnjax.validate import InputError

TOL = 1e-5


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


@functools.cache
def jit_apply(block):
    apply = jax.jit(functools.partial(block.apply, mutable=["intermediates"]))

    def run(variables, x):
        y, state = apply(variables, x)
        return y, state["intermediates"]

    return run


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
    x = random_images(shape, seed=1)
    block = BottleneckAttention(**options)
    variables = random_variables(block, x, seed=2)
    y, intermediates = jit_apply(block)(variables, x)
    reference = TorchBottleneck(
        shape[-1],
        shape[1:3],
        heads,
        options.get("dim_head"),
        options.get("qkv_bias", False),
        options.get("scale_pos_embed", False),
    )
    reference.load_state_dict(flax_to_torch_state(variables["params"]), strict=True)
    with torch.no_grad():
        expected, expected_a = reference(nhwc_to_nchw(x))
    np.testing.assert_allclose(y, expected.numpy().transpose(0, 2, 3, 1), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(intermediates["attention"][0], expected_a.numpy(), rtol=TOL, atol=TOL)


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


def test_rel_to_abs_is_the_offset_lookup_and_has_gradients():
    for q_len, k_len in [(5, 5), (1, 1), (3, 7), (4, 10), (2, 2)]:
        x = random_images((2, 3, q_len, q_len + k_len - 1), seed=q_len)
        i, j = np.arange(q_len)[:, None], np.arange(k_len)[None, :]
        np.testing.assert_array_equal(jax.jit(rel_to_abs, static_argnums=1)(x, k_len), x[..., i, j - i + q_len - 1])
    q, table = random_images((2, 4, 3), seed=1), random_images((7, 3), seed=2)
    logits = jax.jit(lambda q, t: relative_logits_1d(q, t, 4))
    check_grads(logits, (q, table), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
    with pytest.raises(InputError, match="need 9 offsets, got 8"):
        rel_to_abs(jnp.zeros((5, 8)), 5)


def test_relative_logits_2d_depend_on_offsets_only():
    """Moving a query and its key by the same amount keeps the relative logit, for the same query vector."""
    q = jnp.broadcast_to(jnp.asarray(random_images((1, 1, 1, 6))), (2, 4, 5, 6))
    logits = jax.jit(relative_logits_2d, static_argnums=3)(
        q, random_images((7, 6), seed=1), random_images((9, 6), seed=2), (4, 5)
    )
    chex.assert_shape(logits, (2, 4, 5, 4, 5))
    np.testing.assert_allclose(logits[:, 0, 0, 1, 2], logits[:, 2, 1, 3, 3], rtol=1e-6)
    assert not np.allclose(logits[:, 0, 0, 1, 2], logits[:, 0, 0, 2, 1])


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


@pytest.mark.parametrize(
    "options, channels, message",
    [
        ({"num_heads": 3}, 16, r"num_heads=3 does not divide the 16 input channels.*divisors of 16: 1, 2, 4, 8, 16"),
        ({"num_heads": 0}, 8, "num_heads=0 does not divide"),
        ({"dim_head": 0}, 8, "dim_head must be >= 1"),
    ],
)
def test_bad_options_are_clear_errors(options, channels, message):
    with pytest.raises(InputError, match=message):
        BottleneckAttention(**options).init(jax.random.key(0), jnp.zeros((1, 3, 3, channels)))


@pytest.mark.parametrize("shape", [(8, 8, 3), (1, 2, 8, 8, 3)])
def test_wrong_rank_names_the_expected_layout(shape):
    with pytest.raises(ValueError, match=r"BottleneckAttention expects .*NHWC, rank 4.*got shape"):
        BottleneckAttention().init(jax.random.key(0), jnp.zeros(shape))
