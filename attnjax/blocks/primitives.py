"""Primitives shared by several blocks: the bottleneck width rule, the sigmoid gate, global average pooling.

Each is a pure function of arrays (or of sizes), used by the blocks' files and exported from
:mod:`attnjax.blocks` for use in your own modules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.validate import InputError


def sigmoid_gate(x: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gate ``x`` by ``logits``: ``g = sigmoid(logits)``, ``y = x * g``.

    ``logits`` broadcasts against ``x``. Returns ``(y, g)``; every ``g`` lies in (0, 1)
    (up to float rounding at the extremes).
    """
    gate = jax.nn.sigmoid(logits)
    return x * gate, gate


def reduced_channels(channels: int, reduction: int, min_channels: int = 8) -> int:
    """Bottleneck width ``max(C // r, min(C, min_channels))``.

    ``C // r`` alone collapses to 0 for small C (C=3 with r=8); the floor keeps at least
    ``min_channels`` (as timm's SE does), but never widens past C itself.
    """
    if reduction < 1:
        raise InputError(f"reduction must be >= 1, got {reduction}")
    return max(channels // reduction, min(channels, min_channels))


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Squeeze: ``z[n, 0, 0, c] = 1/(H*W) * sum_{h,w} x[n, h, w, c]``, shape (N, 1, 1, C)."""
    return jnp.mean(x, axis=(1, 2), keepdims=True)
