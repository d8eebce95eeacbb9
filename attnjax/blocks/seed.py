"""The tutorial's attention block, made shape-correct: a channel-wise sigmoid gate.

The tutorial computes ``relu(sigmoid(conv1(x)) * conv2(x))`` with conv1: C -> C/8 and
conv2: C -> C, which multiplies C/8 channels by C channels and cannot run. What it means,
and what this block computes, is the bottleneck gate it describes in words::

    z = conv1x1_up(relu(conv1x1_down(x)))      C -> C/r -> C
    y = x * sigmoid(z)

i.e. a per-position, per-channel gate in (0, 1) that rescales the input.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from attnjax.blocks.primitives import reduced_channels, sigmoid_gate, sow_map
from attnjax.validate import check_nhwc


class SeedAttention(nn.Module):
    """The tutorial's block: 1x1 conv C -> C/r, ReLU, 1x1 conv -> C, sigmoid gate on the input.

    NHWC in, same shape out; C is read from the input. Sows the gate (same shape as the
    input) as ``intermediates/attention``.
    """

    reduction: int = 8
    min_channels: int = 8
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        check_nhwc(x, type(self).__name__)
        channels = x.shape[-1]
        hidden = reduced_channels(channels, self.reduction, self.min_channels)
        z = nn.Conv(hidden, (1, 1), dtype=self.dtype, name="reduce")(x)
        z = nn.Conv(channels, (1, 1), dtype=self.dtype, name="expand")(nn.relu(z))
        y, gate = sigmoid_gate(x, z)
        sow_map(self, "attention", gate)
        return y
