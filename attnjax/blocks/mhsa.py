"""MHSA: multi-head self-attention over the positions of a feature map, with a 2-D sinusoidal position code.

The attention of Vaswani et al. (2017), "Attention Is All You Need", applied to the H*W
positions of a CNN feature map as in BoTNet (Srinivas et al. 2021, "Bottleneck Transformers
for Visual Recognition") and ViT (Dosovitskiy et al. 2021), with the fixed 2-D sinusoidal
encoding that DETR (Carion et al. 2020, "End-to-End Object Detection with Transformers")
adds to the queries' and keys' input::

    p = PE(H, W, C)                                fixed; rows on channels [0, C//2), columns on [C//2, C)
    q = W_q(x + p), k = W_k(x + p), v = W_v(x)     1x1 projections C -> C, split into h heads of C/h
    o = softmax(q k^T / sqrt(C/h)) v               per head, over all H*W positions
    y = x + W_o(o)                                 W_o: 1x1, C -> C, zero-initialised

The attention runs through :func:`attnjax.ops.attention.dot_product_attention`: on GPU/TPU
``jax.nn.dot_product_attention`` (a fused cuDNN kernel where the dtype allows it), on CPU
batched einsums with a hand-written backward pass, 1.4-2.9x faster there for this block's
forward + backward (the choice and its reasons: :mod:`attnjax.ops`). Neither path returns the
weights, so when ``intermediates`` is mutable the block also computes them with an einsum and
a softmax and sows them as ``intermediates/attention``, shape ``(N, heads, H*W, H*W)``
(positions in row-major ``(h, w)`` order; each row sums to 1). Otherwise they are not computed.

Choices:
- Position code: for an axis with c channels, channel i is ``sin(pos * w_i)`` for even i and
  ``cos(pos * w_i)`` for odd i, with ``w_i = T^(-2 floor(i/2) / c)``, T = 10000 and pos =
  0, 1, 2, ... the integer row (or column) index: DETR's interleaved sine code without its
  normalisation of positions to [0, 2 pi], so a pixel's code does not depend on the map's
  size. It has no parameters and works at any H, W given at call time, unlike BoTNet's
  relative logits or ViT's learned embeddings, which tie the parameters to one resolution.
  For odd C the columns get the extra channel; for C = 1 only the columns are encoded.
- W_o starts at zero (kernel and bias), so the block is exactly the identity at
  initialisation and can be inserted into a network without disturbing it. The price: in
  the first step only W_o receives a gradient (q, k and v do from the second step on).
- All four 1x1 projections have a bias, as in the Transformer and ViT.
- Heads: 4 (``num_heads``), which must divide C; ``num_heads=None`` takes the largest divisor of C
  up to ``max_heads`` instead (:func:`attnjax.blocks.primitives.resolve_heads`, the rule of every
  multi-head block).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.blocks.primitives import (
    at_least_float32,
    resolve_heads,
    softmax_in_float32,
    sow_map,
)
from attnjax.ops import attention
from attnjax.validate import check_nhwc


def sinusoidal_encoding_1d(length: int, channels: int, temperature: float = 10000.0) -> jax.Array:
    """``(length, channels)`` sinusoidal code of the positions ``p = 0 .. length - 1``.

    ``e[p, i] = sin(p w_i)`` for even i and ``cos(p w_i)`` for odd i, ``w_i = T^(-2 floor(i/2) / channels)``.
    """
    i = jnp.arange(channels)
    frequencies = temperature ** (-2.0 * (i // 2) / max(channels, 1))
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * frequencies
    return jnp.where(i % 2 == 0, jnp.sin(angles), jnp.cos(angles))


def sinusoidal_position_encoding_2d(height: int, width: int, channels: int, temperature: float = 10000.0) -> jax.Array:
    """``(H, W, C)`` code: channels ``[0, C//2)`` encode the row, ``[C//2, C)`` the column.

    Each half is :func:`sinusoidal_encoding_1d` of its axis, broadcast along the other axis.
    """
    row_channels = channels // 2
    rows = sinusoidal_encoding_1d(height, row_channels, temperature)  # (H, C//2)
    cols = sinusoidal_encoding_1d(width, channels - row_channels, temperature)  # (W, C - C//2)
    return jnp.concatenate(
        [
            jnp.broadcast_to(rows[:, None, :], (height, width, row_channels)),
            jnp.broadcast_to(cols[None, :, :], (height, width, channels - row_channels)),
        ],
        axis=-1,
    )


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``o = softmax(q k^T / sqrt(d)) v`` per head, through ``jax.nn.dot_product_attention`` on every backend.

    ``q``, ``k``, ``v``: ``(N, P, heads, d)``; returns ``(N, P, heads, d)``. The reference the
    block's attention is tested against; the block itself calls
    :func:`attnjax.ops.attention.dot_product_attention`, which is faster on CPU but, having a
    custom VJP there, differentiable in reverse mode only. This one also has forward mode.
    """
    return jax.nn.dot_product_attention(q, k, v)


def attention_weights(q: jax.Array, k: jax.Array) -> jax.Array:
    """``a = softmax_j(q_i . k_j / sqrt(d))`` for ``(N, P, heads, d)`` inputs; returns ``(N, heads, P, P)``."""
    logits = jnp.einsum("nihd,njhd->nhij", at_least_float32(q), at_least_float32(k)) * q.shape[-1] ** -0.5
    return softmax_in_float32(logits)  # the logits and the softmax in float32, as the attention itself


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over positions, sinusoidal 2-D positions on q and k, zero-initialised output, residual.

    NHWC in, same shape out; C is read from the input and must be divisible by ``num_heads``
    (``None``: the largest divisor of C up to ``max_heads``). When ``intermediates`` is mutable, sows
    the softmax weights ``(N, heads, H*W, H*W)`` as ``intermediates/attention``.
    """

    num_heads: int | None = 4  # None: the largest divisor of C up to max_heads
    max_heads: int = 4
    temperature: float = 10000.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        who = type(self).__name__
        check_nhwc(x, who)
        n, h, w, c = x.shape
        heads = resolve_heads(c, self.num_heads, self.max_heads, who)
        head_dim = c // heads
        x_pos = x + sinusoidal_position_encoding_2d(h, w, c, self.temperature).astype(x.dtype)

        def project(name, inputs):
            y = nn.Conv(c, (1, 1), dtype=self.dtype, name=name)(inputs)
            return y.reshape(n, h * w, heads, head_dim)

        q, k, v = project("query", x_pos), project("key", x_pos), project("value", x)
        o = attention.dot_product_attention(q, k, v).reshape(n, h, w, c)
        if self.is_mutable_collection("intermediates"):
            sow_map(self, "attention", attention_weights(q, k))
        out = nn.Conv(
            c,
            (1, 1),
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="out",
        )
        return x + out(o)
