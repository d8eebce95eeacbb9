"""Bilinear attentional transform (BAT): a non-local block that mixes blocks of rows and blocks of columns.

Paper: Lu Chi, Zehuan Yuan, Yadong Mu and Changhu Wang (2020), "Non-Local Neural Networks With Grouped
Bilinear Attentional Transforms", CVPR. The reference is timm 1.0.29's ``BatNonLocalAttn``
(``timm/layers/non_local_attn.py``, adapted there from the official code, BA-Transform/BAT-Image-Classification),
timm's ``create_attn('bat')``.

What it computes, for NHWC ``x`` with C channels, b = ``block_size``, G = ``groups``, t = H / b, s = W / b::

    u   = act(BN(conv1x1(x)))                      C -> d, d = make_divisible(C * rd_ratio, rd_divisor) (16 at C = 64)
    o   = act(BN(conv1x1(u)))                      d -> G
    r   = max of o over each block of t rows       (and all columns): (N, b, G)
    c   = max of o over each block of s columns    (and all rows):    (N, b, G)
    P   = sigmoid(conv_{b x 1}(r)), Q = sigmoid(conv_{1 x b}(c))     each (N, G, b, b), valid convs with biases
    P  /= its row sums,  Q /= its column sums      P[i, :] and Q[:, k] each sum to 1
    v[(i, a), (k, e)] = sum_{j, l} P[i, j] u[(j, a), (l, e)] Q[l, k]  per channel, with its group's P and Q;
                                                   row h = (i, a) is offset a in row block i (h = i t + a), alike
                                                   for columns: the b x b transforms act on blocks, at each offset
    v   = act(BN(conv1x1(v)))                      d -> d
    v   = act(BN(conv1x1(v)))                      d -> C
    y   = x + dropout(v)                           channel dropout (timm's Dropout2d), train mode only

act is ReLU by default; the 1x1 convs have no bias (timm's ``ConvNormAct``); the BNs are
``attnjax.layers.batch_norm(train)``. Written with the b x b matrices, v = (P kron I_t) u (Q kron I_s): timm
builds those (H, H) and (W, W) matrices; here the block structure is contracted directly.

Sown maps, ``intermediates/height`` = P and ``intermediates/width`` = Q transposed, each (N, G, b, b) with rows
that sum to 1: row i of ``height`` weighs the input row blocks j for output row block i; row k of ``width`` the
input column blocks l for output column block k (timm's Q has output blocks on its last axis).

Options, timm's names and defaults (those of ``create_attn('bat', C)``), except ``drop_rate``:

- ``block_size`` (7) and ``groups`` (2): b and G; G must divide d;
- ``rd_ratio`` (0.25), ``rd_channels`` (None), ``rd_divisor`` (8): the width d, timm's
  ``make_divisible(C * rd_ratio, rd_divisor)`` (its default ``round_limit`` 0.9), or ``rd_channels``;
- ``drop_rate`` (0.0; timm's default is 0.2): the probability of dropping each channel of v per image, the
  kept ones scaled by 1 / (1 - p), in train mode only;
- ``act_layer`` (``"relu"``), by timm's name.

Deviations from timm:

- ``drop_rate`` defaults to 0, not timm's 0.2, so that the block is deterministic for every caller: a train-mode
  ``apply`` without a random stream (the block tests, the cost tool, a user's own model) works as with any other
  block. ``drop_rate=0.2`` is timm's block; in train mode it then needs a stream, ``apply(..., rngs={"dropout":
  key})`` (attnjax's ``train_step`` gives one at every step), and is refused clearly without it. Eval mode
  never drops.
- H and W need not be multiples of b (timm asserts they are): the maps u and o are padded with zeros at the
  bottom and right up to the grid of b x b blocks, t = ceil(H / b) rows per block (s likewise), and v is
  cropped back to H x W. The pooling takes the max over a block's positions in the map, and a block wholly
  in the padding pools to 0 (what zero padding gives with the default ReLU, o >= 0). The batch norms see the
  map's positions only. Where H and W are multiples of b this is timm's computation exactly.
- Options: ``act_layer`` is a name (timm: a class); timm's ``norm_layer`` is not offered (always BN, timm's
  default). ``rd_ratio`` must be > 0 and ``rd_channels`` >= 1 or None.
- Batch-norm running variance: Flax's running average takes in the biased batch variance, PyTorch's the
  unbiased one, n/(n-1) times larger (n = N*H*W values per channel for every BN here). Outputs agree; convert
  imported or exported running variances with ``attnjax.layers.torch_running_var`` and ``flax_running_var``.
- Initialisation is Flax's default (timm's is PyTorch's): the block is not the identity at initialisation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnjax.blocks.primitives import (
    activation_function,
    at_least_float32,
    block_batch_norm,
    sow_map,
    timm_divisible_width,
)
from attnjax.layers import BATCH_AXIS
from attnjax.validate import InputError, check_nhwc

TIMM_DROP_RATE = 0.2  # timm's BatNonLocalAttn default (attnjax's default: 0, see the module docstring)


def block_length(size: int, block_size: int) -> int:
    """The length of each of the ``block_size`` blocks that cover ``size`` positions: ``ceil(size / block_size)``."""
    return -(-size // block_size)


def pad_to_blocks(x: jax.Array, block_size: int, value: float = 0.0) -> jax.Array:
    """NHWC ``x`` padded with ``value`` at the bottom and right to ``block_size * block_length(size, block_size)``."""
    _, height, width, _ = x.shape
    rows, cols = (block_size * block_length(size, block_size) - size for size in (height, width))
    return jnp.pad(x, ((0, 0), (0, rows), (0, cols), (0, 0)), constant_values=value)


def block_max_pool(o: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """``(r, c)``, each (N, b, G): the max of NHWC ``o`` over each of the b row blocks (all columns) and over each
    of the b column blocks (all rows), the blocks of :func:`block_length` positions; a block wholly past the map's
    edge gives 0. For H and W multiples of b, PyTorch's ``adaptive_max_pool2d(o, (b, 1))`` and ``(1, b)``."""
    n, height, width, groups = o.shape
    t, s = block_length(height, block_size), block_length(width, block_size)
    padded = pad_to_blocks(o, block_size, -jnp.inf)
    rows = padded.reshape(n, block_size, t, block_size * s, groups).max(axis=(2, 3))
    cols = padded.reshape(n, block_size * t, block_size, s, groups).max(axis=(1, 3))
    outside_rows = (np.arange(block_size) * t >= height)[None, :, None]
    outside_cols = (np.arange(block_size) * s >= width)[None, :, None]
    return jnp.where(outside_rows, 0, rows), jnp.where(outside_cols, 0, cols)


def bilinear_weights(row_logits: jax.Array, col_logits: jax.Array, groups: int, block_size: int):
    """``(P, Q)``, each (N, G, b, b), from the (N, b*b*G) logits in timm's channel order ``(g, i, j)``:
    ``P = sigmoid`` normalised over its last axis (each row sums to 1), ``Q = sigmoid`` normalised over the
    axis before it (each column sums to 1)."""
    n = row_logits.shape[0]  # computed in at least float32, as a softmax is (primitives/precision.py)
    p = jax.nn.sigmoid(at_least_float32(row_logits)).reshape(n, groups, block_size, block_size)
    q = jax.nn.sigmoid(at_least_float32(col_logits)).reshape(n, groups, block_size, block_size)
    return p / jnp.sum(p, axis=-1, keepdims=True), q / jnp.sum(q, axis=-2, keepdims=True)


def bilinear_transform(u: jax.Array, p: jax.Array, q: jax.Array) -> jax.Array:
    """``v[n, (i, a), (k, e), (g, m)] = sum_{j, l} p[n, g, i, j] u[n, (j, a), (l, e), (g, m)] q[n, g, l, k]``.

    ``u`` is NHWC with H = b t, W = b s and C = G m (row h = i t + a, channel c = g m + m'); ``p``, ``q`` are
    (N, G, b, b). Per channel of group g that is ``(P_g kron I_t) u (Q_g kron I_s)``, the transform of timm's
    ``BilinearAttnTransform``.
    """
    n, height, width, channels = u.shape
    groups, block_size = p.shape[1], p.shape[-1]
    t, s = height // block_size, width // block_size
    blocks = u.reshape(n, block_size, t, block_size, s, groups, channels // groups)
    mixed = jnp.einsum("ngij,njalegm->nialegm", p, blocks)
    v = jnp.einsum("nialegm,nglk->niakegm", mixed, q)
    return v.reshape(n, height, width, channels)


class BilinearAttentionalTransform(nn.Module):
    """BAT non-local block (timm's ``bat``): ``x + dropout(conv(BAT(conv(x))))``, with batch norms.

    NHWC in, same shape out, any H and W; C is read from the input. ``train`` selects batch statistics (call
    ``apply(..., mutable=["batch_stats"])`` then) and the channel dropout (``drop_rate > 0``: a ``dropout`` rng).
    Sows ``intermediates/height`` and ``intermediates/width``, each (N, G, b, b).
    """

    block_size: int = 7
    groups: int = 2
    rd_ratio: float = 0.25
    rd_channels: int | None = None
    rd_divisor: int = 8
    drop_rate: float = 0.0  # timm's default: 0.2 (TIMM_DROP_RATE); see the module docstring
    act_layer: str = "relu"
    dtype: Any = None
    axis_name: str | None = BATCH_AXIS  # batch-norm synchronisation axis (Flax's), used where bound; set by the host

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        who = type(self).__name__
        check_nhwc(x, who)
        n, height, width, channels = x.shape
        b = self.block_size
        if b < 1:
            raise InputError(f"{who}: block_size must be >= 1 (timm's default is 7), got {b}")
        if self.groups < 1:
            raise InputError(f"groups must be >= 1, got {self.groups}")
        if not 0 <= self.drop_rate < 1:
            raise InputError(f"drop_rate must be >= 0 and < 1 (timm's default is 0.2), got {self.drop_rate}")
        inner = timm_divisible_width(channels, self.rd_ratio, self.rd_channels, self.rd_divisor, round_limit=0.9)
        if inner % self.groups:
            raise InputError(
                f"{who}: groups={self.groups} does not divide the {inner} reduced channels (rd_channels or "
                f"make_divisible(C * rd_ratio, rd_divisor)); each group's channels share one transform"
            )
        activation = activation_function(self.act_layer)

        def conv_norm_act(t, features, name):  # timm's ConvNormAct: bias-free 1x1 conv, BN, activation
            t = nn.Conv(features, (1, 1), use_bias=False, dtype=self.dtype, name=name)(t)
            return activation(block_batch_norm(self, train, f"{name}_bn")(t))

        u = conv_norm_act(x, inner, "reduce")
        rows, cols = block_max_pool(conv_norm_act(u, self.groups, "to_groups"), b)
        logits = b * b * self.groups
        row_logits = nn.Conv(logits, (b, 1), padding="VALID", dtype=self.dtype, name="row_conv")(rows[:, :, None])
        col_logits = nn.Conv(logits, (1, b), padding="VALID", dtype=self.dtype, name="column_conv")(cols[:, None])
        p, q = bilinear_weights(row_logits.reshape(n, logits), col_logits.reshape(n, logits), self.groups, b)
        mix = jnp.result_type(row_logits, col_logits)  # the transform in the logits' dtype
        v = bilinear_transform(pad_to_blocks(u, b), p.astype(mix), q.astype(mix))[:, :height, :width]
        v = conv_norm_act(conv_norm_act(v, inner, "mix"), channels, "expand")

        if train and self.drop_rate > 0:
            if not self.has_rng("dropout"):
                raise InputError(
                    f"{who}: drop_rate={self.drop_rate} drops channels in train mode, which needs a random stream: "
                    f"apply(..., train=True, rngs={{'dropout': key}}) (or drop_rate=0.0, attnjax's default)"
                )
            v = nn.Dropout(self.drop_rate, broadcast_dims=(1, 2), deterministic=False, name="dropout")(v)

        sow_map(self, "height", p)
        sow_map(self, "width", jnp.swapaxes(q, -1, -2))
        return x + v
