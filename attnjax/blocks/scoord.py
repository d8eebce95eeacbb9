"""Simple coordinate attention: one gate over the positions, summed from a height strip and a width strip.

Source: timm 1.0.29's ``SimpleCoordAttn`` (``timm/layers/coord_attn.py``, Ross Wightman 2025), timm's
``create_attn('scoord')``: a simplification of coordinate attention (Qibin Hou, Daquan Zhou and Jiashi Feng
(2021), "Coordinate Attention for Efficient Mobile Network Design", CVPR; attnjax's ``coord``). There is no
paper of its own; timm's module is the reference.

What it computes, for NHWC ``x`` with C channels::

    z_h = mean over W of x,  z_w = mean over H of x          (N, H, 1, C) and (N, 1, W, C)
    f_h = act(FC_1(z_h)),    f_w = act(FC_1(z_w))            one FC C -> d shared by both strips, act = SiLU
    a   = gate(FC_h(f_h) + FC_w(f_w))                        FC_h, FC_w: d -> C each; broadcast sum (N, H, W, C)
    y   = x * a  (+ x with has_skip)

with d = ``make_divisible(C * rd_ratio * se_factor, rd_divisor, round_limit=0)`` (timm's rule: C/6 rounded
to a multiple of 8, at least 8, by default). Against ``coord``: fully connected layers on the strips instead
of 1x1 convs on their concatenation, no batch norm, and one gate from the sum of the two directions'
logits (additive) instead of the product of two gates.

Sown map: ``intermediates/attention``, the gate ``a`` of shape (N, H, W, C), in (0, 1) with the sigmoid
(in [0, 1] with ``gate_layer="hard_sigmoid"``).

Options, timm's names and defaults (those of ``create_attn('scoord', C)``):

- ``rd_ratio`` (0.25), ``rd_channels`` (None), ``rd_divisor`` (8), ``se_factor`` (2/3): the width d above;
  ``rd_channels`` sets it directly;
- ``bias`` (True): biases in the three FCs;
- ``act_layer`` (``"silu"``) and ``gate_layer`` (``"sigmoid"``; or ``"hard_sigmoid"``), by timm's names
  (:func:`attnjax.blocks.primitives.activation_function`, :func:`~attnjax.blocks.primitives.gate_function`);
- ``has_skip`` (False): add the input to the output, ``y = x * a + x``.

Deviations from timm: none in the computation. timm's ``act_layer`` and ``gate_layer`` take module classes
too; here they are names. ``rd_ratio`` and ``se_factor`` must be > 0 and ``rd_channels`` >= 1 or None (timm computes a width from any
ratio, and reads ``rd_channels=0`` as None).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from attnjax.blocks.primitives import (
    activation_function,
    additive_strip_gate,
    directional_pool,
    gate_function,
    sow_map,
    timm_divisible_width,
)
from attnjax.validate import InputError, check_nhwc


class SimpleCoordinateAttention(nn.Module):
    """timm's simple coordinate attention (``scoord``): ``x * gate(FC_h(f_h) + FC_w(f_w))``, one (N, H, W, C) gate.

    NHWC in, same shape out; C is read from the input. No batch norm: ``train`` changes nothing. Sows the
    gate as ``intermediates/attention``.
    """

    rd_ratio: float = 0.25
    rd_channels: int | None = None
    rd_divisor: int = 8
    se_factor: float = 2 / 3  # timm's: rd_ratio is scaled by it, to keep the parameters near an SE block's
    bias: bool = True
    act_layer: str = "silu"
    gate_layer: str = "sigmoid"
    has_skip: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        check_nhwc(x, type(self).__name__)
        channels = x.shape[-1]
        if not self.se_factor > 0:
            raise InputError(f"se_factor must be > 0 (timm uses 2/3), got {self.se_factor}")
        hidden = timm_divisible_width(
            channels, self.rd_ratio, self.rd_channels, self.rd_divisor, round_limit=0.0, factor=self.se_factor
        )
        activation, gate = activation_function(self.act_layer), gate_function(self.gate_layer)

        z_h, z_w = directional_pool(x)
        reduce = nn.Dense(hidden, use_bias=self.bias, dtype=self.dtype, name="reduce")  # shared by both strips
        logits_h = nn.Dense(channels, use_bias=self.bias, dtype=self.dtype, name="expand_h")(activation(reduce(z_h)))
        logits_w = nn.Dense(channels, use_bias=self.bias, dtype=self.dtype, name="expand_w")(activation(reduce(z_w)))

        y, a = additive_strip_gate(x, logits_h, logits_w, gate)
        sow_map(self, "attention", a)
        return y + x if self.has_skip else y
