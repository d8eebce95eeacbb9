"""timm's Selective Kernel ResNets (timm 1.0.29, ``timm/models/sknet.py``) in Flax, NHWC, layer for layer:
``skresnet18``, ``skresnet34``, ``skresnext50_32x4d``, with timm's weights (:mod:`attnjax.models.timm_weights`).

Paper: Xiang Li, Wenhai Wang, Xiaolin Hu and Jian Yang (2019), "Selective Kernel Networks", CVPR. The
networks are timm's :class:`attnjax.models.resnet.ResNet` (stem, stages, head) with a residual block whose
3x3 conv is timm's ``SelectiveKernel`` (attnjax's :class:`attnjax.blocks.SelectiveKernelAttention` with
timm's options: ``attnjax/blocks/sk.py`` has its math, its deviations and its parameters)::

    SK(x) = sum_m a_m * U_m,  U_m = relu(bn(conv3x3_m(x_m)))   M = 2 branches: dilation 1 and 2 (timm's 3x3
                                                               and 5x5 with keep_3x3); x_m = x, or with
                                                               split_input the m-th half of x's channels
            a = softmax_m(fc_select(relu(bn(fc_reduce(GAP(sum_m U_m))))))
            hidden width d = make_divisible(C_out * rd_ratio, rd_divisor)

The residual blocks (timm's names in brackets, which are the parameter names here and in the weights)::

    SelectiveKernelBasic (expansion 1)        [conv1 = SelectiveKernel: paths.{0,1}.{conv,bn}, attn.{fc_reduce,
        y = SK/s(x)                              bn, fc_select}; conv2 = ConvNormAct: conv, bn]
        y = bn(conv3x3(y))                    out width planes; no ReLU after conv2
    SelectiveKernelBottleneck (expansion 4)   [conv1, conv3: ConvNormAct (conv, bn); conv2: SelectiveKernel]
        y = relu(bn(conv1x1(x)))              width = floor(planes * base_width / 64) * cardinality
        y = SK/s(y, groups=cardinality)       width -> width, the stride here
        y = bn(conv1x1(y))                    out width 4 * planes
    then, as every attnjax ResNet block (ResidualBlock.finish): the attention ``block`` (timm's ``se``),
        stochastic depth, out = relu(y + shortcut(x))

The networks, as timm's ``@register_model`` functions build them (all with ``zero_init_last=False``, the 7x7
stem and the conv shortcut)::

    skresnet18          SelectiveKernelBasic (2, 2, 2, 2)   SK(planes, groups=1, rd_ratio=1/8, rd_divisor=16,
    skresnet34          SelectiveKernelBasic (3, 4, 6, 3)      split_input=True)   in place of conv1
    skresnext50_32x4d   SelectiveKernelBottleneck (3, 4, 6, 3), cardinality 32, base width 4:
                        SK(width, groups=32, rd_ratio=1/16, rd_divisor=32, split_input=False) in place of conv2

(timm's docstrings: its SK-ResNet-18/34 split the input channels across the branches to keep the parameter
count down, unlike the paper's SKNet; its ``skresnext50_32x4d`` is the paper's SKNet-50.)

These networks have no separate attention block: the attention is inside the residual block's conv, so
``models.default_block`` reports ``("none", {})``; an attnjax ``block`` given to them (``--block X``) is built
at the usual site after the last batch norm of every residual block, as in the other ResNets (timm's
``attn_layer``, whose weights are timm's ``se``).

Deviations from timm:

- initialisation: the residual blocks' own convs and norms initialise as :mod:`attnjax.models.resnet`'s
  (timm's rule); the SelectiveKernel's convs keep the block's Flax initialisation (LeCun normal) where timm
  re-initialises every ``Conv2d`` Kaiming-normal fan-out. The parameters differ at init, not what they
  compute; converted weights give timm's outputs.
- not offered, as in :mod:`attnjax.models.resnet`: dilation (``output_stride``), ``aa_layer``, DropBlock,
  other activations and norms; timm's unregistered-weight variants ``skresnet50``/``skresnet50d`` are not
  registered here (``--model-option residual_block=sk_bottleneck`` on ``resnet50``/``resnet50d`` builds them).
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax

from attnjax.blocks.sk import SelectiveKernelAttention
from attnjax.layers import BATCH_AXIS, batch_norm
from attnjax.models.resnet import RESIDUAL_BLOCKS, ResidualBlock, ResNet, conv
from attnjax.validate import InputError

# timm's SelectiveKernel defaults (its sk_kwargs when a network gives none)
SK_RD_RATIO = 1 / 16
SK_RD_DIVISOR = 8


class ConvNormAct(nn.Module):
    """timm's ``ConvNormAct``: a bias-free k x k conv (timm's padding and init) named ``conv``, a batch norm
    named ``bn`` (timm's ``BatchNormAct2d``), then ReLU unless ``act`` is False. ``zero_scale`` starts the
    norm's scale at 0 (``zero_init_last``)."""

    features: int
    kernel: int = 1
    strides: int = 1
    act: bool = True
    zero_scale: bool = False
    dtype: Any = None
    axis_name: str | None = BATCH_AXIS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = conv(self.features, self.kernel, self.strides, dtype=self.dtype, name="conv")(x)
        scale_init = nn.initializers.zeros if self.zero_scale else nn.initializers.ones
        y = batch_norm(train, axis_name=self.axis_name, dtype=self.dtype, scale_init=scale_init, name="bn")(y)
        return nn.relu(y) if self.act else y


class _SelectiveKernelBlock(ResidualBlock):
    """The fields the SK residual blocks share: timm's ``sk_kwargs`` (``rd_ratio``, ``rd_divisor``,
    ``split_input``; timm's ``SelectiveKernel`` defaults)."""

    rd_ratio: float = SK_RD_RATIO
    rd_divisor: int = SK_RD_DIVISOR
    split_input: bool = True

    def selective_kernel(self, features: int, groups: int, name: str) -> SelectiveKernelAttention:
        """timm's ``SelectiveKernel(in, features, stride, groups, **sk_kwargs)`` with its ReLU/BatchNorm."""
        return SelectiveKernelAttention(
            out_channels=features,
            stride=self.strides,
            groups=groups,
            rd_ratio=self.rd_ratio,
            rd_divisor=self.rd_divisor,
            split_input=self.split_input,
            dtype=self.dtype,
            axis_name=self.axis_name,
            name=name,
        )

    def conv_norm_act(self, features: int, kernel: int, name: str, *, act: bool = True, last: bool = False):
        return ConvNormAct(
            features,
            kernel,
            act=act,
            zero_scale=last and self.zero_init_last,
            dtype=self.dtype,
            axis_name=self.axis_name,
            name=name,
        )


class SelectiveKernelBasic(_SelectiveKernelBlock):
    """timm's ``SelectiveKernelBasic``: SelectiveKernel (stride here) as ``conv1``, a 3x3 ConvNormAct without
    ReLU as ``conv2``; ``expansion`` 1; no cardinality or base width (timm asserts the same)."""

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.cardinality != 1 or self.base_width != 64:
            raise InputError(
                f"{type(self).__name__} has no groups: cardinality must be 1 and base_width 64 (timm's rule), got "
                f"{self.cardinality} and {self.base_width}; use residual_block='sk_bottleneck' for SK-ResNeXt"
            )
        first = self.planes // self.reduce_first
        y = self.selective_kernel(first, 1, "conv1")(x, train)
        y = self.conv_norm_act(self.planes * self.expansion, 3, "conv2", act=False, last=True)(y, train)
        return self.finish(y, x, train)


class SelectiveKernelBottleneck(_SelectiveKernelBlock):
    """timm's ``SelectiveKernelBottleneck``: 1x1 ConvNormAct ``conv1``, SelectiveKernel ``conv2`` (stride and
    ``cardinality`` groups here), 1x1 ConvNormAct without ReLU ``conv3``; ``expansion`` 4."""

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = int(math.floor(self.planes * (self.base_width / 64)) * self.cardinality)
        first = width // self.reduce_first
        y = self.conv_norm_act(first, 1, "conv1")(x, train)
        y = self.selective_kernel(width, self.cardinality, "conv2")(y, train)
        y = self.conv_norm_act(self.planes * self.expansion, 1, "conv3", act=False, last=True)(y, train)
        return self.finish(y, x, train)


RESIDUAL_BLOCKS["sk_basic"] = SelectiveKernelBasic
RESIDUAL_BLOCKS["sk_bottleneck"] = SelectiveKernelBottleneck

# timm's sk_kwargs of its named networks
SK_RESNET_KWARGS = {"rd_ratio": 1 / 8, "rd_divisor": 16, "split_input": True}
SK_RESNEXT_KWARGS = {"rd_ratio": 1 / 16, "rd_divisor": 32, "split_input": False}


class SKResNet18(ResNet):
    """timm's ``skresnet18``: SelectiveKernelBasic (2, 2, 2, 2), SK with ``rd_ratio=1/8, rd_divisor=16``, split
    input; 7x7 stem; ``zero_init_last=False``."""

    layers: tuple[int, ...] = (2, 2, 2, 2)
    residual_block: Any = functools.partial(SelectiveKernelBasic, **SK_RESNET_KWARGS)
    zero_init_last: bool = False


class SKResNet34(SKResNet18):
    """timm's ``skresnet34``: SelectiveKernelBasic (3, 4, 6, 3), otherwise as ``skresnet18``."""

    layers: tuple[int, ...] = (3, 4, 6, 3)


class SKResNeXt50_32x4d(ResNet):
    """timm's ``skresnext50_32x4d`` (the paper's SKNet-50): SelectiveKernelBottleneck (3, 4, 6, 3), 32 groups of
    width 4, SK with ``rd_ratio=1/16, rd_divisor=32``, unsplit input; 7x7 stem; ``zero_init_last=False``."""

    layers: tuple[int, ...] = (3, 4, 6, 3)
    residual_block: Any = functools.partial(SelectiveKernelBottleneck, **SK_RESNEXT_KWARGS)
    cardinality: int = 32
    base_width: int = 4
    zero_init_last: bool = False


TIMM_SKNETS: dict[str, type[ResNet]] = {
    "skresnet18": SKResNet18,
    "skresnet34": SKResNet34,
    "skresnext50_32x4d": SKResNeXt50_32x4d,
}
