"""timm's width rules and activation names in attnjax.blocks.primitives, against timm 1.0.29's own functions."""

import numpy as np
import pytest
import torch
from timm_reference import import_timm

from attnjax.blocks.primitives import (
    ACTIVATIONS,
    GATES,
    activation_function,
    attention_widths,
    bottleneck_width,
    gate_function,
    make_divisible,
)
from attnjax.validate import InputError

pytestmark = pytest.mark.torch


def test_make_divisible_is_timms():
    timm = import_timm()
    for value in [0.5, 1, 2.5, 3, 4, 6.25, 7.9, 12, 20, 31.9, 100, 104, 250.5]:
        for divisor in (1, 2, 3, 8, 16):
            for round_limit in (0.0, 0.9):
                for min_value in (None, 4):
                    got = make_divisible(value, divisor, min_value, round_limit)
                    assert got == timm.layers.make_divisible(value, divisor, min_value, round_limit), (value, divisor)


@pytest.mark.parametrize("name", sorted({**ACTIVATIONS, **GATES}))
def test_activation_names_are_timms_functions(name):
    timm = import_timm()
    t = np.linspace(-6, 6, 97, dtype=np.float32)
    function = GATES[name] if name in GATES else activation_function(name)
    expected = timm.layers.create_act_layer(name)(torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(function(t), expected, rtol=1e-6, atol=1e-6)


def test_unknown_names_are_refused_with_the_valid_ones():
    with pytest.raises(InputError, match=r"^gate_layer must be one of hard_sigmoid, sigmoid, got 'tanh'$"):
        gate_function("tanh")
    with pytest.raises(InputError, match=r"^act_layer must be one of gelu, .*, swish, got None$"):
        activation_function(None)


def width(channels, reduction=16, rd_ratio=None, rd_channels=None, rd_divisor=None):
    return bottleneck_width(channels, reduction, rd_ratio, rd_channels, rd_divisor, timm_ratio=1 / 8)


def test_bottleneck_width_is_attnjax_rule_unless_a_timm_option_is_given():
    assert [width(64), width(256), width(3)] == [8, 16, 3]  # max(C // 16, min(C, 8))
    assert [width(64, rd_divisor=1), width(256, rd_divisor=1), width(3, rd_divisor=1)] == [8, 32, 1]  # round(C / 8)
    assert [width(100, rd_ratio=0.1, rd_divisor=8), width(64, rd_channels=5)] == [8, 5]
    with pytest.raises(InputError, match=r"^reduction=4 \(attnjax's width rule\) and rd_ratio/rd_channels/rd_divisor"):
        width(64, reduction=4, rd_ratio=0.5)


@pytest.mark.parametrize(
    "channels, options, widths",
    [
        (20, {}, (4, 5, 5)),  # attnjax: the largest divisor up to 4, q/k C / heads
        (20, {"qk_ratio": 1.0}, (4, 6, 5)),  # timm: make_divisible(20, 8) // 4
        (100, {"qk_ratio": 1.0}, (4, 26, 25)),
        (64, {"qk_ratio": 0.5, "num_heads": 2}, (2, 16, 32)),
        (36, {"qk_ratio": 1.0, "num_heads": 3, "dim_head": 7}, (3, 7, 12)),
    ],
)
def test_attention_widths_are_timms_with_qk_ratio(channels, options, widths):
    got = attention_widths(channels, options.get("num_heads"), 4, options.get("dim_head"), options.get("qk_ratio"), "B")
    assert got == widths
    if "qk_ratio" in options:
        timm = import_timm()
        module = timm.layers.create_attn("bottleneck", channels, feat_size=2, **options)
        assert (module.num_heads, module.dim_head_qk, module.dim_head_v) == widths
