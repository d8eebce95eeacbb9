"""Polarized self-attention, parallel layout: a channel-only and a spatial-only gate, each from a softmax that
collapses the other dimension, applied to the input and summed.

Paper: Huajun Liu, Fuqiang Liu, Xinyi Fan and Dong Huang (2021),
"Polarized Self-Attention: Towards High-quality Pixel-wise Regression", arXiv:2107.00782.

What it computes, for NHWC ``x`` with C channels and an inner width C/2 (all convs 1x1, no bias)::

    channel-only branch
    w    = softmax over the H*W positions of W_q^ch(x)            (N, H, W, 1): C -> 1
    c    = sum_{h,w} w[n, h, w] * W_v^ch(x)[n, h, w, :]           (N, 1, 1, C/2): C -> C/2
    A_ch = sigmoid(LayerNorm(W_z(c)))                             (N, 1, 1, C): C/2 -> C, LayerNorm over C

    spatial-only branch
    s    = softmax over the C/2 channels of avgpool(W_q^sp(x))    (N, 1, 1, C/2): C -> C/2
    A_sp = sigmoid(sum_k s[n, k] * W_v^sp(x)[n, h, w, k])         (N, H, W, 1): C -> C/2

    y = x * A_ch + x * A_sp                                       parallel composition

Sown maps: ``intermediates/channel``, A_ch (N, 1, 1, C), and ``intermediates/spatial``, A_sp (N, H, W, 1),
sigmoid gates in (0, 1); ``intermediates/channel_softmax``, w (N, H, W, 1), which sums to 1 over the
positions of each image, and ``intermediates/spatial_softmax``, s (N, 1, 1, C/2), which sums to 1 over its
channels.

Choices and deviations:

- The math is the paper's equations for the parallel layout (its channel-only and spatial-only attention
  and their sum), including the LayerNorm after W_z. The official code's ``PSA_p`` differs from the paper
  (no LayerNorm, and in the spatial-only branch a softmax over the positions after the product instead of
  over the channels before it); we follow the paper.
- The 1x1 convs have no bias, as in the official code (the paper's equations show none; for W_q^ch a bias
  would cancel in the softmax anyway). Initialisation, where the paper is silent: W_q and W_v He normal
  with fan-in (variance 2 / C; the official code's Kaiming normal, here truncated as Flax's ``he_normal``),
  W_z Flax's default (the official code leaves PyTorch's default); the LayerNorm starts at scale 1, bias 0.
- LayerNorm epsilon 1e-5 (PyTorch's default; the paper gives none), with the two-pass variance.
- Inner width ``reduced_channels(C, 2) = max(C // 2, min(C, 8))`` (``reduction`` = 2): the paper's C/2
  for C >= 16; for smaller C it stays at min(C, 8) instead of collapsing (C = 1 would give 0).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.blocks.primitives import (
    attention_pool,
    global_avg_pool,
    reduced_channels,
    softmax_in_float32,
    sow_map,
)
from attnjax.layers import layer_norm
from attnjax.validate import check_nhwc


def spatial_only_logits(values: jax.Array, query: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Spatial-only branch's logits: ``s = softmax over K of avgpool(query)``, ``m = sum_k s_k * values_k``.

    ``values`` and ``query`` are (N, H, W, K). Returns ``(m, s)``: m (N, H, W, 1), s (N, 1, 1, K).
    """
    logits = global_avg_pool(query)
    weights = softmax_in_float32(logits)  # the map, float32; the sum in the logits' dtype
    return jnp.sum(weights.astype(logits.dtype) * values, axis=-1, keepdims=True), weights


def parallel_polarized(
    x: jax.Array, channel_logits: jax.Array, spatial_logits: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``A_ch = sigmoid(channel_logits)``, ``A_sp = sigmoid(spatial_logits)``, ``y = x * A_ch + x * A_sp``.

    ``channel_logits`` (N, 1, 1, C) and ``spatial_logits`` (N, H, W, 1) broadcast against ``x``.
    Returns ``(y, A_ch, A_sp)``.
    """
    channel_gate = jax.nn.sigmoid(channel_logits)
    spatial_gate = jax.nn.sigmoid(spatial_logits)
    return x * channel_gate + x * spatial_gate, channel_gate, spatial_gate


class PolarizedSelfAttention(nn.Module):
    """PSA, parallel layout: y = x * sigmoid(LN(W_z(channel-only pooling))) + x * sigmoid(spatial-only map).

    NHWC in, same shape out; C is read from the input. Sows ``intermediates/channel`` (N, 1, 1, C),
    ``intermediates/spatial`` (N, H, W, 1), ``intermediates/channel_softmax`` (N, H, W, 1) and
    ``intermediates/spatial_softmax`` (N, 1, 1, C/2).
    """

    reduction: int = 2
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # LayerNorm, no batch statistics
        check_nhwc(x, type(self).__name__)
        channels = x.shape[-1]
        inner = reduced_channels(channels, self.reduction)
        he = nn.initializers.he_normal()

        def conv(features, name, init=he):
            return nn.Conv(features, (1, 1), use_bias=False, kernel_init=init, dtype=self.dtype, name=name)

        # the channel-only branch's pooling: w = softmax over (H, W) of W_q x, c = sum_{h,w} w * W_v x
        context, channel_weights = attention_pool(conv(inner, "channel_value")(x), conv(1, "channel_query")(x))
        channel_logits = conv(channels, "channel_out", nn.linear.default_kernel_init)(context)
        channel_logits = layer_norm(dtype=self.dtype, name="channel_norm")(channel_logits)
        spatial_logits, spatial_weights = spatial_only_logits(
            conv(inner, "spatial_value")(x), conv(inner, "spatial_query")(x)
        )

        y, channel_gate, spatial_gate = parallel_polarized(x, channel_logits, spatial_logits)
        sow_map(self, "channel", channel_gate)
        sow_map(self, "spatial", spatial_gate)
        sow_map(self, "channel_softmax", channel_weights)
        sow_map(self, "spatial_softmax", spatial_weights)
        return y
