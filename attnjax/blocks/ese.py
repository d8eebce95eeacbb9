"""Effective Squeeze-Excitation (eSE): SE with one full-width FC layer instead of a bottleneck.

Paper: Youngwan Lee and Jongyoul Park (2020), "CenterMask: Real-Time Anchor-Free Instance Segmentation",
CVPR (the eSE module of its VoVNetV2 backbone).

What it computes, for NHWC ``x`` with C channels::

    z = mean over (H, W) of x                       squeeze: (N, 1, 1, C)
    g = gate(W z + b)                               one FC C -> C, no reduction
    y = x * g

with ``gate = hard_sigmoid(t) = relu6(t + 3) / 6 = clip(t / 6 + 1/2, 0, 1)`` by default, or the logistic
sigmoid with ``gate="sigmoid"``. The paper's argument: SE's two FCs C -> C/r -> C lose channel information
in the bottleneck; one C -> C FC keeps it (C^2 + C parameters).

Sown map: ``intermediates/attention``, the channel gate ``g`` of shape (N, 1, 1, C), in [0, 1] (the hard
sigmoid reaches exactly 0 below t = -3 and exactly 1 above t = 3; the sigmoid stays in (0, 1)).

Choices and deviations:

- Gate: the paper's equation writes it as sigma, SE's notation for the sigmoid, and does not discuss it
  further; the official VoVNetV2 code (``eSEModule``) uses the hard sigmoid ``relu6(t + 3) / 6``, and so
  does timm's ``EffectiveSEModule`` (``gate_layer='hard_sigmoid'``, the same function). The official code
  decides: ``gate="hard_sigmoid"`` is the default. Its gradient is 1/6 inside (-3, 3) and 0 outside, so a
  saturated channel passes no gradient to the FC; ``gate="sigmoid"`` is the smooth alternative.
- timm's experimental ``add_maxpool`` (the squeeze as the mean of average and max pooling) is not offered.
- The FC is initialised LeCun-normal (Flax's default), not PyTorch's default.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from attnjax.blocks.primitives import global_avg_pool, sow_map
from attnjax.validate import InputError, check_nhwc

GATES = {"hard_sigmoid": jax.nn.hard_sigmoid, "sigmoid": jax.nn.sigmoid}


def gate_function(name: str):
    """The gate nonlinearity called ``name``: ``"hard_sigmoid"`` (relu6(t + 3) / 6) or ``"sigmoid"``."""
    try:
        return GATES[name]
    except KeyError:
        raise InputError(f"gate must be one of {', '.join(sorted(GATES))}, got {name!r}") from None


def ese_attention(x: jax.Array, logits: jax.Array, gate: str = "hard_sigmoid") -> tuple[jax.Array, jax.Array]:
    """``g = gate(logits)``, ``y = x * g``; ``logits`` (N, 1, 1, C) broadcasts over positions. Returns ``(y, g)``."""
    weights = gate_function(gate)(logits)
    return x * weights, weights


class EffectiveSqueezeExcitation(nn.Module):
    """eSE block: global average pool, one FC C -> C, hard sigmoid (or sigmoid), times the input.

    NHWC in, same shape out; C is read from the input. Parameters: ``fc`` (kernel (C, C), bias (C,)).
    Sows the (N, 1, 1, C) gate as ``intermediates/attention``.
    """

    gate: str = "hard_sigmoid"  # or "sigmoid"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        check_nhwc(x, type(self).__name__)
        gate_function(self.gate)  # a bad name fails here, before any parameter is made
        logits = nn.Dense(x.shape[-1], dtype=self.dtype, name="fc")(global_avg_pool(x))
        y, weights = ese_attention(x, logits, self.gate)
        sow_map(self, "attention", weights)
        return y
