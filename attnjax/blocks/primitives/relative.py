"""Relative position logits and the projections of 2-D self-attention (``bottleneck``, ``halo``).

Part of :mod:`attnjax.blocks.primitives`, which exports every name.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.validate import InputError

# Relative position logits for 2-D self-attention, shared by ``bottleneck`` (BoTNet) and ``halo`` (HaloNet).
#
# From Shaw et al. (2018), "Self-Attention with Relative Position Representations" (NAACL), in the 2-D,
# factorised form of Bello et al. (2019), "Attention Augmented Convolutional Networks" (ICCV), that BoTNet
# (Srinivas et al. 2021) and HaloNet (Vaswani et al. 2021) use. A query at (y, x) and a key at (y', x') get
#
#     l(q, k) = q . k * scale  +  q . r^H[y' - y]  +  q . r^W[x' - x]
#
# with one learned d-vector per relative offset along each axis (tables r^H and r^W).
#
# 1-D layout. Queries sit at positions 0 .. Q-1, keys at s .. s+K-1 with the keys centred on the queries,
# s = -(K - Q) / 2 (BoTNet: K = Q, s = 0; HaloNet: a block of Q = b queries, a window of K = b + 2h keys,
# s = -h). The offsets key - query then take exactly R = Q + K - 1 values, and the table has one row per
# offset: row (R - 1) / 2 + offset. For key index j (0 .. K-1) and query index i that is row j - i + Q - 1.
#
# The lookup uses the "relative to absolute" trick of the BoTNet reference code (from Bello et al.):
# compute q . r against all R rows, (.., Q, R), then shift row i left by Q - 1 - i with one pad, one
# flatten, one slice and one reshape (rel_to_abs), no gather.


def relative_table_size(num_queries: int, num_keys: int) -> int:
    """Rows of a 1-D relative table: the number of distinct offsets ``key - query``, ``Q + K - 1``."""
    return num_queries + num_keys - 1


def rel_to_abs(x: jax.Array, num_keys: int) -> jax.Array:
    """Relative logits ``(..., Q, Q+K-1)`` to absolute ``(..., Q, K)``: ``out[..., i, j] = x[..., i, j - i + Q - 1]``.

    Pad one zero column (rows of length R + 1), flatten, drop the first Q - 1 entries and read
    Q rows of length R: entry (i, j) of the result is flat entry ``Q - 1 + i R + j`` =
    ``i (R + 1) + (j - i + Q - 1)`` of the padded rows, i.e. ``x[i, j - i + Q - 1]``; keep K columns.
    """
    *batch, q, r = x.shape
    if r != relative_table_size(q, num_keys):
        raise InputError(f"rel_to_abs: {q} queries and {num_keys} keys need {q + num_keys - 1} offsets, got {r}")
    padded = jnp.pad(x, [(0, 0)] * (len(batch) + 1) + [(0, 1)])
    flat = padded.reshape(*batch, q * (r + 1))[..., q - 1 : q - 1 + q * r]
    return flat.reshape(*batch, q, r)[..., :num_keys]


def relative_logits_1d(q: jax.Array, table: jax.Array, num_keys: int) -> jax.Array:
    """``out[..., i, j] = q[..., i, :] . table[j - i + Q - 1]``: queries ``(..., Q, d)``, table ``(Q+K-1, d)``.

    Returns ``(..., Q, K)``; see the section comment above for which offset each table row holds.
    """
    return rel_to_abs(jnp.einsum("...id,rd->...ir", q, table.astype(q.dtype)), num_keys)


def relative_logits_2d(
    q: jax.Array, height_table: jax.Array, width_table: jax.Array, key_size: tuple[int, int]
) -> jax.Array:
    """Factorised 2-D relative logits ``q[y, x] . (r^H[y' - y] + r^W[x' - x])``.

    ``q``: ``(..., Hq, Wq, d)``; ``height_table``: ``(Hq + Hk - 1, d)``; ``width_table``:
    ``(Wq + Wk - 1, d)``; ``key_size``: ``(Hk, Wk)``, keys centred on the queries. Returns
    ``(..., Hq, Wq, Hk, Wk)``.
    """
    key_h, key_w = key_size
    along_w = relative_logits_1d(q, width_table, key_w)  # (..., Hq, Wq, Wk)
    along_h = relative_logits_1d(jnp.swapaxes(q, -2, -3), height_table, key_h)  # (..., Wq, Hq, Hk)
    along_h = jnp.swapaxes(along_h, -2, -3)  # (..., Hq, Wq, Hk)
    return along_h[..., :, None] + along_w[..., None, :]


def attention_logits(content: jax.Array, relative: jax.Array, scale: float, scale_pos_embed: bool = False) -> jax.Array:
    """``content * scale + relative`` (timm's default), or ``(content + relative) * scale`` with ``scale_pos_embed``."""
    return (content + relative) * scale if scale_pos_embed else content * scale + relative


def truncated_normal_init(stddev: float):
    """timm's ``trunc_normal_(std=stddev)``: N(0, stddev^2) cut to [-2, 2] (absolute bounds, not in units of stddev).

    For the relative tables (stddev = d^-1/2) and the 1x1 projections (stddev = fan_in^-1/2).
    """
    return jax.nn.initializers.truncated_normal(stddev, lower=-2.0 / stddev, upper=2.0 / stddev)


def scale_for(d_qk: int) -> float:
    """The dot-product scale ``d_qk^-1/2``."""
    return 1.0 / math.sqrt(d_qk)


def relative_tables(block: nn.Module, height_rows: int, width_rows: int, d_qk: int) -> tuple[jax.Array, jax.Array]:
    """``block``'s relative tables ``height_rel`` (``height_rows``, d) and ``width_rel`` (``width_rows``, d).

    Initialised as timm's: N(0, 1/d) cut to [-2, 2]. Call it inside ``block``'s compact method.
    """
    init = truncated_normal_init(scale_for(d_qk))
    return block.param("height_rel", init, (height_rows, d_qk)), block.param("width_rel", init, (width_rows, d_qk))


def timm_projection(features: int, fan_in: int, use_bias: bool, dtype, name: str) -> nn.Conv:
    """A 1x1 conv initialised as timm's attention projections: N(0, 1/fan_in) cut to [-2, 2] (call it when compact)."""
    return nn.Conv(
        features, (1, 1), use_bias=use_bias, kernel_init=truncated_normal_init(fan_in**-0.5), dtype=dtype, name=name
    )
