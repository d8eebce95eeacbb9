"""StripAttention (strip): output, gate and gradients against timm 1.0.29's own StripAttn (create_attn('strip'),
with its defaults and other options), and its properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from block_harness import assert_gated, check_gradients, random_maps
from timm_blocks import check_against_timm, create_attn, load_timm, timm_state
from torch_reference import random_images, random_variables, torch_state_with_stats

from attnjax import blocks
from attnjax.blocks.strip import StripAttention
from attnjax.compare.pytorch import nhwc_to_nchw

pytestmark = pytest.mark.torch
SHAPES = [(2, 8, 8, 64), (3, 7, 5, 20), (1, 1, 1, 12), (2, 3, 10, 48), (2, 9, 4, 13)]
OPTIONS = [  # timm's names and values, the same in both
    {"kernel_size": 7, "bias": True},
    {"use_conv": False},
    {"gate_layer": "hard_sigmoid", "has_skip": True, "kernel_size": 5},
]


def setup_timm(shape, options=None, seed=0):
    block = StripAttention(**(options or {}))
    x = random_images(shape, seed)
    variables = random_variables(block, x, seed + 1)
    reference = create_attn("strip", shape[-1], **(options or {}))
    return block, x, variables, load_timm(reference, torch_state_with_stats(variables), {})


def timm_gate(reference, x):
    """timm's gate(conv_h(z_h) + conv_w(z_w)), recomputed from its own layers, as NHWC (N, H, W, C)."""
    with torch.no_grad():
        t = nhwc_to_nchw(x)
        a = reference.gate(
            reference.conv_h(t.mean(dim=3, keepdim=True)) + reference.conv_w(t.mean(dim=2, keepdim=True))
        )
        return a.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("shape", SHAPES)
def test_defaults_are_timms_module_and_so_is_the_gate(shape):
    block, x, variables, reference = setup_timm(shape)
    _, state = check_against_timm(block, x, variables, reference)
    (gate,) = state["intermediates"]["attention"]
    np.testing.assert_allclose(gate, timm_gate(reference, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", OPTIONS)
def test_options_are_timms_options(options):
    check_against_timm(*setup_timm((2, 6, 11, 24), options, seed=2))


def test_train_mode_is_eval_mode():
    check_against_timm(*setup_timm((2, 4, 6, 32), seed=6), train=True)


def test_gradients_match_timm():
    shape = (2, 5, 9, 16)
    block, x, variables, reference = setup_timm(shape, OPTIONS[0], seed=3)
    check_gradients(
        block,
        x,
        variables,
        reference,
        random_images(shape, seed=9),
        to_state=lambda v: timm_state(torch_state_with_stats(v), {}, reference),
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_and_gate(shape):
    x, y, maps = random_maps(blocks.create("strip"), shape)
    assert list(maps) == ["attention"]
    chex.assert_shape(maps["attention"], shape)
    assert_gated(y, x, maps["attention"], rtol=1e-5)


def test_parameters_are_two_depthwise_strip_convs_or_none():
    x = jnp.zeros((1, 5, 6, 24))
    params = jax.eval_shape(StripAttention().init, jax.random.key(0), x)["params"]
    assert sorted(params) == ["conv_h", "conv_w"]
    chex.assert_shape(params["conv_h"]["kernel"], (3, 1, 1, 24))
    chex.assert_shape(params["conv_w"]["kernel"], (1, 3, 1, 24))
    assert jax.eval_shape(StripAttention(use_conv=False).init, jax.random.key(0), x) == {}
