"""SK: selective kernel attention, a softmax choice between receptive fields per channel.

Li, Wang, Hu and Yang (2019), "Selective Kernel Networks", CVPR.

Split, fuse, select, with M branches (M = 2 by default)::

    U_m = relu(BN(conv3x3_m(x)))       grouped 3x3 convs, dilation 1 and 2, C -> C
    U = sum_m U_m
    s = GAP(U)                         (N, C)
    z = relu(BN(fc(s)))                C -> d, d = max(C // r, min(C, L)), r = 16, L = 32
    a_m = softmax_m(fc_m(z))           one FC d -> C per branch, softmax across branches per channel
    y = sum_m a_m * U_m

The output keeps the input's shape. Sows the branch weights ``a`` as
``intermediates/attention``, shape ``(N, 1, 1, C, M)`` (broadcastable against the stacked
branches ``(N, H, W, C, M)``); they sum to 1 over the last axis.

Choices and deviations:
- The 5x5 branch is a 3x3 conv with dilation 2, as the paper itself recommends.
- Groups: the paper's G = 32, taken as the largest divisor of C that is at most 32
  (``sk_groups``). For C <= 32 that is C (depthwise convs); for C = 64 it is 32; for a C that
  32 does not divide (48, 40) it is the nearest smaller divisor (24, 20) rather than an error;
  for a prime C above 32 it is 1.
- d = ``reduced_channels(C, r, min_channels=L)`` = ``max(C // r, min(C, L))``: the paper's
  ``max(C / r, L)`` for C >= L, but never wider than C itself (for C < 32 the paper's d = 32
  would widen the bottleneck past the input).
- The convs and FCs have no bias (each conv is followed by BN, and the paper's selection
  FCs are written without one). BN uses the shared :func:`attnjax.layers.batch_norm`.
- The block is SK convolution used as an attention block: input and output both have C
  channels, stride 1.

On CPU the grouped convs are traced as dense convs with a block-diagonal kernel
(:mod:`attnjax.ops.grouped_conv`): XLA:CPU computes a grouped conv's kernel gradient so slowly
that the block's train step is 30-60x faster this way. Same parameters (the grouped kernels),
same values and gradients.

Batch-norm running variance: the running averages take in the biased batch variance (Flax's convention);
PyTorch's ``BatchNorm2d`` takes in the unbiased one, n/(n-1) times larger, n being the values per
channel in the batch. Outputs agree with PyTorch, but running variances imported from or exported to
PyTorch differ by up to n/(n-1): the branch BNs have n = N*H*W, but the fuse BN sees (N, 1, 1, d)
features, so n = N: 2x for a batch of 2. Convert them with ``attnjax.layers.torch_running_var`` and
``flax_running_var``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.blocks.primitives import block_batch_norm, reduced_channels
from attnjax.layers import BATCH_AXIS
from attnjax.ops.grouped_conv import grouped_conv
from attnjax.validate import InputError, check_nhwc


def sk_groups(channels: int, groups: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``groups`` (``groups`` itself when it divides)."""
    if groups < 1:
        raise InputError(f"groups must be >= 1, got {groups}")
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


def select_kernels(branches: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a = softmax over m of logits``, ``y = sum_m a_m * U_m``. Returns ``(y, a)``.

    ``branches``: the stacked ``U_m``, ``(N, H, W, C, M)``; ``logits``: ``(N, 1, 1, C, M)``.
    """
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.sum(weights * branches, axis=-1), weights


class SelectiveKernelAttention(nn.Module):
    """SK: grouped 3x3 branches (one per dilation), fused by GAP and an FC, selected by a softmax per channel.

    NHWC in, same shape out; C is read from the input. ``train`` selects batch statistics.
    Sows the branch weights ``(N, 1, 1, C, M)`` as ``intermediates/attention``.
    """

    dilations: tuple[int, ...] = (1, 2)
    groups: int = 32
    reduction: int = 16
    min_channels: int = 32  # the paper's L
    dtype: Any = None
    axis_name: str | None = BATCH_AXIS  # batch-norm synchronisation axis (Flax's), used where bound; set by the host

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        who = type(self).__name__
        check_nhwc(x, who)
        if not self.dilations or min(self.dilations) < 1:
            raise InputError(
                f"{who}: dilations must be one or more integers >= 1 (one per branch), got {self.dilations}"
            )
        channels = x.shape[-1]
        groups = sk_groups(channels, self.groups)
        hidden = reduced_channels(channels, self.reduction, self.min_channels)

        branches = []
        for m, dilation in enumerate(self.dilations):
            u = nn.Conv(
                channels,
                (3, 3),
                padding=((dilation, dilation), (dilation, dilation)),
                kernel_dilation=dilation,
                feature_group_count=groups,
                use_bias=False,
                dtype=self.dtype,
                conv_general_dilated=grouped_conv,
                name=f"conv_{m}",
            )(x)
            branches.append(nn.relu(block_batch_norm(self, train, f"bn_{m}")(u)))
        branches = jnp.stack(branches, axis=-1)

        s = jnp.mean(jnp.sum(branches, axis=-1), axis=(1, 2), keepdims=True)
        z = nn.Dense(hidden, use_bias=False, dtype=self.dtype, name="fuse")(s)
        z = nn.relu(block_batch_norm(self, train, "fuse_bn")(z))
        logits = jnp.stack(
            [
                nn.Dense(channels, use_bias=False, dtype=self.dtype, name=f"select_{m}")(z)
                for m in range(len(self.dilations))
            ],
            axis=-1,
        )
        y, weights = select_kernels(branches, logits)
        self.sow("intermediates", "attention", weights)
        return y
