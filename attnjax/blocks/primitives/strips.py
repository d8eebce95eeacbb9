"""Strips: directional pooling and the depthwise convs along a strip (``coord``, ``scoord``, ``ela``, ``strip``).

Part of :mod:`attnjax.blocks.primitives`, which exports every name.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from attnjax.ops import conv_with_formulation

# Strips: the direction-wise pooling of coordinate attention and its variants (``coord``, ``scoord``, ``ela``,
# ``strip``), and the depthwise convs along a strip (``ela``, ``strip``).


def directional_pool(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``z_h[n, h, 0, c] = 1/W * sum_w x[n, h, w, c]`` and ``z_w[n, 0, w, c] = 1/H * sum_h x[n, h, w, c]``."""
    return jnp.mean(x, axis=2, keepdims=True), jnp.mean(x, axis=1, keepdims=True)


def additive_strip_gate(x: jax.Array, logits_h: jax.Array, logits_w: jax.Array, gate) -> tuple[jax.Array, jax.Array]:
    """One gate from two strips (``scoord``, ``strip``): ``a = gate(logits_h + logits_w)``, the (N, H, 1, C) and
    (N, 1, W, C) logits broadcast to (N, H, W, C); ``y = x * a``. Returns ``(y, a)``."""
    a = gate(logits_h + logits_w)
    return x * a, a


_NHWC_HWIO = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _is_depthwise_same(lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation, **arguments) -> bool:
    """Whether the call is a stride-1, undilated depthwise NHWC conv with explicit size-keeping padding."""
    if lhs.ndim != 4 or rhs.ndim != 4 or arguments["batch_group_count"] != 1:
        return False
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, arguments["dimension_numbers"]) != _NHWC_HWIO:
        return False
    channels, ones = lhs.shape[3], (1, 1)
    if not (rhs.shape[2] == 1 and rhs.shape[3] == channels == arguments["feature_group_count"]):
        return False
    if (tuple(window_strides), tuple(lhs_dilation or ones), tuple(rhs_dilation or ones)) != (ones, ones, ones):
        return False
    if isinstance(padding, str):
        return False
    pairs = [tuple(int(p) for p in pair) for pair in padding]
    return all(min(pair) >= 0 and sum(pair) == k - 1 for pair, k in zip(pairs, rhs.shape[:2], strict=True))


@conv_with_formulation
def depthwise_taps(lhs, rhs, **arguments):
    """``lax.conv_general_dilated``, with a size-keeping depthwise conv written as one product per kernel tap.

    ``out[n, h, w, c] = sum_{a, b} rhs[a, b, 0, c] * xp[n, h + a, w + b, c]`` (xp: the zero-padded input), a sum
    of kh * kw shifted slices: exact, cheap for the strip kernels (k x 1, 1 x k) of ``ela`` and ``strip``, and it
    avoids grouped convs, slow on XLA:CPU (:mod:`attnjax.ops.grouped_conv`). Every other call is
    ``lax.conv_general_dilated``.
    """
    if not _is_depthwise_same(lhs, rhs, **arguments):
        return None
    height, width = lhs.shape[1:3]
    padded = jnp.pad(lhs, ((0, 0), *(tuple(pair) for pair in arguments["padding"]), (0, 0)))
    taps = [
        rhs[a, b, 0] * padded[:, a : a + height, b : b + width]
        for a in range(rhs.shape[0])
        for b in range(rhs.shape[1])
    ]
    return functools.reduce(jnp.add, taps)


def strip_conv(channels: int, kernel_size: int, axis: int, use_bias: bool, dtype, name: str) -> nn.Conv:
    """A depthwise conv along one axis, 'same' zero padding: (k, 1) along H (``axis=1``), (1, k) along W (``axis=2``).

    timm's ``Conv2d(C, C, (k, 1), padding=(k // 2, 0), groups=C)`` and its (1, k) twin, the strips' convs of ``ela``
    and ``strip``; ``kernel_size`` must be odd (:func:`odd_size`). Runs as :func:`depthwise_taps`. Call it when
    compact.
    """
    pad = (kernel_size - 1) // 2
    size, padding = ((kernel_size, 1), ((pad, pad), (0, 0))) if axis == 1 else ((1, kernel_size), ((0, 0), (pad, pad)))
    return nn.Conv(
        channels,
        size,
        padding=padding,
        feature_group_count=channels,
        use_bias=use_bias,
        dtype=dtype,
        conv_general_dilated=depthwise_taps,
        name=name,
    )
