"""Primitives shared by several blocks: every piece that more than one block uses lives here.

Each is a pure function of arrays or of sizes, or (where it makes layers) a function to call inside a
block's compact method. They are used by the blocks' files and exported from :mod:`attnjax.blocks` for
use in your own modules. The sections:

- widths and gates: :func:`reduced_channels`, :func:`sigmoid_gate`, :func:`excitation_mlp`;
- options shared by several blocks, checked once: :func:`odd_size` (kernel sizes), :func:`resolve_heads`
  and :func:`head_widths` (multi-head blocks), :func:`block_batch_norm`;
- pooling over the positions: :func:`global_avg_pool`, :func:`global_max_pool`, :func:`spatial_softmax`,
  :func:`attention_pool`; the spatial gate's conv :func:`spatial_conv`;
- relative position logits (``bottleneck`` and ``halo``): :func:`relative_logits_2d` and its parts.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.layers import batch_norm
from attnjax.ops.single_output_conv import single_output_conv
from attnjax.validate import InputError

SPATIAL_AXES = (-3, -2)  # H and W of an NHWC array

# Widths and gates.


def reduced_channels(channels: int, reduction: int, min_channels: int = 8) -> int:
    """Bottleneck width ``max(C // r, min(C, min_channels))``.

    ``C // r`` alone collapses to 0 for small C (C=3 with r=8); the floor keeps at least
    ``min_channels`` (as timm's SE does), but never widens past C itself.
    """
    if reduction < 1:
        raise InputError(f"reduction must be >= 1, got {reduction}")
    if min_channels < 1:
        raise InputError(f"min_channels must be >= 1, got {min_channels}")
    return max(channels // reduction, min(channels, min_channels))


def sigmoid_gate(x: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gate ``x`` by ``logits``: ``g = sigmoid(logits)``, ``y = x * g``.

    ``logits`` broadcasts against ``x``. Returns ``(y, g)``; every ``g`` lies in (0, 1)
    (up to float rounding at the extremes).
    """
    gate = jax.nn.sigmoid(logits)
    return x * gate, gate


def excitation_mlp(channels: int, hidden: int, dtype=None):
    """SE's excitation ``z -> W2 relu(W1 z + b1) + b2``, C -> ``hidden`` -> C, as a function of ``z``.

    Makes the Dense layers ``reduce`` and ``expand`` in the calling module (call it inside a compact
    method); calling the returned function twice shares them (CBAM's one MLP on two descriptors).
    """
    reduce = nn.Dense(hidden, dtype=dtype, name="reduce")
    expand = nn.Dense(channels, dtype=dtype, name="expand")
    return lambda z: expand(nn.relu(reduce(z)))


# Options shared by several blocks, each checked in one place.


def odd_size(size: int, option: str, who: str, note: str) -> int:
    """``size`` if it is a positive odd number, else an :class:`InputError` naming ``who``, ``option`` and ``note``.

    For the kernel and window sizes of 'same'-padded convolutions: only an odd size keeps the map's size.
    """
    if size < 1 or size % 2 == 0:
        raise InputError(f"{who}: {option} must be a positive odd number ({note}), got {size}")
    return size


def resolve_heads(channels: int, num_heads: int | None, max_heads: int, who: str) -> int:
    """The number of heads a multi-head block uses on C = ``channels``, the same rule in every such block.

    ``num_heads`` is a number of heads, exactly: it must divide C (each head's values are C / heads
    wide). ``num_heads=None`` takes the largest divisor of C that is at most ``max_heads``, so that
    every C works (C = 13 or 37: 1 head; C = 3 with ``max_heads=4``: 3 heads).
    """
    if max_heads < 1:
        raise InputError(f"{who}: max_heads must be >= 1, got {max_heads} (the most heads num_heads=None takes)")
    if num_heads is None:
        return max(d for d in range(1, min(max_heads, channels) + 1) if channels % d == 0)
    if num_heads < 1 or channels % num_heads:
        divisors = [d for d in range(1, channels + 1) if channels % d == 0]
        listed = ", ".join(map(str, divisors[:8])) + (", ..." if len(divisors) > 8 else "")
        raise InputError(
            f"{who}: num_heads={num_heads} does not divide the {channels} input channels; choose num_heads "
            f"from the divisors of {channels}: {listed} (or num_heads=None: the largest divisor up to "
            f"max_heads={max_heads})"
        )
    return num_heads


def head_widths(channels: int, heads: int, dim_head: int | None, who: str) -> tuple[int, int]:
    """``(d_qk, d_v)``: query/key width per head (``dim_head``, default C / heads) and value width C / heads."""
    if dim_head is not None and dim_head < 1:
        raise InputError(f"{who}: dim_head must be >= 1 or None, got {dim_head}")
    d_v = channels // heads
    return (dim_head or d_v), d_v


def block_batch_norm(block: nn.Module, train: bool, name: str, **options) -> nn.BatchNorm:
    """:func:`attnjax.layers.batch_norm` in ``block``'s ``dtype``, synchronised over its ``axis_name``.

    Call it inside ``block``'s compact method; ``options`` go to ``batch_norm`` (``momentum``, ...).
    """
    return batch_norm(train, axis_name=block.axis_name, dtype=block.dtype, name=name, **options)


# Pooling over the positions.


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Squeeze: ``z[n, 0, 0, c] = 1/(H*W) * sum_{h,w} x[n, h, w, c]``, shape (N, 1, 1, C)."""
    return jnp.mean(x, axis=(1, 2), keepdims=True)


def global_max_pool(x: jax.Array) -> jax.Array:
    """``m[n, 0, 0, c] = max_{h,w} x[n, h, w, c]``, shape (N, 1, 1, C)."""
    return jnp.max(x, axis=(1, 2), keepdims=True)


def spatial_softmax(scores: jax.Array) -> jax.Array:
    """``softmax`` over the H and W axes of NHWC ``scores``, separately per image and channel."""
    return jax.nn.softmax(scores, axis=SPATIAL_AXES)


def attention_pool(x: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax-weighted sum over positions: ``a = softmax over (H, W) of logits``, ``c = sum_{h,w} a * x``.

    ``logits`` is (N, H, W, 1), so ``c[n, 0, 0, :] = sum_{h,w} a[n, h, w, 0] * x[n, h, w, :]``.
    Returns ``(c, a)``: c of shape (N, 1, 1, C), a of the shape of ``logits``. GC's context
    modelling and PSA's channel-only pooling.
    """
    weights = spatial_softmax(logits)
    return jnp.sum(weights * x, axis=(1, 2), keepdims=True), weights


def spatial_conv(kernel_size: int, dtype=None) -> nn.Conv:
    """A spatial gate's k x k conv to one channel, 'same' padding, named ``spatial_conv`` (call it when compact).

    Runs through :func:`attnjax.ops.single_output_conv`, the backend's fastest formulation.
    """
    pad = (kernel_size - 1) // 2
    return nn.Conv(
        1,
        (kernel_size, kernel_size),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        conv_general_dilated=single_output_conv,
        name="spatial_conv",
    )


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


def softmax_in_float32(logits: jax.Array) -> jax.Array:
    """Softmax over the last axis, computed in at least float32 (float64 stays float64)."""
    return jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)


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
