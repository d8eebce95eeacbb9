"""Shuffle attention: channel groups, each half gated by a channel branch and half by a spatial branch, then
a channel shuffle.

Paper: Qing-Long Zhang and Yu-Bin Yang (2021), "SA-Net: Shuffle Attention for Deep Convolutional Neural
Networks", ICASSP 2021.

What it computes, for NHWC ``x`` with C channels split into G groups of C/G consecutive channels, each
group's channels split into a first half x_1 and a second half x_2 of k = C/(2G) channels::

    channel branch   x_1' = x_1 * sigmoid(W_1 * avgpool(x_1) + b_1)                 gate (N, 1, 1, k) per group
    spatial branch   x_2' = x_2 * sigmoid(W_2 * GN(x_2) + b_2)                        gate (N, H, W, k) per group
                     GN(v) = gamma * (v - mean_HW(v)) / sqrt(var_HW(v) + 1e-5) + beta  per image and channel
    y = channel_shuffle([x_1', x_2'] of every group, in order, 2 groups)             y[2i] = z[i], y[2i+1] = z[C/2 + i]

W_1, b_1, W_2, b_2, gamma, beta have shape (k,): one value per position in the half, shared by all G
groups (3C/G parameters in all for even C; 3C - 1 for odd C).

Sown maps: ``intermediates/channel``, the channel branch's gate (N, 1, 1, G*k), and
``intermediates/spatial``, the spatial branch's gate (N, H, W, G*k), both sigmoid gates in (0, 1) and
both in group-major order: entry g*k + j gates input channel g*C/G + j (channel branch) or
g*C/G + k + j (spatial branch).

The group count adapts to C (the paper's G = 64 needs C divisible by 128):

- even C: G = the largest g <= ``groups`` with C divisible by 2g (C = 64: G = 32; C = 20: G = 10);
- odd C (no g works): G = 1, and the halves are as ``torch.chunk`` splits an odd count: the channel branch
  takes the first ceil(C/2) channels, the spatial branch the last floor(C/2) (C = 13: 7 and 6; C = 1: 1 and
  0). The shuffle is then the riffle y = [z_0, z_7, z_1, z_8, ..., z_6] (C = 13): the 2-group shuffle of z
  with one zero channel appended, that channel dropped. For even C it is the paper's shuffle.

Choices and deviations:

- Parameter shapes (shared across groups) and the GN are as in the paper and the official code: GN with
  one group per channel (so each channel is normalised over H x W) and its own affine gamma, beta, before
  W_2, b_2. Initialisation from the official code (the paper is silent): W_1 = W_2 = 0, b_1 = b_2 = 1,
  gamma = 1, beta = 0, so every gate starts at sigmoid(1).
- GN epsilon 1e-5 (PyTorch's default, which the official code uses), with a two-pass variance. On a 1x1
  map every channel's variance is 0, GN gives beta, and the spatial gate is sigmoid(W_2 beta + b_2).
- The adaptive G and the odd-C fallback above are ours: the paper and the official code require C
  divisible by 2G.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from attnjax.blocks.primitives import sow_map
from attnjax.validate import InputError, check_nhwc

GN_EPSILON = 1e-5


def shuffle_groups(channels: int, groups: int) -> int:
    """The group count used for C = ``channels``: the largest g <= ``groups`` with C divisible by 2g; 1 for odd C."""
    if groups < 1:
        raise InputError(f"groups must be >= 1 (the paper uses 64), got {groups}")
    if channels % 2:
        return 1
    return max(g for g in range(1, min(groups, channels // 2) + 1) if channels % (2 * g) == 0)


def channel_shuffle(x: jax.Array) -> jax.Array:
    """Channel shuffle with 2 groups on the last axis: ``y[2i] = x[i]``, ``y[2i+1] = x[ceil(C/2) + i]``.

    For even C this is ShuffleNet's reshape (2, C/2), transpose, flatten; for odd C the same on x with
    one zero channel appended, which is then dropped.
    """
    channels = x.shape[-1]
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, channels % 2)])
    half = padded.shape[-1] // 2
    shuffled = jnp.swapaxes(padded.reshape(*x.shape[:-1], 2, half), -1, -2).reshape(padded.shape)
    return shuffled[..., :channels]


def instance_norm(x: jax.Array, epsilon: float = GN_EPSILON) -> jax.Array:
    """``(x - mean) / sqrt(var + epsilon)`` over the H and W axes, per image and channel; two-pass variance."""
    centred = x - jnp.mean(x, axis=(1, 2), keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=(1, 2), keepdims=True) + epsilon)


def shuffle_attention(
    x: jax.Array,
    groups: int,
    channel_weight: jax.Array,
    channel_bias: jax.Array,
    norm_scale: jax.Array,
    norm_bias: jax.Array,
    spatial_weight: jax.Array,
    spatial_bias: jax.Array,
    epsilon: float = GN_EPSILON,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Shuffle attention on NHWC ``x`` with ``groups`` groups (C divisible by ``groups``).

    Each group's first ``channel_weight.shape[0]`` channels take the channel branch, its remaining
    ``spatial_weight.shape[0]`` the spatial branch (the parameters are shared by the groups); then
    :func:`channel_shuffle`. Returns ``(y, channel_gate, spatial_gate)``, the gates of shapes
    (N, 1, 1, groups * k1) and (N, H, W, groups * k2) in group-major order.
    """
    n, h, w, channels = x.shape
    k1 = channel_weight.shape[0]
    grouped = x.reshape(n, h, w, groups, channels // groups)
    x1, x2 = grouped[..., :k1], grouped[..., k1:]
    channel_gate = jax.nn.sigmoid(channel_weight * jnp.mean(x1, axis=(1, 2), keepdims=True) + channel_bias)
    normalised = norm_scale * instance_norm(x2, epsilon) + norm_bias
    spatial_gate = jax.nn.sigmoid(spatial_weight * normalised + spatial_bias)
    z = jnp.concatenate([x1 * channel_gate, x2 * spatial_gate], axis=-1).reshape(x.shape)
    return (
        channel_shuffle(z),
        channel_gate.reshape(n, 1, 1, -1),
        spatial_gate.reshape(n, h, w, -1),
    )


class ShuffleAttention(nn.Module):
    """SA block: per group, a channel gate on one half and a GN-based spatial gate on the other, then shuffle.

    NHWC in, same shape out; C is read from the input and sets the group count (:func:`shuffle_groups`).
    Sows ``intermediates/channel`` (N, 1, 1, C/2) and ``intermediates/spatial`` (N, H, W, C/2)
    (ceil(C/2) and floor(C/2) channels for odd C).
    """

    groups: int = 64
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch statistics
        check_nhwc(x, type(self).__name__)
        channels = x.shape[-1]
        groups = shuffle_groups(channels, self.groups)
        size = channels // groups
        k1, k2 = (size + 1) // 2, size // 2
        zeros, ones = nn.initializers.zeros, nn.initializers.ones
        params = [
            self.param("channel_weight", zeros, (k1,)),
            self.param("channel_bias", ones, (k1,)),
            self.param("norm_scale", ones, (k2,)),
            self.param("norm_bias", zeros, (k2,)),
            self.param("spatial_weight", zeros, (k2,)),
            self.param("spatial_bias", ones, (k2,)),
        ]
        x, *params = promote_dtype(x, *params, dtype=self.dtype)
        y, channel_gate, spatial_gate = shuffle_attention(x, groups, *params)
        sow_map(self, "channel", channel_gate)
        sow_map(self, "spatial", spatial_gate)
        return y
