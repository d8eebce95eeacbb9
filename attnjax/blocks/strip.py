"""Strip attention: one gate over the positions from the sum of a height strip and a width strip.

Source: timm 1.0.29's ``StripAttn`` ("minimal strip attention", ``timm/layers/coord_attn.py``, Ross Wightman
2025), timm's ``create_attn('strip')``. There is no paper of its own; the strips are the strip pooling of Qibin
Hou, Li Zhang, Ming-Ming Cheng and Jiashi Feng (2020), "Strip Pooling: Rethinking Spatial Pooling for Scene
Parsing", CVPR, and timm's module is the reference.

What it computes, for NHWC ``x`` with C channels::

    z_h = mean over W of x,  z_w = mean over H of x        (N, H, 1, C) and (N, 1, W, C)
    t_h = conv_h(z_h),       t_w = conv_w(z_w)             depthwise k x 1 along H and 1 x k along W, 'same'
                                                           zero padding (with use_conv; else t = z)
    a   = gate(t_h + t_w)                                  broadcast sum, (N, H, W, C)
    y   = x * a  (+ x with has_skip)

No reduction, no normalisation, 2 k C parameters (none with ``use_conv=False``).

Sown map: ``intermediates/attention``, the gate ``a`` of shape (N, H, W, C), in (0, 1) with the sigmoid.

Options, timm's names and defaults (those of ``create_attn('strip', C)``):

- ``use_conv`` (True): the depthwise convs; False gates the sum of the pooled strips themselves;
- ``kernel_size`` (3): the convs' length, odd (timm pads ``k // 2``);
- ``bias`` (False): biases in the two convs;
- ``gate_layer`` (``"sigmoid"``; or ``"hard_sigmoid"``), by timm's name;
- ``has_skip`` (False): ``y = x * a + x``.

Deviations from timm: none in the computation (its ``gate_layer`` takes a module class too; here a name).
The convs run as one product per tap (:func:`attnjax.blocks.primitives.depthwise_taps`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from attnjax.blocks.primitives import (
    additive_strip_gate,
    directional_pool,
    gate_function,
    odd_size,
    sow_map,
    strip_conv,
)
from attnjax.validate import check_nhwc


class StripAttention(nn.Module):
    """timm's minimal strip attention (``strip``): ``x * gate(conv_h(z_h) + conv_w(z_w))``, one (N, H, W, C) gate.

    NHWC in, same shape out; C is read from the input. No batch norm: ``train`` changes nothing. Sows the
    gate as ``intermediates/attention``.
    """

    use_conv: bool = True
    kernel_size: int = 3
    bias: bool = False
    gate_layer: str = "sigmoid"
    has_skip: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        who = type(self).__name__
        check_nhwc(x, who)
        channels = x.shape[-1]
        size = odd_size(self.kernel_size, "kernel_size", who, "the strips' 1-D convs keep their length")
        gate = gate_function(self.gate_layer)

        t_h, t_w = directional_pool(x)
        if self.use_conv:
            t_h = strip_conv(channels, size, 1, self.bias, self.dtype, "conv_h")(t_h)
            t_w = strip_conv(channels, size, 2, self.bias, self.dtype, "conv_w")(t_w)

        y, a = additive_strip_gate(x, t_h, t_w, gate)
        sow_map(self, "attention", a)
        return y + x if self.has_skip else y
