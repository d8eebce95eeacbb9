"""Efficient Channel Attention: a channel gate from a 1-D convolution across pooled channels.

Paper: Qilong Wang, Banggu Wu, Pengfei Zhu, Peihua Li, Wangmeng Zuo and Qinghua Hu (2020),
"ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", CVPR.

What it computes, for NHWC ``x`` with C channels::

    z = mean over (H, W) of x                       (N, 1, 1, C)
    k = |log2(C) / gamma + b / gamma|_odd           gamma = 2, b = 1
    s = sigmoid(conv1d_k(z))                        across the channel axis, no bias, zero 'same' padding
    y = x * s

``|t|_odd`` is the odd number nearest to t; as in the official code, ``t`` is truncated and an even
result is bumped up by one, which resolves the ties (t even) upwards. C=64 gives k=3, C=256 gives 5,
C=2048 gives 7; C < 8 gives k=1.

Sown map: ``intermediates/attention``, the channel gate ``s`` of shape (N, 1, 1, C), in (0, 1).

Deviations from the paper: none in the computation. ``kernel_size`` may be set to override the
adaptive k. The kernel is initialised LeCun-normal with fan-in k (Flax's default for a convolution),
not PyTorch's default.

Naming and options, against timm 1.0.29 (``timm/layers/eca.py``, ``EcaModule``, which is
``create_attn('eca', C)``, the block of timm's ``ecaresnet*``). The defaults are attnjax's; timm's options,
under timm's names:

- ``gamma`` is timm's ``gamma``; ``b`` is timm's ``beta``, which may be given under that name too
  (``beta`` replaces ``b``; giving both, with ``b`` other than 1, is an error);
- ``min_kernel_size``: the adaptive k is at least this (attnjax's default 1, the paper's rule; timm's
  ``EcaModule`` floors it at 3, ``max(k, 3)``, which differs from the paper only for C < 8);
- ``gate_layer``: ``sigmoid`` (default) or ``hard_sigmoid`` = relu6(t + 3) / 6;
- ``kernel_size``: a fixed k instead of the adaptive one. timm's ``kernel_size`` is used only when timm is
  given no channel count, which a host always gives; here it always wins when set.

timm's ``use_mlp`` (with its ``rd_ratio``, ``rd_channels``, ``rd_divisor``, ``act_layer``) is the separate
block ``ecam`` (:mod:`attnjax.blocks.ecam`); without it timm ignores ``act_layer``. The parameter ``kernel``
(k,) is timm's ``conv.weight`` (1, 1, k). ``EfficientChannelAttention(min_kernel_size=3)`` is timm's default
``EcaModule`` for every C; attnjax's default has the same k for C >= 8, so at every site of timm's
ECA-ResNets.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from attnjax.blocks.primitives import gate_function, global_avg_pool, odd_size, sow_map
from attnjax.validate import InputError, check_nhwc


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    """Adaptive kernel size ``k = |log2(C) / gamma + b / gamma|_odd``.

    Computed as the official code does: ``t = int(|(log2(C) + b) / gamma|)``, ``k = t`` if t is odd
    else ``t + 1``.
    """
    if channels < 1:
        raise InputError(f"ECA needs at least 1 channel, got {channels}")
    if gamma <= 0:
        raise InputError(f"gamma must be > 0, got {gamma}; the paper uses gamma=2")
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


def adaptive_kernel_size(
    kernel_size: int | None, channels: int, gamma: float, b: float, who: str, min_kernel_size: int = 1
) -> int:
    """``kernel_size`` (a positive odd number), or for ``None`` the adaptive :func:`eca_kernel_size` of C, at
    least ``min_kernel_size`` (an odd number: timm's ECA uses 3)."""
    if kernel_size is None:
        floor = odd_size(min_kernel_size, "min_kernel_size", who, "timm's ECA uses 3")
        return max(eca_kernel_size(channels, gamma, b), floor)
    return odd_size(kernel_size, "kernel_size", who, "or None for the adaptive size")


def channel_conv(z: jax.Array, kernel: jax.Array) -> jax.Array:
    """1-D cross-correlation along the last (channel) axis with zero 'same' padding, no bias.

    ``out[..., c] = sum_{j=0}^{k-1} kernel[j] * z[..., c + j - (k-1)/2]``, with ``z`` taken as 0
    outside [0, C). ``kernel`` has odd length k; the output has the shape of ``z``.
    """
    k = kernel.shape[0]
    pad = (k - 1) // 2
    padded = jnp.pad(z, [(0, 0)] * (z.ndim - 1) + [(pad, pad)])
    channels = z.shape[-1]
    return sum(kernel[j] * padded[..., j : j + channels] for j in range(k))


class EfficientChannelAttention(nn.Module):
    """ECA block: global average pool, 1-D conv of adaptive size k across channels, sigmoid, times the input.

    NHWC in, same shape out; C is read from the input and sets k (unless ``kernel_size`` is given).
    The single parameter is ``kernel`` of shape (k,). Sows the (N, 1, 1, C) gate as
    ``intermediates/attention``. The 1-D conv is the method :meth:`channel_conv`
    (:class:`attnjax.blocks.ceca.CircularEfficientChannelAttention` replaces it).
    """

    gamma: float = 2
    b: float = 1
    kernel_size: int | None = None  # None: the adaptive k of the paper
    beta: float | None = None  # timm's name for b: replaces it when given
    min_kernel_size: int = 1  # the adaptive k's floor (timm's EcaModule: 3)
    gate_layer: str = "sigmoid"  # or "hard_sigmoid"
    dtype: Any = None

    def offset(self, who: str) -> float:
        """ECA's b: ``b``, or timm's ``beta`` when given (both, with ``b`` not its default 1, is an error)."""
        if self.beta is None:
            return self.b
        if self.b != 1:
            raise InputError(
                f"{who}: b={self.b} and beta={self.beta} are the same option (timm calls b beta); give one"
            )
        return self.beta

    def channel_conv(self, z: jax.Array, kernel: jax.Array) -> jax.Array:
        """The 1-D conv across channels: :func:`channel_conv`, zero 'same' padding."""
        return channel_conv(z, kernel)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        who = type(self).__name__
        check_nhwc(x, who)
        k = adaptive_kernel_size(self.kernel_size, x.shape[-1], self.gamma, self.offset(who), who, self.min_kernel_size)
        gate_fn = gate_function(self.gate_layer)
        # LeCun normal with fan-in k, as nn.Conv would initialise a 1-in, 1-out width-k kernel
        kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=(), out_axis=()), (k,))
        z, kernel = promote_dtype(global_avg_pool(x), kernel, dtype=self.dtype)
        gate = gate_fn(self.channel_conv(z, kernel))
        sow_map(self, "attention", gate)
        return x * gate  # as sigmoid_gate: the same promotion as before the timm options
