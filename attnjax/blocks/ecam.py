"""ECA with an MLP: ECA's 1-D channel convolution widened into a tiny per-channel MLP (timm's 'ecam').

Paper (ECA): Qilong Wang, Banggu Wu, Pengfei Zhu, Peihua Li, Wangmeng Zuo and Qinghua Hu (2020),
"ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", CVPR. The MLP variant is
not in the paper: it is timm's ``EcaModule(use_mlp=True)`` (``create_attn('ecam')``), which timm's code
calls "a timm experiment, not in paper". attnjax defines it from that code.

What it computes, for NHWC ``x`` with C channels, an expansion to m hidden features per channel and
ECA's kernel size k::

    z = mean over (H, W) of x                                        (N, 1, 1, C)
    h[c, r] = relu(u[r] * z[c] + a[r])                               1 -> m per channel (timm: Conv1d(1, m, 1))
    t[c] = beta + sum_{j=0}^{k-1} sum_{r<m} w[j, r] * h[c + j - (k-1)/2, r]   m -> 1, width k across channels
    s = sigmoid(t)                                                   (timm: Conv1d(m, 1, k, padding=(k-1)/2))
    y = x * s

``h`` is taken as 0 outside [0, C): the zero 'same' padding applies to the hidden features, after the
ReLU, as timm's second ``Conv1d`` pads them. Every channel shares the same MLP; ECA is the case m = 1 with
``u = 1``, ``a = 0``, no ReLU and no bias ``beta``.

m = ``make_divisible(C / reduction, divisor)`` with timm's rule (``reduction=8``, ``divisor=8``): C / 8
rounded to the nearest multiple of 8, at least 8, bumped up by 8 if the rounding lost more than 10%. It is
a hidden width per channel, not a bottleneck of C, so it is not capped at C (C = 3 gives m = 8).

Sown map: ``intermediates/attention``, the channel gate ``s`` of shape (N, 1, 1, C), in (0, 1).

Parameters: ``hidden_kernel`` u (m,), ``hidden_bias`` a (m,), ``kernel`` w (k, m), ``bias`` beta (),
initialised LeCun-normal (fan-in 1 and k*m) with zero biases, as Flax's Dense and Conv would.

Choices and deviations from timm's code:

- k is ECA's adaptive kernel size (``attnjax.blocks.eca.eca_kernel_size``, the paper's rule; ``kernel_size``
  overrides it). timm floors k at 3, which differs only for C < 8 (the paper's rule gives 1 there);
  ``kernel_size=3`` reproduces timm for such C.
- The gate is the sigmoid (timm's default ``gate_layer``); timm's ``act_layer`` option is fixed to ReLU
  (its default for the MLP).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from attnjax.blocks.eca import adaptive_kernel_size
from attnjax.blocks.primitives import global_avg_pool, sigmoid_gate, sow_map
from attnjax.validate import InputError, check_nhwc


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's width rule: ``value`` rounded to the nearest multiple of ``divisor`` (halves up), at least
    ``divisor``, plus one more ``divisor`` if the rounding went below ``round_limit * value``."""
    if divisor < 1:
        raise InputError(f"divisor must be >= 1, got {divisor}")
    width = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return width + divisor if width < round_limit * value else width


def mlp_channel_conv(
    z: jax.Array, hidden_kernel: jax.Array, hidden_bias: jax.Array, kernel: jax.Array, bias: jax.Array
) -> jax.Array:
    """The MLP across channels: ``t[c] = bias + sum_{j,r} kernel[j, r] * relu(u[r] z[c'] + a[r])``, c' = c + j - pad.

    ``z`` has channels on its last axis; ``hidden_kernel`` u and ``hidden_bias`` a are (m,), ``kernel`` is
    (k, m) with odd k, ``bias`` a scalar. The hidden features are zero outside [0, C). Returns the shape of ``z``.
    """
    hidden = jax.nn.relu(z[..., None] * hidden_kernel + hidden_bias)  # (..., C, m)
    k = kernel.shape[0]
    pad = (k - 1) // 2
    padded = jnp.pad(hidden, [(0, 0)] * (hidden.ndim - 2) + [(pad, pad), (0, 0)])
    channels = z.shape[-1]
    return bias + sum(padded[..., j : j + channels, :] @ kernel[j] for j in range(k))


class EfficientChannelAttentionMLP(nn.Module):
    """ECA-MLP block (timm's 'ecam'): global average pool, per-channel 1 -> m MLP with ReLU, width-k conv
    m -> 1 across channels, sigmoid, times the input.

    NHWC in, same shape out; C is read from the input and sets k and m. Sows the (N, 1, 1, C) gate as
    ``intermediates/attention``.
    """

    gamma: float = 2
    b: float = 1
    kernel_size: int | None = None  # None: ECA's adaptive k
    reduction: int = 8  # m = make_divisible(C / reduction, divisor)
    divisor: int = 8
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        who = type(self).__name__
        check_nhwc(x, who)
        channels = x.shape[-1]
        k = adaptive_kernel_size(self.kernel_size, channels, self.gamma, self.b, who)
        if self.reduction < 1:
            raise InputError(f"reduction must be >= 1 (timm uses 8), got {self.reduction}")
        hidden = make_divisible(channels / self.reduction, self.divisor)
        lecun = nn.initializers.lecun_normal
        params = (
            self.param("hidden_kernel", lecun(in_axis=(), out_axis=-1), (hidden,)),  # fan-in 1
            self.param("hidden_bias", nn.initializers.zeros, (hidden,)),
            self.param("kernel", lecun(in_axis=(0, 1), out_axis=()), (k, hidden)),  # fan-in k * m
            self.param("bias", nn.initializers.zeros, ()),
        )
        z, *params = promote_dtype(global_avg_pool(x), *params, dtype=self.dtype)
        y, gate = sigmoid_gate(x, mlp_channel_conv(z, *params))
        sow_map(self, "attention", gate)
        return y
