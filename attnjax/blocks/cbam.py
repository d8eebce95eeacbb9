"""CBAM: a channel gate, then a spatial gate, each multiplying the features.

Paper: Sanghyun Woo, Jongchan Park, Joon-Young Lee and In So Kweon (2018),
"CBAM: Convolutional Block Attention Module", ECCV.

What it computes, for NHWC ``x`` with C channels::

    Mc = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))      (N, 1, 1, C); one MLP C -> C/r -> C (ReLU), r = 16
    x' = x * Mc
    Ms = sigmoid(conv7x7([mean_c(x'); max_c(x')]))      (N, H, W, 1); 2 -> 1 channels, padding 3
    y  = x' * Ms

Sown maps, both in (0, 1): ``intermediates/channel``, Mc of shape (N, 1, 1, C), and
``intermediates/spatial``, Ms of shape (N, H, W, 1).

Deviations from the paper and choices it leaves open:

- The spatial gate has no batch norm; its 7x7 conv has a bias. This is the paper's equation
  ``Ms = sigmoid(f7x7([AvgPool(F); MaxPool(F)]))``. The official code (and timm) put a BN after a
  bias-free conv. We follow the paper: the BN on a single channel right before the sigmoid makes
  the gate depend on the other images in the batch during training, the paper does not describe
  it, and leaving it out keeps CBAM free of batch statistics.
- The pooled maps are concatenated as [mean, max], the paper's order. The official code
  concatenates [max, mean], so its 7x7 kernel's two input channels are swapped relative to ours.
- Bottleneck width ``reduced_channels(C, r) = max(C // r, min(C, 8))``, equal to the paper's C/r for
  C >= 128; the floor keeps small C working. The MLP layers have biases, as in the official code.

On CPU the spatial gate's 7x7 conv (2 channels in, 1 out) is traced as one banded dot
(:mod:`attnjax.ops.single_output_conv`, through :func:`attnjax.blocks.primitives.spatial_conv`), faster
there than XLA's conv. Same parameters, same values and gradients.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.blocks.primitives import (
    excitation_mlp,
    global_avg_pool,
    global_max_pool,
    odd_size,
    reduced_channels,
    sigmoid_gate,
    sow_map,
    spatial_conv,
)
from attnjax.validate import check_nhwc


def channel_pool(x: jax.Array) -> jax.Array:
    """``[mean_c x ; max_c x]``: the mean and the max over channels, stacked as (N, H, W, 2)."""
    return jnp.concatenate([jnp.mean(x, axis=-1, keepdims=True), jnp.max(x, axis=-1, keepdims=True)], axis=-1)


class CBAM(nn.Module):
    """CBAM block: channel gate from a shared MLP on avg- and max-pooled features, then a 7x7 spatial gate.

    NHWC in, same shape out; C is read from the input. Sows ``intermediates/channel`` (N, 1, 1, C)
    and ``intermediates/spatial`` (N, H, W, 1). The two pooling steps are the methods
    :meth:`channel_logits` and :meth:`spatial_pool`, and the two gates' layers :meth:`channel_mlp` and
    :meth:`spatial_logits` (:class:`attnjax.blocks.lcbam.LightCBAM` replaces them).
    """

    reduction: int = 16
    kernel_size: int = 7
    dtype: Any = None

    kernel_size_note = "the paper uses 7"  # for the error on an even kernel_size

    def channel_logits(self, mlp, x: jax.Array) -> jax.Array:
        """``MLP(avgpool(x)) + MLP(maxpool(x))``: the shared MLP on both descriptors, (N, 1, 1, C)."""
        return mlp(global_avg_pool(x)) + mlp(global_max_pool(x))

    def spatial_pool(self, x: jax.Array) -> jax.Array:
        """The spatial gate's input, ``[mean_c x; max_c x]`` (N, H, W, 2)."""
        return channel_pool(x)

    def channel_mlp(self, channels: int):
        """The channel gate's MLP C -> C/r -> C with a ReLU (layers ``reduce``, ``expand``; made when compact)."""
        return excitation_mlp(channels, reduced_channels(channels, self.reduction), self.dtype)

    def spatial_logits(self, pooled: jax.Array, kernel_size: int, train: bool) -> jax.Array:
        """The spatial gate's logits: the k x k conv ``spatial_conv`` of the pooled map, (N, H, W, 1)."""
        del train  # no batch norm (see the module docstring) or dropout
        return spatial_conv(kernel_size, self.dtype)(pooled)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        who = type(self).__name__
        check_nhwc(x, who)
        k = odd_size(self.kernel_size, "kernel_size", who, self.kernel_size_note)
        mlp = self.channel_mlp(x.shape[-1])
        x, channel_gate = sigmoid_gate(x, self.channel_logits(mlp, x))
        x, spatial_gate = sigmoid_gate(x, self.spatial_logits(self.spatial_pool(x), k, train))
        sow_map(self, "channel", channel_gate)
        sow_map(self, "spatial", spatial_gate)
        return x
