"""timm's ResNeSts (timm 1.0.29, ``timm/models/resnest.py``) in Flax, NHWC, layer for layer: ``resnest14d``,
``resnest26d``, ``resnest50d``, with timm's weights (:mod:`attnjax.models.timm_weights`).

Paper: Hang Zhang, Chongruo Wu, Zhongyue Zhang, Yi Zhu, Haibin Lin, Zhi Zhang, Yue Sun, Tong He, Jonas Mueller,
R. Manmatha, Mu Li and Alexander Smola (2022), "ResNeSt: Split-Attention Networks", CVPR Workshops (arXiv
2004.08955). The networks are timm's :class:`attnjax.models.resnet.ResNet` (here the deep stem 32-32-64 and the
average-pool shortcut: ResNet-D) with timm's ``ResNestBottleneck``, whose 3x3 conv is timm's ``SplitAttn``
(attnjax's :class:`attnjax.blocks.SplitAttention` with timm's options: ``attnjax/blocks/splat.py`` has its
math, its deviations and its parameters)::

    Splat(x) = sum_r a_r * U_r,   U_1 .. U_R = split(relu(bn0(conv3x3(x))))   R*K groups, width -> R*width
               a = r-softmax(fc2(relu(bn1(fc1(GAP(sum_r U_r))))))             (sigmoid when R = 1)
               fc1's width d = make_divisible(width * R * rd_ratio, 8, min_value=32), rd_ratio 0.25

The residual block, :class:`ResNestBottleneck` (timm's names, which are the parameter names here and in the
weights, in brackets; expansion 4)::

    width = int(planes * base_width / 64) * cardinality
    y = relu(bn1(conv1x1(x)))                       [conv1, bn1]
    y = avgpool3x3/s(y)  if avd and avd_first       (no parameters; timm's avd_first)
    y = Splat(y)         if radix >= 1              [conv2: conv, bn0, fc1, bn1, fc2]; stride s unless avd
      = relu(bn2(conv3x3/s(y, groups=cardinality))) if radix == 0   [conv2, bn2]
    y = avgpool3x3/s(y)  if avd and not avd_first   (timm's avd_last)
    y = bn3(conv1x1(y))                             [conv3, bn3], out width 4 * planes
    then, as every attnjax ResNet block (ResidualBlock.finish): the attention ``block``, stochastic depth,
    out = relu(y + shortcut(x)), the shortcut timm's ``downsample``: avgpool2x2/s (ceil mode, padding not
    counted; identity where s = 1) + conv1x1 + bn [downsample.1, downsample.2]

avd ("average downsampling", the paper's strided 3x3 average pool in place of the strided conv): in a block
with stride s > 1 the split-attention conv runs at stride 1 and ``AvgPool2d(3, s, padding=1)`` (torch's
default ``count_include_pad=True``: every window divides by 9, the zero padding counted) downsamples, after
it (``avd_first=False``, timm's ResNeSts) or before it. timm's ``is_first`` (avd in stride-1 blocks too) is
never set by timm's ResNet, and is not offered.

The networks, as timm's ``@register_model`` functions build them (``stem_type='deep', stem_width=32,
avg_down=True``, radix 2, cardinality 1, base width 64, avd after the conv, ``zero_init_last`` True)::

    resnest14d   (1, 1, 1, 1)      resnest26d   (2, 2, 2, 2)      resnest50d   (3, 4, 6, 3)

``SplitAttn(width, width, 3, stride=1, padding=1, groups=cardinality, radix=2, norm_layer=BatchNorm2d)`` is
attnjax's ``SplitAttention(out_channels=width, radix=2, cardinality=1, stride=1, padding=1, fc1_bias=True,
rd_ratio=0.25)``.

These networks have no separate attention block: the attention is inside the residual block's conv, so
``models.default_block`` reports ``("none", {})``.

Deviations from timm:

- an attnjax ``block`` given to these networks (``--block X``) is built at the usual site after ``bn3``, as
  in the other ResNets (named ``block``; its weights convert as timm's ``se``); timm's ``ResNestBottleneck``
  refuses ``attn_layer``.
- stochastic depth (``drop_path_rate``) drops the residual branch, as in every other ResNet block (and the
  paper's and timm's ResNet). timm 1.0.29's ``ResNestBottleneck.forward`` applies its ``drop_path`` to the
  block's *input* ``x`` instead, which only reaches the output through the downsample shortcut: in timm it
  drops the shortcut of the first block of a stage and does nothing elsewhere. Evaluation, and training
  with ``drop_path_rate=0`` (timm's default), are unaffected.
- initialisation: the block's own convs and norms initialise as :mod:`attnjax.models.resnet`'s (timm's
  rule); the split-attention conv and fc1/fc2 keep the block's Flax initialisation (LeCun normal, zero
  biases) where timm re-initialises every ``Conv2d`` weight Kaiming-normal fan-out (and keeps torch's
  default biases). Converted weights give timm's outputs.
- ``reduce_first`` must be 1 (timm asserts it); dilation, DropBlock and ``aa_layer`` are not offered.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax

from attnjax.blocks.splat import SplitAttention
from attnjax.models.resnet import RESIDUAL_BLOCKS, ResidualBlock, ResNet, conv
from attnjax.validate import InputError

SPLAT_RD_RATIO = 0.25  # timm's SplitAttn default, which its ResNestBottleneck keeps


def avd_pool(x: jax.Array, strides: int) -> jax.Array:
    """torch's ``AvgPool2d(3, strides, padding=1)`` on NHWC: the zero padding counted (every window / 9)."""
    return nn.avg_pool(x, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)), count_include_pad=True)


class ResNestBottleneck(ResidualBlock):
    """timm's ``ResNestBottleneck``: 1x1 conv, split-attention 3x3 conv (radix ``radix``, ``cardinality``
    groups), the avd average pool where strided, 1x1 conv; ``expansion`` 4. ``radix``, ``avd``, ``avd_first``
    are timm's ``block_args`` (defaults: its ResNeSts')."""

    radix: int = 2
    avd: bool = True
    avd_first: bool = False

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        who = type(self).__name__
        if self.reduce_first != 1:
            raise InputError(
                f"{who}: block_reduce_first must be 1 (timm's ResNestBottleneck asserts it), got {self.reduce_first}"
            )
        if self.radix < 0:
            raise InputError(f"{who}: radix must be >= 0 (0: a plain 3x3 conv), got {self.radix}")
        width = int(self.planes * (self.base_width / 64)) * self.cardinality
        avd_strides = self.strides if self.avd and self.strides > 1 else 0
        strides = 1 if avd_strides else self.strides

        y = conv(width, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(self.norm(train, "bn1")(y))
        if avd_strides and self.avd_first:
            y = avd_pool(y, avd_strides)
        if self.radix >= 1:
            y = SplitAttention(
                radix=self.radix,
                cardinality=self.cardinality,
                out_channels=width,
                stride=strides,
                padding=1,
                fc1_bias=True,
                rd_ratio=SPLAT_RD_RATIO,
                dtype=self.dtype,
                axis_name=self.axis_name,
                name="conv2",
            )(y, train)
        else:
            y = conv(width, 3, strides, groups=self.cardinality, dtype=self.dtype, name="conv2")(y)
            y = nn.relu(self.norm(train, "bn2")(y))
        if avd_strides and not self.avd_first:
            y = avd_pool(y, avd_strides)
        y = conv(self.planes * self.expansion, 1, dtype=self.dtype, name="conv3")(y)
        y = self.norm(train, "bn3", last=True)(y)
        return self.finish(y, x, train)


RESIDUAL_BLOCKS["resnest_bottleneck"] = ResNestBottleneck


class ResNeSt14D(ResNet):
    """timm's ``resnest14d``: ResNestBottleneck (1, 1, 1, 1), radix 2, avd; deep stem (32, 32, 64); average-pool
    shortcuts."""

    layers: tuple[int, ...] = (1, 1, 1, 1)
    residual_block: Any = ResNestBottleneck
    stem_width: int = 32
    stem_type: str = "deep"
    avg_down: bool = True


class ResNeSt26D(ResNeSt14D):
    """timm's ``resnest26d``: as ``resnest14d`` with (2, 2, 2, 2) blocks."""

    layers: tuple[int, ...] = (2, 2, 2, 2)


class ResNeSt50D(ResNeSt14D):
    """timm's ``resnest50d`` (the paper's ResNeSt-50): as ``resnest14d`` with (3, 4, 6, 3) blocks."""

    layers: tuple[int, ...] = (3, 4, 6, 3)


TIMM_RESNESTS: dict[str, type[ResNet]] = {
    "resnest14d": ResNeSt14D,
    "resnest26d": ResNeSt26D,
    "resnest50d": ResNeSt50D,
}
