"""DANet: the position attention module and the channel attention module, summed.

Paper: Jun Fu, Jing Liu, Haijie Tian, Yong Li, Yongjun Bao, Zhiwei Fang and Hanqing Lu (2019),
"Dual Attention Network for Scene Segmentation", CVPR.

What it computes, for NHWC ``x`` with C channels at P = H*W positions (A = x as a (P, C) matrix)::

    position attention module (PAM)
        B, Cm, D = conv1x1(x)                        C -> C', C -> C', C -> C; C' = C/8 (see below)
        S[i, j] = softmax_j(B_i . Cm_j)              (P, P): query position i over all positions j
        E_pam[i] = sum_j S[i, j] D_j                 each position a mix of all positions' values

    channel attention module (CAM), no parameters but beta
        G = A^T A                                    (C, C) Gram matrix of the channels
        X[c, c'] = softmax_c'(max_c'' G[c, c''] - G[c, c'])   the official code's logits (see below)
        E_cam[:, c] = sum_c' X[c, c'] A[:, c']       each channel a mix of all channels

    y = x + alpha * E_pam + beta * E_cam             alpha = beta = 0 at initialisation

Sown maps (both softmaxes, every row sums to 1):

- ``intermediates/position``: S, shape (N, H*W, H*W); row i is query position i in row-major
  (h, w) order, column j the attended position.
- ``intermediates/channel``: X, shape (N, C, C); row c is output channel c.

Choices and deviations:

- Fusion. In the paper each module's output ``E = scale * attention + x`` goes through a conv
  layer (3x3 conv, BN, ReLU in the official head, which also puts such a conv before each
  module) and the two results are summed. As an in-place block of unchanged width we drop the
  convs around the modules and sum the two modules' attention terms on one residual:
  ``y = x + alpha E_pam + beta E_cam = E_pam_module + E_cam_module - x``. Counting the shared
  input once keeps the block exactly the identity at initialisation (alpha = beta = 0, both
  zero-initialised as in the paper and the official code), where the literal sum of the two
  modules' outputs would start at 2x.
- CAM logits. The paper writes ``x_ji = exp(A_i . A_j) / sum_i exp(A_i . A_j)``. The official
  code (junfu1115/DANet, ``CAM_Module``) takes the softmax of ``max_row(G) - G``. That is not
  only the usual subtraction of the maximum (which leaves a softmax unchanged): it also negates
  the energy, so ``softmax(max - G) = softmax(-G)`` puts the most weight on the *least* similar
  channels. We follow the official code by default (``channel_energy="official"``: the trained
  DANet models use it) and offer the paper's formula as ``channel_energy="paper"``
  (``softmax_c'(G[c, c'])``, computed stably).
- Roles of B and C in PAM. The paper normalises ``exp(B_i . C_j)`` over i and writes the output
  at j; the official code uses ``query_conv`` (B) for the output position and normalises over
  the key positions (``key_conv``, C). The two are the same function with the two 1x1 convs
  swapped; we follow the official code, so the sown map's rows are the queries.
- Reduced width C' = ``reduced_channels(C, reduction=8)`` = ``max(C // 8, min(C, 8))``: the
  paper's C/8 for C >= 64 (the official ``in_dim // 8``, which is 0 for C < 8, is floored).
- No scaling of the logits by 1/sqrt(C'), as in the paper and the official code.
- All three 1x1 convs of PAM have biases, as in the official code (the paper does not say).
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

CHANNEL_ENERGIES = ("official", "paper")


def position_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> tuple[jax.Array, jax.Array]:
    """PAM without its residual: ``S = softmax_j(q_i . k_j)``, ``out_i = sum_j S[i, j] v_j``.

    ``query``, ``key``: ``(N, H, W, C')``; ``value``: ``(N, H, W, C_v)``. Returns ``(out, S)``,
    ``out`` of shape ``(N, H, W, C_v)`` and ``S`` of shape ``(N, H*W, H*W)`` (rows sum to 1).
    """
    n, h, w, c_v = value.shape

    def flat(a):
        return a.reshape(n, h * w, a.shape[-1])

    logits = jnp.einsum("nic,njc->nij", flat(query), flat(key))
    attention = softmax_in_float32(logits)  # the map, float32; the product in the logits' dtype
    out = jnp.einsum("nij,njc->nic", attention.astype(logits.dtype), flat(value))
    return out.reshape(n, h, w, c_v), attention


def channel_attention(x: jax.Array, channel_energy: str = "official") -> tuple[jax.Array, jax.Array]:
    """CAM without its residual: ``X = softmax_c'(logits[c, c'])`` on the Gram matrix ``G = A^T A``, ``out = A X^T``.

    ``x``: ``(N, H, W, C)``, ``A`` its ``(H*W, C)`` matrix per image. ``channel_energy="official"``:
    ``logits = max_c'' G[c, c''] - G[c, c']`` (DANet's code); ``"paper"``: ``logits = G[c, c']``.
    Returns ``(out, X)``, ``out`` of the shape of ``x`` and ``X`` of shape ``(N, C, C)`` (rows sum to 1).
    """
    if channel_energy not in CHANNEL_ENERGIES:
        raise InputError(f"channel_energy must be one of {', '.join(CHANNEL_ENERGIES)}; got {channel_energy!r}")
    n, h, w, c = x.shape
    a = x.reshape(n, h * w, c)
    gram = jnp.einsum("npc,npd->ncd", a, a)
    if channel_energy == "official":
        gram = jnp.max(gram, axis=-1, keepdims=True) - gram
    attention = softmax_in_float32(gram)  # the map, float32; the product in the Gram matrix's dtype
    out = jnp.einsum("ncd,npd->npc", attention.astype(gram.dtype), a)
    return out.reshape(n, h, w, c), attention


class DualAttention(nn.Module):
    """DANet's position and channel attention: ``y = x + alpha * PAM(x) + beta * CAM(x)``, identity at init.

    NHWC in, same shape out; C is read from the input. Sows ``intermediates/position``
    ``(N, H*W, H*W)`` and ``intermediates/channel`` ``(N, C, C)``.
    """

    reduction: int = 8
    min_channels: int = 8
    channel_energy: str = "official"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        check_nhwc(x, type(self).__name__)
        if self.channel_energy not in CHANNEL_ENERGIES:
            raise InputError(
                f"{type(self).__name__}: channel_energy must be one of {', '.join(CHANNEL_ENERGIES)}; "
                f"got {self.channel_energy!r}"
            )
        channels = x.shape[-1]
        inner = reduced_channels(channels, self.reduction, self.min_channels)
        query = nn.Conv(inner, (1, 1), dtype=self.dtype, name="query")(x)
        key = nn.Conv(inner, (1, 1), dtype=self.dtype, name="key")(x)
        value = nn.Conv(channels, (1, 1), dtype=self.dtype, name="value")(x)
        e_pam, position = position_attention(query, key, value)
        alpha = self.param("alpha", nn.initializers.zeros, ())
        beta = self.param("beta", nn.initializers.zeros, ())
        x_c, alpha, beta = promote_dtype(x, alpha, beta, dtype=self.dtype)
        e_cam, channel = channel_attention(x_c, self.channel_energy)
        sow_map(self, "position", position)
        sow_map(self, "channel", channel)
        return x + alpha * e_pam + beta * e_cam
