"""SimpleCoordinateAttention (scoord): output, gate and gradients against timm 1.0.29's own SimpleCoordAttn
(create_attn('scoord'), with its defaults and other options), timm's width rule, and its properties."""

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
from attnjax.blocks.scoord import SimpleCoordinateAttention
from attnjax.compare.pytorch import nhwc_to_nchw

pytestmark = pytest.mark.torch
TIMM_NAMES = {"reduce": "fc1", "expand_h": "fc_h", "expand_w": "fc_w"}
SHAPES = [(2, 8, 8, 64), (3, 7, 5, 20), (1, 1, 1, 12), (2, 3, 10, 160), (2, 9, 4, 13)]

# (attnjax's options, timm's): the same module, named alike except the activations (names against classes).
OPTIONS = [
    ({}, {}),
    ({"rd_ratio": 0.5, "rd_divisor": 4, "se_factor": 1.0}, {"rd_ratio": 0.5, "rd_divisor": 4, "se_factor": 1.0}),
    ({"rd_channels": 5, "bias": False, "has_skip": True}, {"rd_channels": 5, "bias": False, "has_skip": True}),
    (
        {"act_layer": "gelu", "gate_layer": "hard_sigmoid"},
        {"act_layer": torch.nn.GELU, "gate_layer": "hard_sigmoid"},
    ),
]


def setup_timm(shape, options, timm_options, seed=0):
    block = SimpleCoordinateAttention(**options)
    x = random_images(shape, seed)
    variables = random_variables(block, x, seed + 1)
    reference = create_attn("scoord", shape[-1], **timm_options)
    return block, x, variables, load_timm(reference, torch_state_with_stats(variables), TIMM_NAMES)


def timm_gate(reference, x):
    """timm's gate, gate(fc_h(act(fc1(z_h))) + fc_w(act(fc1(z_w)))), recomputed from its own layers (NHWC)."""
    with torch.no_grad():
        t = nhwc_to_nchw(x)
        f_h = reference.act(reference.fc1(t.mean(dim=3).transpose(1, 2)))
        f_w = reference.act(reference.fc1(t.mean(dim=2).transpose(1, 2)))
        logits = reference.fc_h(f_h)[:, :, None, :] + reference.fc_w(f_w)[:, None, :, :]  # (N, H, W, C)
        return reference.gate(logits).numpy()


@pytest.mark.parametrize("shape", SHAPES)
def test_defaults_are_timms_module(shape):
    block, x, variables, reference = setup_timm(shape, {}, {})
    check_against_timm(block, x, variables, reference)


@pytest.mark.parametrize("options, timm_options", OPTIONS[1:])
def test_options_are_timms_options(options, timm_options):
    block, x, variables, reference = setup_timm((2, 6, 5, 48), options, timm_options, seed=2)
    check_against_timm(block, x, variables, reference)
    _, _, maps = random_maps(block, (2, 6, 5, 48))
    chex.assert_shape(maps["attention"], (2, 6, 5, 48))


def test_sown_gate_is_timms_and_the_output_is_the_gated_input():
    block, x, variables, reference = setup_timm((2, 5, 7, 24), {}, {}, seed=4)
    _, state = check_against_timm(block, x, variables, reference)
    (gate,) = state["intermediates"]["attention"]
    np.testing.assert_allclose(gate, timm_gate(reference, x), rtol=1e-5, atol=1e-6)


def test_train_mode_is_eval_mode():
    block, x, variables, reference = setup_timm((2, 4, 6, 32), {}, {}, seed=6)
    check_against_timm(block, x, variables, reference, train=True)


def test_gradients_match_timm():
    shape = (2, 5, 4, 24)
    block, x, variables, reference = setup_timm(shape, {"has_skip": True}, {"has_skip": True}, seed=3)
    check_gradients(
        block,
        x,
        variables,
        reference,
        random_images(shape, seed=9),
        to_state=lambda v: timm_state(torch_state_with_stats(v), TIMM_NAMES, reference),
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_and_gate(shape):
    x, y, maps = random_maps(blocks.create("scoord"), shape)
    assert list(maps) == ["attention"]
    chex.assert_shape(maps["attention"], shape)
    assert_gated(y, x, maps["attention"], rtol=1e-5)


@pytest.mark.parametrize("channels", [3, 12, 20, 64, 100, 160, 256, 1000])
@pytest.mark.parametrize("options", [{}, {"rd_ratio": 1 / 16, "rd_divisor": 1}, {"se_factor": 1.0, "rd_divisor": 16}])
def test_width_is_timms(channels, options):
    params = jax.eval_shape(
        SimpleCoordinateAttention(**options).init, jax.random.key(0), jnp.zeros((1, 2, 3, channels))
    )
    width = params["params"]["reduce"]["kernel"].shape[1]
    assert width == create_attn("scoord", channels, **options).fc1.out_features, (channels, options)


def test_widths_of_the_defaults():
    widths = {
        c: jax.eval_shape(SimpleCoordinateAttention().init, jax.random.key(0), jnp.zeros((1, 2, 2, c)))["params"]
        for c in (16, 64, 96, 256)
    }
    # make_divisible(C / 6, 8, round_limit=0): at least 8, else the nearest multiple of 8
    assert [p["reduce"]["kernel"].shape[1] for p in widths.values()] == [8, 8, 16, 40]
