"""Light CBAM: CBAM with the average- and max-pooled descriptors averaged before one pass of each gate.

Source: timm's ``LightCbamModule`` (Ross Wightman, 2020, ``timm/layers/cbam.py`` in
huggingface/pytorch-image-models), an experimental lighter variant of CBAM: Sanghyun Woo, Jongchan Park,
Joon-Young Lee and In So Kweon (2018), "CBAM: Convolutional Block Attention Module", ECCV. There is no
paper for the light variant; timm's code defines it, and attnjax's ``cbam`` (:mod:`attnjax.blocks.cbam`)
fixes the choices the two share.

What it computes, for NHWC ``x`` with C channels::

    Mc = sigmoid(MLP(0.5 * avgpool(x) + 0.5 * maxpool(x)))      (N, 1, 1, C); one MLP C -> C/r -> C (ReLU), r = 16
    x' = x * Mc
    Ms = sigmoid(conv7x7(0.5 * mean_c(x') + 0.5 * max_c(x')))   (N, H, W, 1); 1 -> 1 channel, padding 3
    y  = x' * Ms

CBAM runs its MLP twice (on each pooled descriptor) and its 7x7 conv on two stacked maps; the light
variant averages the two descriptors first, so the MLP runs once and the conv has one input channel.

Sown maps, both in (0, 1): ``intermediates/channel``, Mc of shape (N, 1, 1, C), and
``intermediates/spatial``, Ms of shape (N, H, W, 1).

Choices and deviations from timm:

- The spatial gate has no batch norm, and its 7x7 conv has a bias, as in attnjax's ``cbam`` (the CBAM
  paper's equation). timm's ``LightSpatialAttn`` puts a BN after a bias-free conv (``ConvNormAct``),
  which makes the gate depend on the other images of the batch in training.
- The MLP layers have biases, as in attnjax's ``cbam`` and the official CBAM code; timm's default is
  ``mlp_bias=False``.
- CBAM's [mean, max] order does not arise: the two maps are summed, not stacked.
- Bottleneck width ``reduced_channels(C, r) = max(C // r, min(C, 8))``, as in ``cbam``; timm rounds C/r to
  the nearest integer (at least 1). The two agree for C >= 128 when r divides C.

On CPU the spatial gate's 7x7 conv (1 channel in, 1 out) is traced as one banded dot
(:mod:`attnjax.ops.single_output_conv`), as in ``cbam``. Same parameters, same values and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.blocks.cbam import CBAM
from attnjax.blocks.primitives import global_avg_pool, global_max_pool


def light_global_pool(x: jax.Array) -> jax.Array:
    """``0.5 * avgpool(x) + 0.5 * maxpool(x)`` over the positions, shape (N, 1, 1, C)."""
    return 0.5 * global_avg_pool(x) + 0.5 * global_max_pool(x)


def light_channel_pool(x: jax.Array) -> jax.Array:
    """``0.5 * mean_c(x) + 0.5 * max_c(x)`` over the channels, shape (N, H, W, 1)."""
    return 0.5 * jnp.mean(x, axis=-1, keepdims=True) + 0.5 * jnp.max(x, axis=-1, keepdims=True)


class LightCBAM(CBAM):
    """Light CBAM block: channel gate from one MLP pass on the averaged avg/max descriptor, then a 7x7 spatial
    gate on the averaged channel mean/max map.

    NHWC in, same shape out; C is read from the input. Sows ``intermediates/channel`` (N, 1, 1, C)
    and ``intermediates/spatial`` (N, H, W, 1). CBAM's layers, options and sown maps; only the two
    poolings differ.
    """

    kernel_size_note = "timm uses 7"

    def channel_logits(self, mlp, x: jax.Array) -> jax.Array:
        """``MLP(0.5 avgpool(x) + 0.5 maxpool(x))``: one pass of the MLP, (N, 1, 1, C)."""
        return mlp(light_global_pool(x))

    def spatial_pool(self, x: jax.Array) -> jax.Array:
        """The spatial gate's input, ``0.5 mean_c(x) + 0.5 max_c(x)`` (N, H, W, 1)."""
        return light_channel_pool(x)
