"""Bottleneck attention: BoTNet's multi-head self-attention over all positions, with 2-D relative position logits.

Paper: Aravind Srinivas, Tsung-Yi Lin, Niki Parmar, Jonathon Shlens, Pieter Abbeel and Ashish
Vaswani (2021), "Bottleneck Transformers for Visual Recognition", CVPR. The layer replaces the
3x3 convolution of a ResNet bottleneck block (the paper's MHSA, its Figure 4); it follows timm's
``BottleneckAttn`` (``timm/layers/bottleneck_attn.py``, ``create_attn('bottleneck')``).

What it computes, for NHWC ``x`` (H x W positions, C channels) and ``heads`` heads::

    [q | k | v] = x W_qkv                         one 1x1 conv C -> 2 heads d + C, no bias
    per head, for positions i = (y, x) and j = (y', x') in row-major order:
    l_ij = q_i . k_j * d^-1/2 + q_i . r^H[y' - y] + q_i . r^W[x' - x]
    a_ij = softmax_j(l_ij)                        over all H*W positions
    o_i  = sum_j a_ij v_j                         heads concatenated: (N, H, W, C)
    y = o

``d`` is the query/key width per head (``dim_head``, default C / heads), the values are
C / heads wide. The relative tables ``r^H`` (``height_rel``, (2H - 1, d)) and ``r^W``
(``width_rel``, (2W - 1, d)) hold one vector per offset ``-(H-1) .. H-1`` (and likewise for W),
shared by the heads; the lookup is :func:`attnjax.blocks.primitives.relative_logits_2d`.

Sown map: ``intermediates/attention``, the softmax weights ``a`` of shape (N, heads, H*W, H*W),
positions in row-major (y, x) order; each row sums to 1.

The block is tied to one feature-map size, as the paper's is: the tables have 2H - 1 and 2W - 1
rows. ``feat_size=None`` binds them to the size of the input seen at init (``feat_size=(H, W)``
or an int for a square map fixes it up front); applying the block to any other size raises
:class:`attnjax.validate.InputError` naming the bound size and the fix.

Choices and deviations:

- No residual connection and no output projection: like the paper's MHSA layer and timm's
  ``BottleneckAttn``, the block is a drop-in for a 3x3 conv, y = o. In a host that adds a
  block to a residual stream, that stream supplies the residual. So it is not the identity at
  initialisation.
- Heads: the paper and timm use 4. ``num_heads=None`` (the default) takes the largest divisor of C
  that is at most ``max_heads`` (4), so every C works (13 -> 1 head, 3 -> 3, 37 -> 1, 64 -> 4); an
  explicit count must divide C (:func:`attnjax.blocks.primitives.resolve_heads`).
- q/k width: ``dim_head=None`` gives d = C / heads, the paper's equal widths for q, k and v.
  timm's default rounds the q/k width to a multiple of 8 (``make_divisible(C, 8) / heads``):
  the same for every C divisible by 8, wider for other C (C = 20: d = 6 against 5). ``dim_head`` sets d
  directly, as in timm.
- timm's width rule on request: ``qk_ratio`` (timm's option; its default is 1.0) gives timm's q/k width
  ``make_divisible(C * qk_ratio, 8) // heads`` (``dim_head``, if given, wins, as in timm), and timm's heads:
  ``num_heads``, or ``max_heads`` (4, timm's default) when None, which must divide C; where timm asserts,
  attnjax raises :class:`attnjax.validate.InputError` (:func:`attnjax.blocks.primitives.attention_widths`).
  ``BottleneckAttention(qk_ratio=1.0)`` has the parameters of timm's ``BottleneckAttn(C, feat_size=(H, W))``
  (``qkv``; ``height_rel``/``width_rel`` = ``pos_embed.height_rel``/``width_rel``) and its output. timm's
  options ``qkv_bias``, ``scale_pos_embed``, ``num_heads``, ``dim_head`` and ``feat_size`` have timm's names and
  meaning; ``dim_out`` and ``stride`` are not offered.
- Scale (the paper is silent; timm decides): ``d^-1/2`` on the content logits only; the relative
  logits are added unscaled (timm's ``scale_pos_embed=False``). ``scale_pos_embed=True`` scales
  both, as timm's option does.
- No biases on the qkv projection (timm's ``qkv_bias=False``, an option here as there).
- Initialisation as in timm (the paper gives none): the qkv kernel and the tables are normal with
  std fan_in^-1/2 = C^-1/2 and d^-1/2, truncated to [-2, 2].
- timm's stride-2 variant (an average pool after the attention) is left out: blocks keep the shape.
- Parameters are laid out as timm's (``qkv`` conv with all heads' q, then k, then v channels,
  head-major; tables (2H - 1, d) indexed by offset + H - 1), so timm weights load as they are.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def bottleneck_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    height_rel: jax.Array,
    width_rel: jax.Array,
    scale_pos_embed: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Self-attention over all positions with 2-D relative logits (the formulas in the module docstring).

    ``q``, ``k``: ``(N, H, W, heads, d)``; ``v``: ``(N, H, W, heads, d_v)``; ``height_rel``:
    ``(2H - 1, d)``; ``width_rel``: ``(2W - 1, d)``. Returns ``(y, a)``: y ``(N, H, W, heads d_v)``
    and the softmax weights a ``(N, heads, H*W, H*W)``.
    """
    n, h, w, heads, d = q.shape
    content = jnp.einsum("nyxhd,nYXhd->nhyxYX", q, k)
    relative = relative_logits_2d(q.transpose(0, 3, 1, 2, 4), height_rel, width_rel, (h, w))  # (N, heads, H, W, H, W)
    logits = attention_logits(content, relative, scale_for(d), scale_pos_embed)
    weights = softmax_in_float32(logits.reshape(n, heads, h * w, h * w))
    o = jnp.einsum("nhij,njhe->nihe", weights.astype(v.dtype), v.reshape(n, h * w, heads, -1))
    return o.reshape(n, h, w, -1), weights


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


class BottleneckAttention(nn.Module):
    """BoTNet's MHSA: qkv 1x1 conv, softmax over all positions of q.k scaled plus 2-D relative logits, no residual.

    NHWC in, same shape out; C is read from the input. Bound to one H x W (``feat_size``, default
    the size at init). Sows the (N, heads, H*W, H*W) softmax weights as ``intermediates/attention``.
    """

    num_heads: int | None = None  # None: the largest divisor of C up to max_heads
    max_heads: int = 4
    dim_head: int | None = None  # q/k width per head; None: C / heads
    qk_ratio: float | None = None  # timm's widths: q/k make_divisible(C * qk_ratio, 8) // heads, heads timm's
    feat_size: Any = None  # (H, W) or an int; None: the size of the input at init
    qkv_bias: bool = False
    scale_pos_embed: bool = False
    dtype: Any = None

    def _bound_size(self, height: int, width: int) -> tuple[tuple[int, int], str]:
        """The size the tables are (or will be) made for, and where that size comes from."""
        if self.has_variable("params", "height_rel"):
            rows_h = self.get_variable("params", "height_rel").shape[0]
            rows_w = self.get_variable("params", "width_rel").shape[0]
            return ((rows_h + 1) // 2, (rows_w + 1) // 2), "the size its parameters were initialised for"
        if self.feat_size is not None:
            return _pair(self.feat_size), f"feat_size={self.feat_size!r}"
        return (height, width), "the size at init"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        who = type(self).__name__
        check_nhwc(x, who)
        n, h, w, c = x.shape
        heads, d_qk, d_v = attention_widths(c, self.num_heads, self.max_heads, self.dim_head, self.qk_ratio, who)
        (bound_h, bound_w), source = self._bound_size(h, w)
        if (h, w) != (bound_h, bound_w):
            raise InputError(
                f"{who}: its relative position embeddings are bound to {bound_h}x{bound_w} feature maps "
                f"({source}), but the input is {h}x{w} (shape {tuple(x.shape)}). Feed {bound_h}x{bound_w} maps "
                f"(resize or crop the input), or initialise a new block on {h}x{w} inputs "
                f"(feat_size=None binds it to the size seen at init; feat_size=({h}, {w}) fixes it)."
            )

        qkv = timm_projection(2 * heads * d_qk + heads * d_v, c, self.qkv_bias, self.dtype, "qkv")(x)
        q, k, v = jnp.split(qkv, [heads * d_qk, 2 * heads * d_qk], axis=-1)
        q, k = (t.reshape(n, h, w, heads, d_qk) for t in (q, k))
        v = v.reshape(n, h, w, heads, d_v)
        height_rel, width_rel = relative_tables(self, relative_table_size(h, h), relative_table_size(w, w), d_qk)

        y, weights = bottleneck_attention(q, k, v, height_rel, width_rel, self.scale_pos_embed)
        sow_map(self, "attention", weights)
        return y
