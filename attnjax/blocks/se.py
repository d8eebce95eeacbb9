"""Squeeze-and-Excitation: a channel gate from globally pooled features.

Paper: Jie Hu, Li Shen and Gang Sun (2018), "Squeeze-and-Excitation Networks", CVPR.

What it computes, for NHWC ``x`` with C channels::

    z = mean over (H, W) of x                       squeeze: (N, 1, 1, C)
    s = sigmoid(W2 relu(W1 z + b1) + b2)            excitation: FC C -> C/r -> C, r = 16
    y = x * s                                       scale every channel of the input

Sown map: ``intermediates/attention``, the channel gate ``s`` of shape (N, 1, 1, C), in (0, 1).

Deviation from the paper: the bottleneck width is ``reduced_channels(C, r) = max(C // r, min(C, 8))``
instead of ``C / r``. It equals the paper's width for C >= 128 (r = 16); below that ``C // 16`` would be
tiny or 0 (C=12 gives 0), so the floor keeps at least 8 units, as timm's SE does, without exceeding C.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from attnjax.blocks.primitives import excitation_mlp, global_avg_pool, reduced_channels, sigmoid_gate
from attnjax.validate import check_nhwc


class SqueezeExcitation(nn.Module):
    """SE block: global average pool, FC C -> C/r, ReLU, FC -> C, sigmoid, times the input.

    NHWC in, same shape out; C is read from the input. Sows the (N, 1, 1, C) gate as
    ``intermediates/attention``.
    """

    reduction: int = 16
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        check_nhwc(x, type(self).__name__)
        channels = x.shape[-1]
        excitation = excitation_mlp(channels, reduced_channels(channels, self.reduction), self.dtype)
        y, gate = sigmoid_gate(x, excitation(global_avg_pool(x)))
        self.sow("intermediates", "attention", gate)
        return y
