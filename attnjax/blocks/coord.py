"""Coordinate attention: gates along the height and along the width, from direction-wise pooling.

Paper: Qibin Hou, Daquan Zhou and Jiashi Feng (2021), "Coordinate Attention for Efficient Mobile
Network Design", CVPR.

What it computes, for NHWC ``x`` with C channels::

    z_h = mean over W of x                          (N, H, 1, C)
    z_w = mean over H of x                          (N, 1, W, C)
    f   = h_swish(BN(conv1x1([z_h ; z_w])))         both directions stacked along one spatial axis,
                                                    (N, H+W, 1, C) -> (N, H+W, 1, mip), mip = max(8, C // 32)
    f_h, f_w = split(f)                             back to (N, H, 1, mip) and (N, 1, W, mip)
    a_h = sigmoid(conv1x1_h(f_h))                   (N, H, 1, C)
    a_w = sigmoid(conv1x1_w(f_w))                   (N, 1, W, C)
    y   = x * a_h * a_w

Sown maps, both in (0, 1): ``intermediates/height``, a_h of shape (N, H, 1, C), and
``intermediates/width``, a_w of shape (N, 1, W, C).

The BN is ``attnjax.layers.batch_norm(train)``; its statistics are shared by the two directions,
as in the official code, since it runs on the stacked tensor.

Deviation from the paper: mip is ``reduced_channels(C, 32) = max(C // 32, min(C, 8))``, the width rule
of every attnjax block. It equals the paper's ``max(8, C // 32)`` for C >= 8; for C < 8 it stays at C
instead of widening to 8.

Batch-norm running variance: the running averages take in the biased batch variance (Flax's convention);
PyTorch's ``BatchNorm2d`` takes in the unbiased one, n/(n-1) times larger, n being the values per
channel in the batch. Outputs agree with PyTorch, but running variances imported from or exported to
PyTorch differ by up to n/(n-1): its BN sees the stacked (N, H+W, 1, mip) tensor, so n = N*(H+W).
Convert them with ``attnjax.layers.torch_running_var`` and ``flax_running_var``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.blocks.primitives import block_batch_norm, directional_pool, reduced_channels, sow_map
from attnjax.layers import BATCH_AXIS
from attnjax.validate import check_nhwc


def h_swish(x: jax.Array) -> jax.Array:
    """Hard swish: ``x * relu6(x + 3) / 6``."""
    return x * jnp.clip(x + 3, 0, 6) / 6


def stack_directions(z_h: jax.Array, z_w: jax.Array) -> jax.Array:
    """``[z_h ; z_w]`` along axis 1: (N, H, 1, C) and (N, 1, W, C) -> (N, H+W, 1, C)."""
    return jnp.concatenate([z_h, jnp.swapaxes(z_w, 1, 2)], axis=1)


def split_directions(f: jax.Array, height: int) -> tuple[jax.Array, jax.Array]:
    """Inverse of :func:`stack_directions`: (N, H+W, 1, K) -> (N, H, 1, K) and (N, 1, W, K)."""
    return f[:, :height], jnp.swapaxes(f[:, height:], 1, 2)


def coordinate_gate(x: jax.Array, logits_h: jax.Array, logits_w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``a_h = sigmoid(logits_h)``, ``a_w = sigmoid(logits_w)``, ``y = x * a_h * a_w``. Returns ``(y, a_h, a_w)``."""
    a_h, a_w = jax.nn.sigmoid(logits_h), jax.nn.sigmoid(logits_w)
    return x * a_h * a_w, a_h, a_w


class CoordinateAttention(nn.Module):
    """Coordinate attention block: x * a_h * a_w, with a_h (N, H, 1, C) and a_w (N, 1, W, C).

    NHWC in, same shape out; C is read from the input. ``train`` selects batch statistics in the
    batch norm; call ``apply(..., mutable=["batch_stats"])`` then to update the running averages.
    Sows ``intermediates/height`` (N, H, 1, C) and ``intermediates/width`` (N, 1, W, C).
    """

    reduction: int = 32
    dtype: Any = None
    axis_name: str | None = BATCH_AXIS  # batch-norm synchronisation axis (Flax's), used where bound; set by the host

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_nhwc(x, type(self).__name__)
        height, channels = x.shape[1], x.shape[-1]
        mip = reduced_channels(channels, self.reduction)

        f = stack_directions(*directional_pool(x))
        f = nn.Conv(mip, (1, 1), dtype=self.dtype, name="reduce")(f)
        f = h_swish(block_batch_norm(self, train, "bn")(f))
        f_h, f_w = split_directions(f, height)
        logits_h = nn.Conv(channels, (1, 1), dtype=self.dtype, name="expand_h")(f_h)
        logits_w = nn.Conv(channels, (1, 1), dtype=self.dtype, name="expand_w")(f_w)

        y, a_h, a_w = coordinate_gate(x, logits_h, logits_w)
        sow_map(self, "height", a_h)
        sow_map(self, "width", a_w)
        return y
