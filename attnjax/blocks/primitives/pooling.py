"""Pooling over the positions, and a spatial gate's conv.

Part of :mod:`attnjax.blocks.primitives`, which exports every name.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.blocks.primitives.precision import softmax_in_float32
from attnjax.ops.single_output_conv import single_output_conv

SPATIAL_AXES = (-3, -2)  # H and W of an NHWC array


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Squeeze: ``z[n, 0, 0, c] = 1/(H*W) * sum_{h,w} x[n, h, w, c]``, shape (N, 1, 1, C)."""
    return jnp.mean(x, axis=(1, 2), keepdims=True)


def global_max_pool(x: jax.Array) -> jax.Array:
    """``m[n, 0, 0, c] = max_{h,w} x[n, h, w, c]``, shape (N, 1, 1, C)."""
    return jnp.max(x, axis=(1, 2), keepdims=True)


def spatial_softmax(scores: jax.Array) -> jax.Array:
    """``softmax`` over the H and W axes of NHWC ``scores``, separately per image and channel, in float32.

    Computed and returned in at least float32 (:mod:`.precision`); cast it to the compute dtype for products.
    """
    return softmax_in_float32(scores, axis=SPATIAL_AXES)


def attention_pool(x: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax-weighted sum over positions: ``a = softmax over (H, W) of logits``, ``c = sum_{h,w} a * x``.

    ``logits`` is (N, H, W, 1), so ``c[n, 0, 0, :] = sum_{h,w} a[n, h, w, 0] * x[n, h, w, :]``.
    Returns ``(c, a)``: c of shape (N, 1, 1, C), a of the shape of ``logits``. GC's context
    modelling and PSA's channel-only pooling.
    """
    weights = spatial_softmax(logits)  # float32; the sum runs in the inputs' dtype
    return jnp.sum(weights.astype(jnp.result_type(x, logits)) * x, axis=(1, 2), keepdims=True), weights


def spatial_conv(kernel_size: int, dtype=None, use_bias: bool = True) -> nn.Conv:
    """A spatial gate's k x k conv to one channel, 'same' padding, named ``spatial_conv`` (call it when compact).

    Runs through :func:`attnjax.ops.single_output_conv`, the backend's fastest formulation.
    """
    pad = (kernel_size - 1) // 2
    return nn.Conv(
        1,
        (kernel_size, kernel_size),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        conv_general_dilated=single_output_conv,
        name="spatial_conv",
    )
