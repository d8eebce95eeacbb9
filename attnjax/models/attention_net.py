"""The tutorial's classifier: conv 64 -> attention -> conv 128 -> flatten -> dense 512 -> dense K.

Deviations from the tutorial's code, each for a reason (see the README's table):
- ReLU after conv1, conv2 and fc1 (the tutorial's prose implies a standard CNN; without
  them the stack would be linear up to the attention block).
- 'SAME' padding on the 3x3 convs, so an 8x8 input keeps 8x8 maps and fc1 sees 128*8*8
  as the tutorial's ``fc1`` expects.
- Pooling for inputs larger than 8x8, so fc1 stays about the tutorial's size: a 2x2 max
  pool after conv1 on each spatial axis longer than 8, then after conv2 2x2 max pools
  until both axes are at most 8. 32x32 -> 16 -> 8 (fc1 = 128*8*8), 28x28 -> 14 -> 7
  (128*7*7), 8x8 unpooled (128*8*8), smaller inputs unpooled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import blocks
from attnjax.layers import BATCH_AXIS
from attnjax.validate import check_channels, check_nhwc

TARGET_SIZE = 8  # the tutorial's fc1 expects 8x8 maps


def max_pool_2x2(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """Non-overlapping max pool of NHWC ``x`` with ``window`` (each 1 or 2); a trailing odd row/column is dropped.

    Written as reshape + max rather than ``nn.max_pool``: on XLA:CPU the gradient of
    ``max_pool`` (select-and-scatter) is about 10x slower than the gradient of a max
    reduction (experiments/RESULTS.md). The forward results are identical.
    """
    wh, ww = window
    b, h, w, c = x.shape
    x = x[:, : h // wh * wh, : w // ww * ww]
    return x.reshape(b, h // wh, wh, w // ww, ww, c).max(axis=(2, 4))


def halve_axes_longer_than(x: jax.Array, size: int) -> jax.Array:
    """2x2 max pool (stride 2, no padding) along each spatial axis of NHWC ``x`` longer than ``size``."""
    window = tuple(2 if n > size else 1 for n in x.shape[1:3])
    if window == (1, 1):
        return x
    return max_pool_2x2(x, window)


def pool_to_at_most(x: jax.Array, size: int) -> jax.Array:
    """Repeat ``halve_axes_longer_than`` until both spatial axes are at most ``size``."""
    while max(x.shape[1:3]) > size:
        x = halve_axes_longer_than(x, size)
    return x


class AttentionNet(nn.Module):
    """The tutorial's network with a pluggable attention block (``None`` for the baseline).

    Takes NHWC images with any number of channels and any size; returns logits of shape
    (batch, num_classes). ``train`` is passed on to the block (for blocks with batch norm).
    """

    num_classes: int = 10
    block: Callable[..., nn.Module] | nn.Module | None = None  # a factory (see attnjax.blocks.factory) or a module
    dtype: Any = jnp.float32
    axis_name: str | None = BATCH_AXIS  # the block's batch-norm synchronisation axis: the step's caller maps over it

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        who = type(self).__name__
        check_nhwc(x, who)
        if not self.is_initializing() and "conv1" in self.variables.get("params", {}):
            check_channels(x, self.variables["params"]["conv1"]["kernel"].shape[-2], who)

        x = x.astype(self.dtype)
        x = nn.relu(nn.Conv(64, (3, 3), padding="SAME", dtype=self.dtype, name="conv1")(x))
        x = halve_axes_longer_than(x, TARGET_SIZE)
        block = blocks.build(self.block, name="block", dtype=self.dtype, axis_name=self.axis_name)
        if block is not None:
            x = block(x, train=train)
        x = nn.relu(nn.Conv(128, (3, 3), padding="SAME", dtype=self.dtype, name="conv2")(x))
        x = pool_to_at_most(x, TARGET_SIZE)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(512, dtype=self.dtype, name="fc1")(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))  # the loss wants >= fp32 logits
