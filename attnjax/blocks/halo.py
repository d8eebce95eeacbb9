"""Halo attention: HaloNet's blocked local self-attention with a halo and 2-D relative position logits.

Paper: Ashish Vaswani, Prajit Ramachandran, Aravind Srinivas, Niki Parmar, Blake Hechtman and
Jonathon Shlens (2021), "Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
CVPR. There is no official code; where the paper is silent this follows timm's ``HaloAttn``
(``timm/layers/halo_attn.py``, ``create_attn('halo')``), including its defaults.

What it computes, for NHWC ``x`` (C channels), block size b, halo h, window w = b + 2h::

    q = x W_q,  [k | v] = x W_kv                  1x1 convs, no bias: C -> heads d, C -> heads (d + C/heads)
    the map is cut into non-overlapping b x b query blocks; the keys and values of block B are
    its w x w neighbourhood N(B) (the block and h positions around it), zeros outside the map
    per head, for a query i = (y, x) in B and a key j = (y', x') in N(B):
    l_ij = q_i . k_j * d^-1/2 + q_i . r^H[y' - y] + q_i . r^W[x' - x]
    a_ij = softmax over the w*w keys j in N(B) of l_ij
    y_i  = sum_j a_ij v_j                         heads concatenated: (N, H, W, C)

The offsets ``y' - y`` range over ``-(b + h - 1) .. b + h - 1``, so each table (``height_rel``,
``width_rel``) has 2(b + h) - 1 rows of width d (row b + h - 1 + offset), shared by the heads
and the blocks; they do not depend on the map's size, so the block runs at any H, W.

Sown map: ``intermediates/attention``, the softmax weights of shape
(N, heads, H'/b, W'/b, b*b, w*w): per query block (row-major), its b*b queries (row-major in the
block) over its w*w window keys (row-major in the window); each row sums to 1. H' and W' are H and
W rounded up to multiples of b (see the padding below): the rows of padded query positions are
included (they are well defined and sum to 1, but their outputs are cropped away).

Choices and deviations:

- Maps whose H or W is not a multiple of b (timm refuses them; the paper assumes divisibility):
  the queries are padded up to a multiple of b and the output is cropped back, and positions
  outside the map are zero keys and zero values, exactly as the paper and timm treat the halo at
  the map's borders. So a real query's output is what the paper's layer gives on the map
  zero-padded up to the block grid (for ``qkv_bias=False``, the default, padding x or padding
  k and v are the same), cropped: out-of-map keys take part in the softmax with logit
  ``q . (r^H + r^W)`` and add nothing to the sum of values, for padding and halo alike. Padded
  query positions never affect real ones (each query's output depends only on its own query).
  No masking: masking the padding but not the halo would make two kinds of outside, and masking
  both would change the paper's borders. The block size is never adapted.
- Relative tables: 2(b + h) - 1 rows, one per offset that occurs. timm allocates 2w - 1 =
  2(b + 2h) - 1 rows and reads only its last 2(b + h) - 1 (row ``offset + w - 1 + h``): the
  same function, without 2h rows that never get a gradient. timm's tables load as ``rel[2h:]``;
  ``full_tables=True`` allocates timm's 2w - 1 rows (the first 2h unused), so they load as they are.
- Heads: timm's default 8; ``num_heads=None`` (the default) takes the largest divisor of C that
  is at most ``max_heads`` (8) (13 -> 1, 3 -> 3, 37 -> 1, 64 -> 8); an explicit count must divide C
  (:func:`attnjax.blocks.primitives.resolve_heads`). So at C = 100 the default runs 5 heads of 20
  channels, where timm's ``HaloAttn(100)`` (8 heads) refuses to build: ask for timm's count with
  ``num_heads=8`` or ``qk_ratio`` (below) and attnjax refuses C = 100 too.
- q/k width ``dim_head=None``: d = C / heads (timm rounds the q/k width to a multiple of 8: the
  same for C divisible by 8). Scale ``d^-1/2`` on the content logits only (timm's
  ``scale_pos_embed=False``; an option here too). No qkv bias (timm's default, an option).
- timm's width rule on request: ``qk_ratio`` (timm's option; its default is 1.0) gives timm's q/k width
  ``make_divisible(C * qk_ratio, 8) // heads`` (``dim_head``, if given, wins, as in timm), and timm's heads:
  ``num_heads``, or ``max_heads`` (8, timm's default) when None, which must divide C; where timm asserts,
  attnjax raises :class:`attnjax.validate.InputError` (:func:`attnjax.blocks.primitives.attention_widths`).
  ``HaloAttention(qk_ratio=1.0, full_tables=True)`` has the parameters of timm's ``HaloAttn(C)`` (``q``,
  ``kv``; ``height_rel``/``width_rel`` = ``pos_embed.height_rel``/``width_rel``) and its output. timm's
  ``num_heads``, ``dim_head``, ``block_size``, ``halo_size``, ``qkv_bias`` and ``scale_pos_embed`` have timm's
  names and meaning; ``dim_out``, ``stride`` and ``avg_down`` are not offered. timm's assertion that H and W
  are multiples of ``block_size`` is not repeated: maps of other sizes are padded, as by default (below).
- Initialisation as in timm (the paper gives none): kernels normal with std C^-1/2, tables
  normal with std d^-1/2, truncated to [-2, 2].
- No residual and no output projection: like timm's ``HaloAttn`` it is a drop-in for a 3x3 conv,
  y = o, so it is not the identity at initialisation. timm's strided variants (stride 2, avg_down)
  are left out: blocks keep the shape.
- Parameters are laid out as timm's: ``q`` conv (head-major), ``kv`` conv with each head's d key
  channels followed by its C/heads value channels.
- The windows are gathered with static indices from the zero-padded k and v (no unfold needed);
  the relative lookup is :func:`attnjax.blocks.primitives.relative_logits_2d`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnjax.blocks.primitives import (
    attention_logits,
    attention_widths,
    relative_logits_2d,
    relative_table_size,
    relative_tables,
    scale_for,
    softmax_in_float32,
    sow_map,
    timm_projection,
)
from attnjax.validate import InputError, check_nhwc


def _ceil_to(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def query_blocks(q: jax.Array, block_size: int) -> jax.Array:
    """``(N, H, W, heads, d)`` -> ``(N, heads, H'/b, W'/b, b, b, d)``, zero-padded at the bottom/right to H', W'."""
    n, h, w, heads, d = q.shape
    b = block_size
    hp, wp = _ceil_to(h, b), _ceil_to(w, b)
    q = jnp.pad(q, [(0, 0), (0, hp - h), (0, wp - w), (0, 0), (0, 0)])
    q = q.reshape(n, hp // b, b, wp // b, b, heads, d)
    return q.transpose(0, 5, 1, 3, 2, 4, 6)


def key_windows(k: jax.Array, block_size: int, halo_size: int) -> jax.Array:
    """``(N, H, W, heads, d)`` -> ``(N, heads, H'/b, W'/b, w, w, d)``: each block's w x w neighbourhood.

    Block (i, j)'s window covers rows ``i b - h .. i b + b + h - 1`` (and likewise columns);
    positions outside the map are zeros.
    """
    n, h, w, heads, d = k.shape
    b, halo = block_size, halo_size
    hp, wp = _ceil_to(h, b), _ceil_to(w, b)
    k = jnp.pad(k, [(0, 0), (halo, hp - h + halo), (halo, wp - w + halo), (0, 0), (0, 0)])
    window = b + 2 * halo
    rows = (np.arange(hp // b) * b)[:, None] + np.arange(window)  # (H'/b, w) in padded coordinates
    cols = (np.arange(wp // b) * b)[:, None] + np.arange(window)  # (W'/b, w)
    k = jnp.take(k, rows.reshape(-1), axis=1).reshape(n, hp // b, window, *k.shape[2:])
    k = jnp.take(k, cols.reshape(-1), axis=3).reshape(n, hp // b, window, wp // b, window, heads, d)
    return k.transpose(0, 5, 1, 3, 2, 4, 6)


def halo_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    height_rel: jax.Array,
    width_rel: jax.Array,
    block_size: int,
    halo_size: int,
    scale_pos_embed: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Blocked local self-attention with a halo (the formulas in the module docstring), any H and W.

    ``q``, ``k``: ``(N, H, W, heads, d)``; ``v``: ``(N, H, W, heads, d_v)``; tables
    ``(2(b + h) - 1, d)``. Returns ``(y, a)``: y ``(N, H, W, heads d_v)`` and the softmax
    weights a ``(N, heads, H'/b, W'/b, b*b, w*w)``.
    """
    n, h, w, heads, d = q.shape
    b, window = block_size, block_size + 2 * halo_size
    qb = query_blocks(q, b)  # (N, heads, nh, nw, b, b, d)
    kw = key_windows(k, b, halo_size)  # (N, heads, nh, nw, w, w, d)
    vw = key_windows(v, b, halo_size)
    content = jnp.einsum("nhijyxd,nhijYXd->nhijyxYX", qb, kw)
    relative = relative_logits_2d(qb, height_rel, width_rel, (window, window))
    logits = attention_logits(content, relative, scale_for(d), scale_pos_embed)
    nh, nw = qb.shape[2:4]
    weights = softmax_in_float32(logits.reshape(n, heads, nh, nw, b * b, window * window))
    vw = vw.reshape(n, heads, nh, nw, window * window, -1)
    o = jnp.einsum("nhijqk,nhijke->nhijqe", weights.astype(v.dtype), vw)  # (N, heads, nh, nw, b*b, d_v)
    o = o.reshape(n, heads, nh, nw, b, b, -1).transpose(0, 2, 4, 3, 5, 1, 6)  # (N, nh, b, nw, b, heads, d_v)
    return o.reshape(n, nh * b, nw * b, -1)[:, :h, :w], weights


class HaloAttention(nn.Module):
    """HaloNet's blocked local self-attention: b x b query blocks attend to their (b + 2h)^2 haloed windows.

    NHWC in, same shape out, any H and W; C is read from the input. Sows the softmax weights
    (N, heads, H'/b, W'/b, b*b, (b + 2h)^2) as ``intermediates/attention``.
    """

    num_heads: int | None = None  # None: the largest divisor of C up to max_heads
    max_heads: int = 8
    dim_head: int | None = None  # q/k width per head; None: C / heads
    block_size: int = 8
    halo_size: int = 3
    qk_ratio: float | None = None  # timm's widths: q/k make_divisible(C * qk_ratio, 8) // heads, heads timm's
    qkv_bias: bool = False
    scale_pos_embed: bool = False
    full_tables: bool = False  # timm's 2(b + 2h) - 1 table rows, the first 2h unused
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        who = type(self).__name__
        check_nhwc(x, who)
        if self.block_size < 1 or self.halo_size < 0:
            raise InputError(
                f"{who}: block_size must be >= 1 and halo_size >= 0, got block_size={self.block_size}, "
                f"halo_size={self.halo_size}"
            )
        n, h, w, c = x.shape
        heads, d_qk, d_v = attention_widths(c, self.num_heads, self.max_heads, self.dim_head, self.qk_ratio, who)

        q = timm_projection(heads * d_qk, c, self.qkv_bias, self.dtype, "q")(x).reshape(n, h, w, heads, d_qk)
        kv = timm_projection(heads * (d_qk + d_v), c, self.qkv_bias, self.dtype, "kv")(x)
        kv = kv.reshape(n, h, w, heads, d_qk + d_v)
        k, v = kv[..., :d_qk], kv[..., d_qk:]
        window = self.block_size + 2 * self.halo_size
        rows = relative_table_size(self.block_size, window)
        if self.full_tables:  # timm's layout: one row per offset up to +-(w - 1), the first 2h never read
            height_rel, width_rel = relative_tables(self, 2 * window - 1, 2 * window - 1, d_qk)
            height_rel, width_rel = height_rel[2 * self.halo_size :], width_rel[2 * self.halo_size :]
        else:
            height_rel, width_rel = relative_tables(self, rows, rows, d_qk)

        y, weights = halo_attention(
            q, k, v, height_rel, width_rel, self.block_size, self.halo_size, self.scale_pos_embed
        )
        sow_map(self, "attention", weights)
        return y
