"""Criss-cross attention: each position attends to the positions in its row and its column.

Paper: Zilong Huang, Xinggang Wang, Lichao Huang, Chang Huang, Yunchao Wei and Wenyu Liu (2019),
"CCNet: Criss-Cross Attention for Semantic Segmentation", ICCV.

What it computes, for NHWC ``x`` with C channels, at position u = (h, w)::

    Q, K = conv1x1(x), conv1x1(x)                   C -> C' each, C' = C/8 (see below)
    V = conv1x1(x)                                  C -> C
    Omega_u = column of u, then row of u             H + W entries, u itself only in the row
    d[u, i] = Q_u . K_{Omega_u,i}                   affinity; the column entry of u itself is -inf
    A[u] = softmax_i(d[u, i])                       one softmax over the joint H + W entries
    H'_u = gamma * sum_i A[u, i] V_{Omega_u,i} + x_u    gamma = 0 at initialisation

so every position aggregates the H + W - 1 distinct positions of its criss-cross path.
Recurrent criss-cross attention (RCCA) applies the same module ``recurrence`` times, with the
same weights, to its own output: after two loops every position has reached every position.

Sown map: ``intermediates/attention``, the softmax A of shape (N, H, W, H + W), once per loop
(``recurrence`` entries). ``A[n, h, w, :H]`` are the weights of the column positions
(h' = 0 .. H-1; the entry h' = h is exactly 0), ``A[n, h, w, H:]`` those of the row positions
(w' = 0 .. W-1, u itself included); each (h, w) sums to 1.

Choices and deviations:

- The position itself is counted once. The paper's Omega_u has H + W - 1 entries; the
  official code (speedinghzl/CCNet, ``CrissCrossAttention``) computes a full column (H) and a
  full row (W) and masks the column's entry at u with -inf before the joint softmax, which gives
  exactly the paper's H + W - 1 weights. We follow it, including the layout [column, row] of the
  H + W entries.
- Recurrence R = 1 by default (one criss-cross module, as External-Attention's catalogue and
  the official ``CrissCrossAttention`` module); ``recurrence=2`` is the paper's RCCA with shared
  weights (the paper's convs before and after the loop, in its segmentation head, are left out).
- Reduced width C' = ``reduced_channels(C, reduction=8)`` = ``max(C // 8, min(C, 8))``: the
  paper's C' < C with the official ``in_dim // 8`` for C >= 64, floored so that small C work.
- No scaling of the affinity by 1/sqrt(C'), as in the paper and the official code; the three
  1x1 convs have biases, as in the official code.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from attnjax.blocks.primitives import (
    reduced_channels,
    softmax_in_float32,
    sow_map,
)
from attnjax.validate import InputError, check_nhwc


def criss_cross_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Aggregate each position's column and row: ``out_u = sum_i A[u, i] V_i`` over the criss-cross path of u.

    ``query``, ``key``: ``(N, H, W, C')``; ``value``: ``(N, H, W, C_v)``. ``A`` is the softmax over
    the H column entries (u's own masked with -inf) and the W row entries together. Returns
    ``(out, A)``: ``out`` of shape ``(N, H, W, C_v)``, ``A`` of shape ``(N, H, W, H + W)``.
    """
    h = query.shape[1]
    column = jnp.einsum("nhwc,ngwc->nhwg", query, key)  # (N, H, W, H): u = (h, w) against (g, w)
    column = jnp.where(jnp.eye(h, dtype=bool)[:, None, :], -jnp.inf, column)
    row = jnp.einsum("nhwc,nhvc->nhwv", query, key)  # (N, H, W, W): u = (h, w) against (h, v)
    logits = jnp.concatenate([column, row], axis=-1)
    attention = softmax_in_float32(logits)  # the map, float32; the products in the logits' dtype
    a = attention.astype(logits.dtype)
    out = jnp.einsum("nhwg,ngwc->nhwc", a[..., :h], value)
    out = out + jnp.einsum("nhwv,nhvc->nhwc", a[..., h:], value)
    return out, attention


class CrissCrossAttention(nn.Module):
    """CCNet's criss-cross attention: ``y = x + gamma * sum over row and column of A V``, identity at init.

    NHWC in, same shape out; C is read from the input. ``recurrence`` applies the module that many
    times with shared weights (RCCA). Sows the ``(N, H, W, H + W)`` weights as
    ``intermediates/attention``, once per loop.
    """

    reduction: int = 8
    min_channels: int = 8
    recurrence: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        who = type(self).__name__
        check_nhwc(x, who)
        if self.recurrence < 1:
            raise InputError(
                f"{who}: recurrence must be >= 1 (1: one criss-cross pass; 2: RCCA); got {self.recurrence}"
            )
        channels = x.shape[-1]
        inner = reduced_channels(channels, self.reduction, self.min_channels)
        query = nn.Conv(inner, (1, 1), dtype=self.dtype, name="query")
        key = nn.Conv(inner, (1, 1), dtype=self.dtype, name="key")
        value = nn.Conv(channels, (1, 1), dtype=self.dtype, name="value")
        gamma = self.param("gamma", nn.initializers.zeros, ())
        y = x
        for _ in range(self.recurrence):  # the same layers each loop: RCCA shares its weights
            out, attention = criss_cross_attention(query(y), key(y), value(y))
            sow_map(self, "attention", attention)
            y, out, g = promote_dtype(y, out, gamma, dtype=self.dtype)
            y = y + g * out
        return y
