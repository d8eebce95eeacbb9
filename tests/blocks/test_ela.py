"""EfficientLocalAttention (ela): output, gates and gradients against timm 1.0.29's own EfficientLocalAttn
(create_attn('ela'), with its defaults and other options), and its properties."""

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
from attnjax.blocks.ela import EfficientLocalAttention
from attnjax.compare.pytorch import nchw_to_nhwc, nhwc_to_nchw

pytestmark = pytest.mark.torch
SHAPES = [(2, 8, 8, 64), (3, 7, 5, 20), (1, 1, 1, 12), (2, 3, 10, 48), (2, 9, 4, 13)]

# (attnjax's options, timm's): the same module, named alike except the norm (a flag against a class) and the
# activations (names against classes).
OPTIONS = [
    ({"kernel_size": 3, "bias": True}, {"kernel_size": 3, "bias": True}),
    ({"kernel_size": 5, "use_norm": False, "has_skip": True}, {"kernel_size": 5, "norm_layer": None, "has_skip": True}),
    (
        {"act_layer": "relu", "gate_layer": "hard_sigmoid", "kernel_size": 9},
        {"act_layer": torch.nn.ReLU, "gate_layer": "hard_sigmoid", "kernel_size": 9},
    ),
]


def setup_timm(shape, options=None, timm_options=None, seed=0):
    block = EfficientLocalAttention(**(options or {}))
    x = random_images(shape, seed)
    variables = random_variables(block, x, seed + 1)
    reference = create_attn("ela", shape[-1], **(timm_options or {}))
    return block, x, variables, load_timm(reference, torch_state_with_stats(variables), {})


def timm_gates(reference, x):
    """timm's a_h and a_w, recomputed from its own layers, as NHWC (N, H, 1, C) and (N, 1, W, C)."""
    with torch.no_grad():
        t = nhwc_to_nchw(x)
        a_h = reference.gate(reference.act(reference.norm_h(reference.conv_h(t.mean(dim=3, keepdim=True)))))
        a_w = reference.gate(reference.act(reference.norm_w(reference.conv_w(t.mean(dim=2, keepdim=True)))))
        return nchw_to_nhwc(a_h), nchw_to_nhwc(a_w)


@pytest.mark.parametrize("shape", SHAPES)
def test_defaults_are_timms_module_and_so_are_the_gates(shape):
    block, x, variables, reference = setup_timm(shape)
    _, state = check_against_timm(block, x, variables, reference)
    for name, expected in zip(["height", "width"], timm_gates(reference, x), strict=True):
        (gate,) = state["intermediates"][name]
        np.testing.assert_allclose(gate, expected, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("options, timm_options", OPTIONS)
def test_options_are_timms_options(options, timm_options):
    check_against_timm(*setup_timm((2, 6, 11, 24), options, timm_options, seed=2))


def test_train_mode_is_eval_mode():
    check_against_timm(*setup_timm((2, 4, 6, 32), seed=6), train=True)


@pytest.mark.parametrize("options, timm_options", [({}, {}), OPTIONS[1]])
def test_gradients_match_timm(options, timm_options):
    shape = (2, 5, 9, 16)
    block, x, variables, reference = setup_timm(shape, options, timm_options, seed=3)
    check_gradients(
        block,
        x,
        variables,
        reference,
        random_images(shape, seed=9),
        to_state=lambda v: timm_state(torch_state_with_stats(v), {}, reference),
    )


def test_group_norm_is_accurate_when_the_strip_mean_dwarfs_its_spread():
    """Against timm in float64, with a conv bias of 1000 (a strip mean about 2000 times its spread): the two-pass
    group norm is off by 3e-4 here, PyTorch's float32 by 1e-4, a one-pass variance E[t^2] - E[t]^2 by 0.3."""
    shape = (2, 6, 5, 16)
    block, x, variables, _ = setup_timm(shape, {"bias": True}, {"bias": True}, seed=4)
    params = jax.tree.map(np.array, variables["params"])
    params["conv_h"]["bias"] = np.full_like(params["conv_h"]["bias"], 1000.0)
    variables = {"params": params}
    reference = load_timm(create_attn("ela", shape[-1], bias=True), torch_state_with_stats(variables), {}).double()
    with torch.no_grad():
        expected = nchw_to_nhwc(reference(nhwc_to_nchw(x).double()))
    np.testing.assert_allclose(jax.jit(block.apply)(variables, x), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_and_gates(shape):
    x, y, maps = random_maps(blocks.create("ela"), shape)
    assert sorted(maps) == ["height", "width"]
    n, h, w, c = shape
    chex.assert_shape(maps["height"], (n, h, 1, c))
    chex.assert_shape(maps["width"], (n, 1, w, c))
    assert_gated(y, x, maps["height"], maps["width"], rtol=1e-5)


def test_parameters_are_two_depthwise_strip_convs_and_two_norms():
    params = jax.eval_shape(EfficientLocalAttention().init, jax.random.key(0), jnp.zeros((1, 5, 6, 24)))["params"]
    assert sorted(params) == ["conv_h", "conv_w", "norm_h", "norm_w"]
    chex.assert_shape(params["conv_h"]["kernel"], (7, 1, 1, 24))
    chex.assert_shape(params["conv_w"]["kernel"], (1, 7, 1, 24))
    assert "bias" not in params["conv_h"]
    chex.assert_shape(params["norm_h"]["scale"], (24,))
    no_norm = jax.eval_shape(EfficientLocalAttention(use_norm=False).init, jax.random.key(0), jnp.zeros((1, 5, 6, 24)))
    assert sorted(no_norm["params"]) == ["conv_h", "conv_w"]
