"""Circular ECA: Efficient Channel Attention whose 1-D channel convolution wraps around the channel axis.

Paper (ECA): Qilong Wang, Banggu Wu, Pengfei Zhu, Peihua Li, Wangmeng Zuo and Qinghua Hu (2020),
"ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", CVPR. The circular variant
is not in the paper: it is timm's ``CecaModule`` (``create_attn('ceca')``, by Chris Ha), whose argument is
that channels have no inherent order or edges, so the first and last channels need not see zeros.

What it computes, for NHWC ``x`` with C channels::

    z = mean over (H, W) of x                               (N, 1, 1, C)
    k = |log2(C) / gamma + b / gamma|_odd                   gamma = 2, b = 1, as ECA (attnjax.blocks.eca)
    t[c] = sum_{j=0}^{k-1} w[j] * z[(c + j - (k-1)/2) mod C]   circular 'same' cross-correlation, no bias
    s = sigmoid(t)
    y = x * s

Sown map: ``intermediates/attention``, the channel gate ``s`` of shape (N, 1, 1, C), in (0, 1).

Choices and deviations:

- The only difference from ``eca`` is the padding: circular instead of zeros. The kernel size is ECA's
  adaptive k (``attnjax.blocks.eca.eca_kernel_size``, the paper's rule); ``kernel_size`` overrides it.
  timm's ``CecaModule`` floors k at 3 (``max(k, 3)``), which differs only for C < 8 (the paper's rule gives
  k = 1 there, where the wrap-around has nothing to do); ``kernel_size=3`` reproduces timm for such C.
- The wrap-around is defined for any k, also k > C (the channel index is taken mod C, so a channel can be
  seen more than once); timm's ``F.pad(mode='circular')`` refuses a pad larger than C.
- The kernel is initialised LeCun-normal with fan-in k, as ``eca``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.blocks.eca import EfficientChannelAttention


def circular_channel_conv(z: jax.Array, kernel: jax.Array) -> jax.Array:
    """1-D cross-correlation along the last (channel) axis with circular 'same' padding, no bias.

    ``out[..., c] = sum_{j=0}^{k-1} kernel[j] * z[..., (c + j - (k-1)/2) mod C]``. ``kernel`` has odd
    length k (any k, also larger than C); the output has the shape of ``z``.
    """
    k = kernel.shape[0]
    pad = (k - 1) // 2
    # jnp.roll(z, s)[c] = z[(c - s) mod C]; s = pad - j gives z[(c + j - pad) mod C]
    return sum(kernel[j] * jnp.roll(z, pad - j, axis=-1) for j in range(k))


class CircularEfficientChannelAttention(EfficientChannelAttention):
    """Circular ECA block: global average pool, circular 1-D conv of adaptive size k across channels, sigmoid.

    NHWC in, same shape out; C is read from the input and sets k (unless ``kernel_size`` is given).
    The single parameter is ``kernel`` of shape (k,). Sows the (N, 1, 1, C) gate as
    ``intermediates/attention``. ECA's options, parameter and sown map; only the padding differs.
    """

    def channel_conv(self, z: jax.Array, kernel: jax.Array) -> jax.Array:
        """The 1-D conv across channels: :func:`circular_channel_conv`, circular 'same' padding."""
        return circular_channel_conv(z, kernel)
