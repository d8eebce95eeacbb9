"""Split attention (Splat): a softmax across R radix splits of a grouped 3x3 conv, per cardinal group and channel.

Paper: Hang Zhang, Chongruo Wu, Zhongyue Zhang, Yi Zhu, Haibin Lin, Zhi Zhang, Yue Sun, Tong He,
Jonas Mueller, R. Manmatha, Mu Li and Alexander Smola (2020; CVPR Workshops 2022),
"ResNeSt: Split-Attention Networks".

What it computes, for NHWC ``x`` with C channels, radix R (2) and cardinality K (1)::

    u = relu(BN(conv3x3(x)))                 grouped conv C -> C*R, G = R*K groups (see below), no bias
    U_1 .. U_R = split(u)                    R splits of C channels each (radix-major: channel r*C + c)
    s = GAP(sum_r U_r)                       (N, C), the global context of every cardinal group
    z = relu(BN(fc1(s)))                     1x1 conv C -> d, grouped by K, d = max(R*C // 4, min(R*C, 32))
    g = fc2(z)                               1x1 conv d -> R*C, grouped by K, with bias
    a[k, r, j] = softmax_r(g[k, r, j])       r-softmax across the radix, per cardinal group k and channel j
                                             (sigmoid(g) when R = 1)
    y[c] = sum_r a_r[c] * U_r[c]             c = k*C/K + j

The output keeps the input's shape (out channels C, stride 1). Sows the radix weights ``a`` as
``intermediates/attention``, shape ``(N, 1, 1, C, R)`` (broadcastable against the stacked splits
``(N, H, W, C, R)``); for R > 1 they sum to 1 over the last axis, for R = 1 they are sigmoid gates.

Choices and deviations:

- Used as an in-place attention block: SplitAttn with out channels = C and stride 1, as timm's
  ``create_attn("splat")`` builds it, with the BNs of ResNeSt (timm's SplitAttn has
  ``norm_layer=None`` by default; the paper's block and its ResNeSt models have BN after the conv
  and after fc1). No DropBlock, no average-pool downsampling (ResNeSt's bottleneck does those).
- Where the paper is silent the official code decides (as in timm's SplitAttn): the split
  channels are radix-major (split r = channels [r*C, (r+1)*C) of the conv output), fc2's output
  is cardinal-major ``(K, R, C/K)``, the conv has no bias, fc2 has one, the hidden width is
  ``max(R*C // 4, 32)`` (reduction factor 4 on R*C) and R = 1 uses a sigmoid.
- Hidden width d = ``reduced_channels(R*C, 4, min_channels=32)`` = ``max(R*C // 4, min(R*C, 32))``:
  the official ``max(R*C // 4, 32)`` for R*C >= 32, but never wider than R*C (for R*C < 32 the
  official 32 would widen the bottleneck); then rounded up to a multiple of K so that fc1 can be
  grouped. timm also rounds it to a multiple of 8 (``make_divisible``); we do not.
- fc1 has no bias: BN follows it, so a bias would only shift BN's mean (the official code has one).
- Groups that C does not divide (the block must run on any C): the cardinality used is the largest
  divisor of C that is at most ``cardinality`` (K = 1, the default, always divides); the 3x3 conv's
  groups are ``gcd(C, R*K)``, which is the paper's R*K whenever R*K divides C (C = 64, R = 2: 2
  groups) and 1 (a dense conv) for odd C with R = 2 (C = 13, 37). Every conv group then covers
  whole (split, cardinal group) blocks of output channels, so the attention is the same math.
- BN uses the shared :func:`attnjax.layers.batch_norm` (epsilon 1e-5, two-pass variance).

On CPU the grouped convs are traced as dense convs with a block-diagonal kernel
(:mod:`attnjax.ops.grouped_conv`), as in SK: same parameters, values and gradients.

Batch-norm running variance: the running averages take in the biased batch variance (Flax's convention);
PyTorch's ``BatchNorm2d`` takes in the unbiased one, n/(n-1) times larger, n being the values per
channel in the batch. Outputs agree with PyTorch, but running variances imported from or exported to
PyTorch differ by up to n/(n-1): ``bn0`` has n = N*H*W, but ``bn1`` sees (N, 1, 1, .) features, so n =
N: 2x for a batch of 2. Convert them with ``attnjax.layers.torch_running_var`` and ``flax_running_var``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.blocks.primitives import block_batch_norm, reduced_channels
from attnjax.layers import BATCH_AXIS
from attnjax.ops.grouped_conv import grouped_conv
from attnjax.validate import InputError, check_nhwc


def splat_widths(
    channels: int, radix: int = 2, cardinality: int = 1, reduction: int = 4, min_channels: int = 32
) -> tuple[int, int, int]:
    """``(K, G, d)``: the cardinality used, the 3x3 conv's groups and fc1's width, for C = ``channels``.

    K is the largest divisor of C up to ``cardinality``; G = gcd(C, R*K); d = ``reduced_channels(R*C,
    reduction, min_channels)`` rounded up to a multiple of K.
    """
    if radix < 1:
        raise InputError(f"radix must be >= 1, got {radix}")
    if cardinality < 1:
        raise InputError(f"cardinality must be >= 1, got {cardinality}")
    if min_channels < 1:
        raise InputError(f"min_channels must be >= 1, got {min_channels}")
    k = max(g for g in range(1, min(cardinality, channels) + 1) if channels % g == 0)
    hidden = reduced_channels(radix * channels, reduction, min_channels)
    return k, math.gcd(channels, radix * k), -(-hidden // k) * k


def radix_softmax(logits: jax.Array, radix: int, cardinality: int) -> jax.Array:
    """fc2's cardinal-major logits ``(..., K*R*C/K)`` as radix weights ``(..., C, R)``.

    ``logits[..., k*R*C/K + r*C/K + j]`` is split r's logit for channel ``c = k*C/K + j``; the weights are
    its softmax over r (a sigmoid when R = 1).
    """
    *lead, width = logits.shape
    per_group = width // (radix * cardinality)
    g = logits.reshape(*lead, cardinality, radix, per_group)
    weights = jax.nn.softmax(g, axis=-2) if radix > 1 else jax.nn.sigmoid(g)
    return jnp.swapaxes(weights, -1, -2).reshape(*lead, cardinality * per_group, radix)


def split_attention(splits: jax.Array, weights: jax.Array) -> jax.Array:
    """``y = sum_r a_r * U_r``: ``splits`` ``(N, H, W, C, R)``, ``weights`` ``(N, 1, 1, C, R)``."""
    return jnp.sum(weights * splits, axis=-1)


class SplitAttention(nn.Module):
    """Splat (ResNeSt): grouped 3x3 conv to R splits, GAP of their sum, FC-BN-ReLU-FC, r-softmax, weighted sum.

    NHWC in, same shape out; C is read from the input. ``train`` selects batch statistics.
    Sows the radix weights ``(N, 1, 1, C, R)`` as ``intermediates/attention``.
    """

    radix: int = 2
    cardinality: int = 1
    reduction: int = 4
    min_channels: int = 32
    dtype: Any = None
    axis_name: str | None = BATCH_AXIS  # batch-norm synchronisation axis (Flax's), used where bound; set by the host

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_nhwc(x, type(self).__name__)
        n, h, w, channels = x.shape
        radix = self.radix
        k, groups, hidden = splat_widths(channels, radix, self.cardinality, self.reduction, self.min_channels)

        u = nn.Conv(
            channels * radix,
            (3, 3),
            padding=((1, 1), (1, 1)),
            feature_group_count=groups,
            use_bias=False,
            dtype=self.dtype,
            conv_general_dilated=grouped_conv,
            name="conv",
        )(x)
        u = nn.relu(block_batch_norm(self, train, "bn0")(u))
        splits = jnp.moveaxis(u.reshape(n, h, w, radix, channels), 3, -1)  # (N, H, W, C, R)

        # GAP(sum_r U_r), as the sum of the splits' means (GAP is linear): bn1 normalises over the batch, and for
        # batch 2 it can amplify float rounding up to 0.5 / sqrt(eps) times; this order rounds less.
        s = jnp.sum(jnp.mean(splits, axis=(1, 2), keepdims=True), axis=-1)  # (N, 1, 1, C)

        def fc(features, use_bias, name):
            return nn.Conv(
                features,
                (1, 1),
                feature_group_count=k,
                use_bias=use_bias,
                dtype=self.dtype,
                conv_general_dilated=grouped_conv,
                name=name,
            )

        z = fc(hidden, False, "fc1")(s)
        z = nn.relu(block_batch_norm(self, train, "bn1")(z))
        logits = fc(channels * radix, True, "fc2")(z)  # (N, 1, 1, R*C), cardinal-major
        weights = radix_softmax(logits, radix, k)  # (N, 1, 1, C, R)

        self.sow("intermediates", "attention", weights)
        return split_attention(splits, weights)
