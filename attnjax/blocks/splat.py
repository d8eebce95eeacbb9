"""Split attention (Splat): a softmax across R radix splits of a grouped 3x3 conv, per cardinal group and channel.

Paper: Hang Zhang, Chongruo Wu, Zhongyue Zhang, Yi Zhu, Haibin Lin, Zhi Zhang, Yue Sun, Tong He,
Jonas Mueller, R. Manmatha, Mu Li and Alexander Smola (2020; CVPR Workshops 2022),
"ResNeSt: Split-Attention Networks". Also, with its options, exactly timm's ``SplitAttn`` with
ResNeSt's BNs (timm 1.0.29, ``timm/layers/split_attn.py``): the layer that replaces the 3x3 conv of
each bottleneck in timm's ResNeSts (see "As timm's conv layer" below).

What it computes, for NHWC ``x`` with C channels, radix R (2) and cardinality K (1)::

    u = relu(BN(conv3x3(x)))                 grouped conv C -> C*R, G = R*K groups (see below), no bias
    U_1 .. U_R = split(u)                    R splits of C channels each (radix-major: channel r*C + c)
    s = GAP(sum_r U_r)                       (N, C), the global context of every cardinal group
    z = relu(BN(fc1(s)))                     1x1 conv C -> d, grouped by K, d = max(R*C // 4, min(R*C, 32))
    g = fc2(z)                               1x1 conv d -> R*C, grouped by K, with bias
    a[k, r, j] = softmax_r(g[k, r, j])       r-softmax across the radix, per cardinal group k and channel j
                                             (sigmoid(g) when R = 1)
    y[c] = sum_r a_r[c] * U_r[c]             c = k*C/K + j

With the default options the output keeps the input's shape (out channels C, stride 1). Sows the radix
weights ``a`` as ``intermediates/attention``, shape ``(N, 1, 1, C_out, R)`` (broadcastable against the
stacked splits ``(N, H', W', C_out, R)``); for R > 1 they sum to 1 over the last axis, for R = 1 they are
sigmoid gates.

Choices and deviations (the defaults, attnjax's block):

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
  grouped. timm also rounds it to a multiple of 8 (``make_divisible``); the default does not (the
  ``rd_*`` options do). C is the input's channels, as in timm and the official code.
- fc1 has no bias by default: BN follows it, so a bias would only shift BN's mean (the official
  code and timm have one: ``fc1_bias=True``).
- Groups that C does not divide (the block must run on any C): the cardinality used is the largest
  divisor of C_out that is at most ``cardinality`` (K = 1, the default, always divides); the 3x3 conv's
  groups are ``gcd(C_in, R*K)``, which is the paper's R*K whenever R*K divides C (C = 64, R = 2: 2
  groups) and 1 (a dense conv) for odd C with R = 2 (C = 13, 37). Every conv group then covers
  whole (split, cardinal group) blocks of output channels, so the attention is the same math.
- BN uses the shared :func:`attnjax.layers.batch_norm` (epsilon 1e-5, momentum 0.9 = PyTorch's 0.1,
  two-pass variance).

The registry defaults equal timm's ``SplitAttn(C, C, radix=2, norm_layer=BatchNorm2d)`` with a zero
fc1 bias wherever timm accepts C and the two width rules agree: for C a multiple of 16 (d = C / 2, or
32 for C = 16), checked against timm in tests/blocks/test_splat.py. They are not timm's for other C
(timm's d = ``make_divisible(C / 2, 8, min_value=32)``; C = 8: 32 against attnjax's 16), for odd C
(timm refuses: its conv's R groups must divide C) or without ``fc1_bias``, so they stay attnjax's.

As timm's conv layer: ``SplitAttn(in, out, kernel_size, stride, padding, dilation, groups, bias, radix,
rd_ratio, rd_channels, rd_divisor, norm_layer=BatchNorm2d)`` is this block with ``out_channels=out``,
``cardinality=groups`` (timm's ``groups`` is the cardinality; the conv has R*K groups in both),
``fc1_bias=True`` and the rest by the same names, where

- ``padding``: None is timm's ``kernel_size // 2`` (not dilation-aware, as in timm: ResNeSt passes
  ``padding=dilation``).
- ``rd_ratio``, ``rd_channels``, ``rd_divisor``: giving any of them (all None by default) selects timm's
  width rule, d = ``rd_channels * R``, else ``make_divisible(C_in * R * rd_ratio, rd_divisor,
  min_value=32)`` (:func:`attnjax.blocks.primitives.make_divisible`), with timm's defaults
  ``rd_ratio=0.25`` and ``rd_divisor=8`` for the ones not given; rounded up to a multiple of K as
  above (timm would refuse a d that K does not divide). Giving them with ``reduction`` or
  ``min_channels`` other than their defaults (attnjax's rule) is an error.
- ``kernel_size`` must be odd (timm takes any size).
- Not offered: timm's ``act_layer`` (always ReLU, timm's default), ``norm_layer=None`` (always BN, as
  ResNeSt passes it), ``drop_layer`` (DropBlock; None in timm's ResNeSts by default).

Parameters, one for one with timm's state dict, under timm's names (conv kernels HWIO here, OIHW in
PyTorch: ``weight = kernel.transpose(3, 2, 0, 1)``; BN ``scale`` is ``weight``; running ``mean``/``var``
in ``batch_stats`` are ``running_mean``/``running_var``; ``num_batches_tracked`` has no counterpart)::

    params/conv/kernel        (k, k, C_in / G, R * C_out)   conv.weight   (conv/bias: conv.bias, with bias=True)
    params/bn0/scale, bias    (R * C_out,)                  bn0.weight, bn0.bias
    batch_stats/bn0/mean, var                               bn0.running_mean, bn0.running_var
    params/fc1/kernel         (1, 1, C_out / K, d)          fc1.weight
    params/fc1/bias           (d,)                          fc1.bias      (with fc1_bias=True)
    params/bn1/scale, bias    (d,)                          bn1.weight, bn1.bias
    batch_stats/bn1/mean, var                               bn1.running_mean, bn1.running_var
    params/fc2/kernel         (1, 1, d / K, R * C_out)      fc2.weight
    params/fc2/bias           (R * C_out,)                  fc2.bias

On CPU the grouped convs are traced as dense convs with a block-diagonal kernel
(:mod:`attnjax.ops.grouped_conv`), as in SK: same parameters, values and gradients.

Batch-norm running variance: the running averages take in the biased batch variance (Flax's convention);
PyTorch's ``BatchNorm2d`` takes in the unbiased one, n/(n-1) times larger, n being the values per
channel in the batch. Outputs agree with PyTorch, but running variances imported from or exported to
PyTorch differ by up to n/(n-1): ``bn0`` has n = N*H'*W', but ``bn1`` sees (N, 1, 1, .) features, so n =
N: 2x for a batch of 2. Convert them with ``attnjax.layers.torch_running_var`` and ``flax_running_var``
(for inference with timm's weights, load ``running_var`` as it is).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.blocks.primitives import (
    at_least_float32,
    block_batch_norm,
    make_divisible,
    odd_size,
    reduced_channels,
    refuse_both_width_rules,
    softmax_in_float32,
    sow_map,
)
from attnjax.layers import BATCH_AXIS
from attnjax.ops.grouped_conv import grouped_conv
from attnjax.validate import InputError, check_nhwc

TIMM_RD_RATIO = 0.25  # timm's SplitAttn defaults, for the rd_* options not given
TIMM_RD_DIVISOR = 8
TIMM_MIN_WIDTH = 32


def splat_widths(
    channels: int,
    radix: int = 2,
    cardinality: int = 1,
    reduction: int = 4,
    min_channels: int = 32,
    *,
    out_channels: int | None = None,
    rd_ratio: float | None = None,
    rd_channels: int | None = None,
    rd_divisor: int | None = None,
) -> tuple[int, int, int]:
    """``(K, G, d)``: the cardinality used, the 3x3 conv's groups and fc1's width, for C_in = ``channels``.

    K is the largest divisor of C_out (``out_channels``, default C_in) up to ``cardinality``; G = gcd(C_in, R*K);
    d = ``reduced_channels(R*C_in, reduction, min_channels)``, or, when any ``rd_*`` option is given, timm's
    ``rd_channels * R`` or ``make_divisible(C_in * R * rd_ratio, rd_divisor, min_value=32)``; rounded up to a
    multiple of K.
    """
    if radix < 1:
        raise InputError(f"radix must be >= 1, got {radix}")
    if cardinality < 1:
        raise InputError(f"cardinality must be >= 1, got {cardinality}")
    if min_channels < 1:
        raise InputError(f"min_channels must be >= 1, got {min_channels}")
    out_channels = out_channels or channels
    k = max(g for g in range(1, min(cardinality, out_channels) + 1) if out_channels % g == 0)
    if rd_ratio is None and rd_channels is None and rd_divisor is None:
        hidden = reduced_channels(radix * channels, reduction, min_channels)
    elif rd_channels is not None:
        refuse_both_width_rules(reduction=(reduction, 4), min_channels=(min_channels, 32))
        if rd_channels < 1:
            raise InputError(f"rd_channels must be >= 1 or None, got {rd_channels}")
        hidden = rd_channels * radix
    else:
        refuse_both_width_rules(reduction=(reduction, 4), min_channels=(min_channels, 32))
        if rd_ratio is not None and not rd_ratio > 0:
            raise InputError(f"rd_ratio must be > 0 or None, got {rd_ratio}")
        if rd_divisor is not None and rd_divisor < 1:
            raise InputError(f"rd_divisor must be >= 1 or None, got {rd_divisor}")
        ratio = TIMM_RD_RATIO if rd_ratio is None else rd_ratio
        divisor = TIMM_RD_DIVISOR if rd_divisor is None else rd_divisor
        hidden = make_divisible(channels * radix * ratio, divisor=divisor, min_value=TIMM_MIN_WIDTH)
    return k, math.gcd(channels, radix * k), -(-hidden // k) * k


def radix_softmax(logits: jax.Array, radix: int, cardinality: int) -> jax.Array:
    """fc2's cardinal-major logits ``(..., K*R*C/K)`` as radix weights ``(..., C, R)``.

    ``logits[..., k*R*C/K + r*C/K + j]`` is split r's logit for channel ``c = k*C/K + j``; the weights are
    its softmax over r (a sigmoid when R = 1), computed and returned in at least float32.
    """
    *lead, width = logits.shape
    per_group = width // (radix * cardinality)
    g = logits.reshape(*lead, cardinality, radix, per_group)
    weights = softmax_in_float32(g, axis=-2) if radix > 1 else jax.nn.sigmoid(at_least_float32(g))
    return jnp.swapaxes(weights, -1, -2).reshape(*lead, cardinality * per_group, radix)


def split_attention(splits: jax.Array, weights: jax.Array) -> jax.Array:
    """``y = sum_r a_r * U_r``: ``splits`` ``(N, H, W, C, R)``, ``weights`` ``(N, 1, 1, C, R)``."""
    return jnp.sum(weights * splits, axis=-1)


class SplitAttention(nn.Module):
    """Splat (ResNeSt): grouped 3x3 conv to R splits, GAP of their sum, FC-BN-ReLU-FC, r-softmax, weighted sum.

    NHWC in; with the defaults the same shape out (``out_channels``, ``stride``, ...: timm's ``SplitAttn`` as
    a conv, see the module's docstring). ``train`` selects batch statistics. Sows the radix weights
    ``(N, 1, 1, C_out, R)`` as ``intermediates/attention``.
    """

    radix: int = 2
    cardinality: int = 1  # timm's `groups`
    reduction: int = 4
    min_channels: int = 32
    # timm's SplitAttn options (see the module's docstring); the defaults keep attnjax's block.
    out_channels: int | None = None  # None: the input's channels
    kernel_size: int = 3
    stride: int = 1
    padding: int | None = None  # None: kernel_size // 2, timm's
    dilation: int = 1
    bias: bool = False  # the conv's bias (timm's `bias`)
    fc1_bias: bool = False  # timm's fc1 always has one
    rd_ratio: float | None = None  # any rd_* given: timm's width rule (rd_ratio 0.25, rd_divisor 8 by default)
    rd_channels: int | None = None
    rd_divisor: int | None = None
    dtype: Any = None
    axis_name: str | None = BATCH_AXIS  # batch-norm synchronisation axis (Flax's), used where bound; set by the host

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        who = type(self).__name__
        check_nhwc(x, who)
        if self.out_channels is not None and self.out_channels < 1:
            raise InputError(
                f"{who}: out_channels must be >= 1 or None (the input's channels), got {self.out_channels}"
            )
        size = odd_size(self.kernel_size, "kernel_size", who, "timm's ResNeSts use 3")
        if self.stride < 1:
            raise InputError(f"{who}: stride must be >= 1, got {self.stride}")
        if self.dilation < 1:
            raise InputError(f"{who}: dilation must be >= 1, got {self.dilation}")
        if self.padding is not None and self.padding < 0:
            raise InputError(f"{who}: padding must be >= 0 or None (kernel_size // 2, timm's), got {self.padding}")
        pad = size // 2 if self.padding is None else self.padding
        n, channels = x.shape[0], x.shape[-1]
        out_channels = self.out_channels or channels
        radix = self.radix
        k, groups, hidden = splat_widths(
            channels,
            radix,
            self.cardinality,
            self.reduction,
            self.min_channels,
            out_channels=out_channels,
            rd_ratio=self.rd_ratio,
            rd_channels=self.rd_channels,
            rd_divisor=self.rd_divisor,
        )

        u = nn.Conv(
            out_channels * radix,
            (size, size),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            kernel_dilation=self.dilation,
            feature_group_count=groups,
            use_bias=self.bias,
            dtype=self.dtype,
            conv_general_dilated=grouped_conv,
            name="conv",
        )(x)
        u = nn.relu(block_batch_norm(self, train, "bn0")(u))
        h, w = u.shape[1:3]
        splits = jnp.moveaxis(u.reshape(n, h, w, radix, out_channels), 3, -1)  # (N, H', W', C_out, R)

        # GAP(sum_r U_r), as the sum of the splits' means (GAP is linear): bn1 normalises over the batch, and for
        # batch 2 it can amplify float rounding up to 0.5 / sqrt(eps) times; this order rounds less.
        s = jnp.sum(jnp.mean(splits, axis=(1, 2), keepdims=True), axis=-1)  # (N, 1, 1, C_out)

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

        z = fc(hidden, self.fc1_bias, "fc1")(s)
        z = nn.relu(block_batch_norm(self, train, "bn1")(z))
        logits = fc(out_channels * radix, True, "fc2")(z)  # (N, 1, 1, R*C_out), cardinal-major
        weights = radix_softmax(logits, radix, k)  # (N, 1, 1, C_out, R)

        sow_map(self, "attention", weights)  # float32; the weighted sum in the logits' dtype
        return split_attention(splits, weights.astype(logits.dtype))
