"""Axial attention: multi-head self-attention along the height axis, then along the width axis.

Paper: Huiyu Wang, Yukun Zhu, Bradley Green, Hartwig Adam, Alan Yuille and Liang-Chieh Chen (2020),
"Axial-DeepLab: Stand-Alone Axial-Attention for Panoptic Segmentation", ECCV.

One axial-attention layer along an axis of length L, for each line of the map along it (a
column for the height layer, a row for the width layer), position o = 0 .. L-1 of the line,
per head (the paper's eq. 4, position-sensitive, global over the line)::

    q, k, v = split(W_qkv x)                        1x1, no bias: per head d_qk, d_qk and d_v channels
    l[o, p] = q_o . k_p + q_o . r^q_{p-o} + k_p . r^k_{p-o}
    a[o, p] = softmax_p(l[o, p])                    over the L positions p of the line
    y_o = sum_p a[o, p] (v_p + r^v_{p-o})           heads concatenated: C channels

r^q, r^k (d_qk channels) and r^v (d_v channels) are learned relative position embeddings, one
per offset p - o in [-(S-1), S-1] for a maximum span S, shared by the heads (the official
code's ``relative`` table). The block is the paper's pair of layers::

    y = width_layer(height_layer(x))

with separate weights. NHWC in, NHWC out, C channels.

Sown maps (both softmaxes over the last axis):

- ``intermediates/height``: (N, heads, H, W, H); ``[n, g, h, w, :]`` are the weights of query
  (h, w) over the H positions of its column (head g).
- ``intermediates/width``: (N, heads, H, W, W); ``[n, g, h, w, :]`` over the W positions of its
  row, computed on the height layer's output.

Choices and deviations:

- Heads: ``num_heads=None`` (the default) uses the largest divisor of C up to ``max_heads`` (8,
  the paper's), so that any C works (C = 13 or 37: 1 head; C = 3: 3 heads; C = 64: 8); an explicit
  ``num_heads`` must divide C (:func:`attnjax.blocks.primitives.resolve_heads`). Per head
  d_v = C / heads and d_qk = max(d_v // 2, 1): the official code's ``group_planes // 2`` for
  the queries and keys, floored at 1 (d_v = 1 would give 0). For odd d_v the official split of
  ``2 * C`` projected channels does not add up; ours projects ``heads * (2 d_qk + d_v)``
  channels, laid out per head as [q, k, v] as in the official code.
- Maximum span. The relative table has 2S - 1 rows. ``max_span=None`` (default) binds S at
  initialisation to the input's length along each axis (S_H = H for the height layer, S_W = W
  for the width layer), as the official code binds ``kernel_size`` to the feature size.
  Shorter inputs later use the table's central rows; a longer axis than S raises
  :class:`attnjax.validate.InputError` (initialise on the largest input, or set ``max_span``
  to cover it: one S for both axes).
- No batch norm. The official code (csrhddlam/axial-deeplab) normalises the qkv projection,
  the three logit terms separately (summed after BN) and the two output terms separately (BN
  on ``sv`` and ``sve``, then summed). The paper's eq. 4 has none of these; we follow the
  equation, so the block is deterministic and independent of the batch. (The paper's bottleneck,
  1x1 convs with BN around the two layers and the residual, belongs to the host network.)
- No 1/sqrt(d) scale on the logits, as in eq. 4 and the official code.
- Relative offsets as in the paper: all three tables are indexed by p - o (key minus query).
  The official code indexes r^q and r^v by p - o but r^k by o - p (a mirrored table: the same
  family of functions, so only a converted official checkpoint would need its r^k rows
  reversed).
- Initialisation as the official code: the table ~ N(0, 1/d_v) (its ``sqrt(1/group_planes)``);
  W_qkv is Flax's default LeCun normal (variance 1/C, truncated), the official N(0, 1/C).
- Formulation: the qkv projection is one matmul per image and the relative tables are broadcast
  over the lines, so that every product is a batched matmul whose rounding does not depend on the
  batch size (XLA:CPU's ``nn.Conv`` folds the batch into the matmul's rows): an image's output is
  the same, to the bit, alone or in any batch. The parameters are laid out as ``nn.Conv``'s.
- The output is the second layer's: no residual and no output projection (the paper's layer
  replaces a convolution inside a residual bottleneck), so the block is not the identity at
  initialisation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from attnjax.blocks.primitives import (
    resolve_heads,
    softmax_in_float32,
    sow_map,
)
from attnjax.validate import InputError, check_nhwc


def relative_embeddings(table: jax.Array, length: int) -> jax.Array:
    """``e[o, p] = table[p - o + S - 1]`` for ``o, p < length``, ``S = (rows + 1) // 2``; shape ``(length, length, c)``.

    ``table`` is ``(2 S - 1, c)``: one row per offset p - o from -(S-1) to S-1. Needs ``length <= S``.
    """
    span = (table.shape[0] + 1) // 2
    offsets = jnp.arange(length)[None, :] - jnp.arange(length)[:, None] + span - 1
    return table[offsets]


def axial_attention_1d(
    q: jax.Array, k: jax.Array, v: jax.Array, rq: jax.Array, rk: jax.Array, rv: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Position-sensitive self-attention along one axis (the paper's eq. 4), per head.

    ``q``, ``k``: ``(B, L, heads, d_qk)``; ``v``: ``(B, L, heads, d_v)``; ``rq``, ``rk``:
    ``(L, L, d_qk)`` and ``rv``: ``(L, L, d_v)``, indexed ``[o, p]`` (query o, key p), shared by
    the heads. Returns ``(y, a)``: ``y[b, o, g] = sum_p a[b, g, o, p] (v[b, p, g] + rv[o, p])`` of
    shape ``(B, L, heads, d_v)`` and ``a = softmax_p(q_o.k_p + q_o.rq[o, p] + k_p.rk[o, p])`` of
    shape ``(B, heads, L, L)``.
    """
    # The tables are broadcast over the lines b, so that every product is a per-line batched matmul: XLA:CPU
    # computes each line the same way whatever the batch size (folding b into a matmul's rows does not), which
    # keeps an image's output independent of the rest of the batch to the last bit.
    rq, rk, rv = (jnp.broadcast_to(r, (q.shape[0], *r.shape)) for r in (rq, rk, rv))
    logits = (
        jnp.einsum("bogc,bpgc->bgop", q, k)
        + jnp.einsum("bogc,bopc->bgop", q, rq)
        + jnp.einsum("bpgc,bopc->bgop", k, rk)
    )
    a = softmax_in_float32(logits)  # the map, float32; the products in the logits' dtype
    w = a.astype(logits.dtype)
    y = jnp.einsum("bgop,bpgc->bogc", w, v) + jnp.einsum("bgop,bopc->bogc", w, rv)
    return y, a


class PointwiseProjection(nn.Module):
    """A 1x1 convolution without bias (parameter ``kernel``, ``(1, 1, C, features)`` as ``nn.Conv``'s), computed
    as one matmul per image: ``nn.Conv`` folds the batch into the matmul's rows, whose rounding on XLA:CPU then
    depends on the batch size."""

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, c, self.features))
        x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
        kernel = jnp.broadcast_to(kernel[0, 0], (n, c, self.features))
        return jnp.einsum("npc,ncd->npd", x.reshape(n, h * w, c), kernel).reshape(n, h, w, self.features)


class AxialLayer(nn.Module):
    """One axial-attention layer along ``axis`` (1: height, 2: width) of an NHWC map; returns ``(y, weights)``.

    ``weights`` is ``(N, heads, H, W, L)``: each position's softmax over the L positions of its line.
    """

    num_heads: int
    axis: int
    max_span: int | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, who: str = "AxialLayer") -> tuple[jax.Array, jax.Array]:
        n, h, w, c = x.shape
        heads = self.num_heads
        d_v = c // heads
        d_qk = max(d_v // 2, 1)
        length = x.shape[self.axis]
        axis_name = {1: "height", 2: "width"}[self.axis]
        if self.has_variable("params", "relative"):  # apply: the span the table was made for
            span = (self.get_variable("params", "relative").shape[0] + 1) // 2
        else:  # init: bound here, from the option or the input
            span = self.max_span if self.max_span is not None else length
            if span < 1:
                raise InputError(f"{who}: max_span must be >= 1 (or None: the input's size at init); got {span}")
        if length > span:
            raise InputError(
                f"{who}: the input's {axis_name} is {length}, longer than the span {span} its relative position "
                f"table covers (bound at initialisation, from the input's size or max_span). Initialise on the "
                f"largest input, or set max_span >= {length}."
            )
        table = self.param(
            "relative", nn.initializers.normal(stddev=(1.0 / d_v) ** 0.5), (2 * span - 1, 2 * d_qk + d_v)
        )
        qkv = PointwiseProjection(heads * (2 * d_qk + d_v), dtype=self.dtype, name="qkv")(x)
        (table,) = promote_dtype(table, dtype=qkv.dtype)
        if self.axis == 1:  # lines are columns: (N, W, H, ...)
            qkv = qkv.transpose(0, 2, 1, 3)
        lines = qkv.reshape(-1, length, heads, 2 * d_qk + d_v)
        q, k, v = jnp.split(lines, [d_qk, 2 * d_qk], axis=-1)
        rq, rk, rv = jnp.split(relative_embeddings(table, length), [d_qk, 2 * d_qk], axis=-1)
        y, a = axial_attention_1d(q, k, v, rq, rk, rv)
        if self.axis == 1:
            y = y.reshape(n, w, h, c).transpose(0, 2, 1, 3)
            a = a.reshape(n, w, heads, h, h).transpose(0, 2, 3, 1, 4)  # (N, heads, H, W, H)
        else:
            y = y.reshape(n, h, w, c)
            a = a.reshape(n, h, heads, w, w).transpose(0, 2, 1, 3, 4)  # (N, heads, H, W, W)
        return y, a


class AxialAttention(nn.Module):
    """Axial-DeepLab's position-sensitive axial attention: along the height, then along the width.

    NHWC in, same shape out; C is read from the input. Heads: ``num_heads``, or for ``None`` the
    largest divisor of C up to ``max_heads``. Sows ``intermediates/height`` ``(N, heads, H, W, H)``
    and ``intermediates/width`` ``(N, heads, H, W, W)``.
    """

    num_heads: int | None = None  # None: the largest divisor of C up to max_heads
    max_heads: int = 8
    max_span: int | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        who = type(self).__name__
        check_nhwc(x, who)
        heads = resolve_heads(x.shape[-1], self.num_heads, self.max_heads, who)
        y, height = AxialLayer(heads, 1, self.max_span, self.dtype, name="height_attention")(x, who)
        sow_map(self, "height", height)
        y, width = AxialLayer(heads, 2, self.max_span, self.dtype, name="width_attention")(y, who)
        sow_map(self, "width", width)
        return y
