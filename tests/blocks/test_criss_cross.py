"""Criss-cross attention: PyTorch parity (R = 1 and 2), identity at init, the map's layout and mask, gradients."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from block_harness import TOL, jit_intermediates, load
from jax.test_util import check_grads
from torch import nn
from torch_reference import random_images, random_variables

from attnjax.blocks.criss_cross import CrissCrossAttention, criss_cross_attention
from attnjax.compare.pytorch import nchw_to_nhwc, nhwc_to_nchw

pytestmark = pytest.mark.torch

# 9: odd C (C // 8 = 1, floored to 8); 3: C < 8; 1x1, 1xW, Hx1 and 5x9 maps.
SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 4, 3, 9), (2, 1, 6, 3), (1, 5, 1, 8)]


class TorchCrissCross(nn.Module):
    """Huang et al. 2019, NCHW, written as masked full attention: position u attends to the positions j with
    row(j) == row(u) or col(j) == col(u) (H + W - 1 of them, u once), one softmax; y = x + gamma * A V.

    Returns y and, per loop, the weights laid out as (N, H, W, H + W): u's column (H), then its row (W),
    u's own weight in the row part and 0 in the column part.
    """

    def __init__(self, channels: int, recurrence: int = 1):
        super().__init__()
        inner = max(channels // 8, min(channels, 8))
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(()))
        self.recurrence = recurrence

    def once(self, x):
        n, c, h, w = x.shape
        rows = torch.arange(h).repeat_interleave(w)  # row of each flattened position
        cols = torch.arange(w).repeat(h)
        on_path = (rows[:, None] == rows[None, :]) | (cols[:, None] == cols[None, :])  # (HW, HW)
        q = self.query(x).flatten(2).transpose(1, 2)  # (N, HW, C')
        k = self.key(x).flatten(2)  # (N, C', HW)
        v = self.value(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        logits = torch.bmm(q, k).masked_fill(~on_path, float("-inf"))
        a = torch.softmax(logits, dim=-1)  # (N, HW, HW), zero off the criss-cross path
        y = x + self.gamma * torch.bmm(a, v).transpose(1, 2).reshape(n, c, h, w)

        a = a.reshape(n, h, w, h, w)  # query (h, w), key (g, v)
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        column = a[:, hh, ww, :, ww].permute(2, 0, 1, 3)  # key (g, w); split advanced indices go first: (H, W, N, H)
        column = column.masked_fill(torch.eye(h, dtype=torch.bool)[:, None, :], 0.0)  # u itself: in the row part
        row = a[:, hh, ww, hh, :]  # (N, H, W, W): key (h, v)
        return y, torch.cat([column, row], dim=-1)

    def forward(self, x):
        maps = []
        for _ in range(self.recurrence):
            x, a = self.once(x)
            maps.append(a)
        return x, maps


def jit_apply(recurrence=1):
    return jit_intermediates(CrissCrossAttention(recurrence=recurrence), numpy=True)


jit_init = jax.jit(CrissCrossAttention().init)


def with_gamma(variables, gamma=0.8):
    return {"params": {**variables["params"], "gamma": jnp.float32(gamma)}}


@pytest.mark.parametrize("shape, recurrence", [(s, 1) for s in SHAPES] + [((2, 5, 9, 24), 2), ((2, 4, 3, 9), 2)])
def test_matches_pytorch(shape, recurrence):
    x = random_images(shape, seed=1)
    variables = with_gamma(random_variables(CrissCrossAttention(), x))
    y, intermediates = jit_apply(recurrence)(variables, x)
    assert not np.allclose(y, x, atol=1e-3)

    reference = load(TorchCrissCross(shape[-1], recurrence), variables)
    with torch.no_grad():
        expected, expected_maps = reference(nhwc_to_nchw(x))
    np.testing.assert_allclose(y, nchw_to_nhwc(expected), rtol=TOL, atol=TOL)
    assert len(intermediates["attention"]) == recurrence
    for got, want in zip(intermediates["attention"], expected_maps, strict=True):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_identity_at_init_and_the_map_is_a_softmax_over_the_criss_cross_path(shape):
    x = random_images(shape, seed=2)
    variables = jit_init(jax.random.key(0), x)
    assert variables["params"]["gamma"] == 0
    y, intermediates = jit_apply()(variables, x)
    np.testing.assert_array_equal(np.asarray(y), x)  # gamma = 0

    assert list(intermediates) == ["attention"]
    (attention,) = intermediates["attention"]
    n, h, w, _ = shape
    chex.assert_shape(attention, (n, h, w, h + w))
    chex.assert_tree_all_finite(attention)
    assert np.all(attention >= 0)
    np.testing.assert_allclose(attention.sum(axis=-1), np.ones((n, h, w)), rtol=1e-5)
    # u's own column entry is masked: exactly zero, so u counts once (in its row).
    own_column = attention[:, np.arange(h), :, np.arange(h)]  # (H, N, W)
    np.testing.assert_array_equal(np.asarray(own_column), np.zeros((h, n, w)))


def test_output_is_the_weighted_sum_of_the_row_and_column_values():
    q, k = (random_images((2, 3, 4, 5), seed=s) for s in (3, 4))
    v = random_images((2, 3, 4, 6), seed=5)
    out, a = criss_cross_attention(q, k, v)
    h, w = 3, 4
    for hi in range(h):
        for wi in range(w):
            expected = np.einsum("ng,ngc->nc", a[:, hi, wi, :h], v[:, :, wi]) + np.einsum(
                "nv,nvc->nc", a[:, hi, wi, h:], v[:, hi]
            )
            np.testing.assert_allclose(out[:, hi, wi], expected, rtol=1e-5, atol=1e-6)


def test_two_loops_reach_every_position():
    """After one loop a position depends on its row and column only; after two (RCCA) on the whole map."""
    x = random_images((1, 4, 5, 8), seed=6)
    variables = with_gamma(random_variables(CrissCrossAttention(), x))

    def output_at_corner(recurrence, x):
        return CrissCrossAttention(recurrence=recurrence).apply(variables, x)[0, 0, 0].sum()

    for recurrence, reached in ((1, False), (2, True)):
        grad = jax.jit(jax.grad(functools.partial(output_at_corner, recurrence)))(x)
        off_path = np.asarray(grad)[0, 1:, 1:]  # positions in neither row 0 nor column 0
        assert (np.abs(off_path).max() > 1e-6) == reached


@pytest.mark.parametrize("channels, inner", [(64, 8), (128, 16), (24, 8), (9, 8), (3, 3)])
def test_reduced_width_is_c_over_8_with_a_floor(channels, inner):
    params = jax.eval_shape(CrissCrossAttention().init, jax.random.key(0), jnp.zeros((1, 2, 2, channels)))["params"]
    chex.assert_shape(params["query"]["kernel"], (1, 1, channels, inner))
    chex.assert_shape(params["key"]["kernel"], (1, 1, channels, inner))
    chex.assert_shape(params["value"]["kernel"], (1, 1, channels, channels))
    # RCCA shares the weights: the same parameters for any recurrence.
    rcca = jax.eval_shape(CrissCrossAttention(recurrence=2).init, jax.random.key(0), jnp.zeros((1, 2, 2, channels)))
    chex.assert_trees_all_equal_shapes(rcca["params"], params)


def test_pure_function_has_correct_gradients():
    q, k = (random_images((2, 3, 2, 4), seed=s) for s in (7, 8))
    v = random_images((2, 3, 2, 5), seed=9)
    check_grads(jax.jit(criss_cross_attention), (q, k, v), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
