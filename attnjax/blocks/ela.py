"""Efficient local attention: a gate along the height and one along the width, from 1-D depthwise convs on strips.

Paper: Wei Xu and Yi Wan (2024), "ELA: Efficient Local Attention for Deep Convolutional Neural Networks",
arXiv:2403.01123. The reference is timm 1.0.29's ``EfficientLocalAttn`` (``timm/layers/coord_attn.py``), timm's
``create_attn('ela')``, whose form this block follows (timm's docstring gives the paper another title; the
arXiv number is this paper's).

What it computes, for NHWC ``x`` with C channels::

    z_h = mean over W of x,  z_w = mean over H of x           (N, H, 1, C) and (N, 1, W, C)
    a_h = gate(act(GN_h(conv_h(z_h))))                         conv_h: depthwise k x 1 along H, 'same' zero padding
    a_w = gate(act(GN_w(conv_w(z_w))))                         conv_w: depthwise 1 x k along W
    y   = x * a_h * a_w  (+ x with has_skip)

GN is a group norm with one group (timm's ``GroupNorm1``): each image's strip is normalised over all of its
positions and channels together, then scaled and shifted per channel; epsilon 1e-5. Each direction has its
own conv and norm; there is no channel reduction and no batch norm, so the block does not depend on the
batch.

Sown maps, in (0, 1) with the sigmoid: ``intermediates/height``, a_h of shape (N, H, 1, C), and
``intermediates/width``, a_w of shape (N, 1, W, C), as ``coord`` sows them.

Options, timm's names and defaults (those of ``create_attn('ela', C)``):

- ``kernel_size`` (7): the convs' length, odd (timm pads ``k // 2``; an even size changes the map's size there);
- ``bias`` (False): biases in the two convs;
- ``act_layer`` (``"silu"``) and ``gate_layer`` (``"sigmoid"``; or ``"hard_sigmoid"``), by timm's names;
- ``use_norm`` (True): the group norms; False is timm's ``norm_layer=None``;
- ``has_skip`` (False): ``y = x * a_h * a_w + x``.

Deviations from timm: none in the computation. timm's ``norm_layer`` (a class: GroupNorm1 or None) is the flag
``use_norm`` here, and its ``act_layer``/``gate_layer`` are names. The group norm's variance is two-pass
(:func:`attnjax.layers.layer_norm`), accurate in float32 where the strip's mean dwarfs its spread. The convs
run as one product per tap (:func:`attnjax.blocks.primitives.depthwise_taps`), the same values as a grouped conv.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from attnjax.blocks.primitives import (
    activation_function,
    directional_pool,
    gate_function,
    odd_size,
    sow_map,
    strip_conv,
)
from attnjax.layers import layer_norm
from attnjax.validate import check_nhwc

GROUP_NORM_EPSILON = 1e-5  # PyTorch's GroupNorm default, timm's GroupNorm1


def strip_gates(x: jax.Array, t_h: jax.Array, t_w: jax.Array, gate) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``a_h = gate(t_h)``, ``a_w = gate(t_w)`` for (N, H, 1, C) and (N, 1, W, C) ``t``; ``y = x * a_h * a_w``.
    Returns ``(y, a_h, a_w)``."""
    a_h, a_w = gate(t_h), gate(t_w)
    return x * a_h * a_w, a_h, a_w


class EfficientLocalAttention(nn.Module):
    """ELA (timm's ``ela``): ``x * a_h * a_w``, each gate from a depthwise 1-D conv, a group norm and an activation.

    NHWC in, same shape out; C is read from the input. No batch norm: ``train`` changes nothing. Sows
    ``intermediates/height`` (N, H, 1, C) and ``intermediates/width`` (N, 1, W, C).
    """

    kernel_size: int = 7
    bias: bool = False
    act_layer: str = "silu"
    gate_layer: str = "sigmoid"
    use_norm: bool = True  # the group norms (timm's norm_layer=GroupNorm1; False: norm_layer=None)
    has_skip: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # group norm: no batch statistics; no dropout
        who = type(self).__name__
        check_nhwc(x, who)
        channels = x.shape[-1]
        size = odd_size(self.kernel_size, "kernel_size", who, "the strips' 1-D convs keep their length")
        activation, gate = activation_function(self.act_layer), gate_function(self.gate_layer)

        def direction(z, axis, suffix):
            t = strip_conv(channels, size, axis, self.bias, self.dtype, f"conv_{suffix}")(z)
            if self.use_norm:  # one group: over the strip's positions and channels, per image
                t = layer_norm(
                    epsilon=GROUP_NORM_EPSILON, dtype=self.dtype, reduction_axes=(1, 2, 3), name=f"norm_{suffix}"
                )(t)
            return activation(t)

        z_h, z_w = directional_pool(x)
        y, a_h, a_w = strip_gates(x, direction(z_h, 1, "h"), direction(z_w, 2, "w"), gate)
        sow_map(self, "height", a_h)
        sow_map(self, "width", a_w)
        return y + x if self.has_skip else y
