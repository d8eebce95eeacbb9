"""The tutorial's general mechanism (its section 3): softmax attention over positions.

    w = conv1x1(x)                      attention weights from a (1x1 conv = dense) layer
    s = w * x                           scores: weights times input features
    a = softmax over (H, W) of s        values: one distribution over positions per channel
    y = x + a                           residual output

Each channel's map ``a[n, :, :, c]`` sums to 1 over the H*W positions. Note the scale:
a uniform map is 1/(H*W) per position, so at initialisation the block is close to the
identity and it learns how far to move from it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from attnjax.blocks.primitives import sow_map, spatial_softmax
from attnjax.validate import check_nhwc


def softmax_attention(x: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``s = weights * x``, ``a = spatial_softmax(s)``, ``y = x + a``. Returns ``(y, a)``."""
    scores = weights * x
    values = spatial_softmax(scores)  # float32 (the map); the residual in the scores' dtype
    return x + values.astype(scores.dtype), values


class SoftmaxAttention(nn.Module):
    """Section-3 attention: 1x1 conv weights, scores = weights * x, softmax over positions, residual.

    NHWC in, same shape out; C is read from the input. Sows the softmax map as
    ``intermediates/attention``.
    """

    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        check_nhwc(x, type(self).__name__)
        weights = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name="weights")(x)
        y, values = softmax_attention(x, weights)
        sow_map(self, "attention", values)
        return y
