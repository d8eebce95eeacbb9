"""attnjax's own ResNet-18/34 (He et al. 2016) for small images, an attention block in every residual block.

Registered as ``cifar_resnet18`` and ``cifar_resnet34`` (named ``resnet18``/``resnet34`` before
timm's networks took those names: runs recorded under the old names resume under the new ones,
see :data:`attnjax.models.RENAMED`). Its default stem is CIFAR's; ``stem="imagenet"`` gives the
paper's stem, and then the same parameter count as timm's ``resnet18``/``resnet34``, but this is
not timm's network (its parameter names, its attention site after ``bn2`` for every block, no
ResNet-D options): timm's are :mod:`attnjax.models.resnet`.

Paper: Kaiming He, Xiangyu Zhang, Shaoqing Ren and Jian Sun (2016), "Deep Residual Learning
for Image Recognition", CVPR. Placement of the block: Jie Hu, Li Shen and Gang Sun (2018),
"Squeeze-and-Excitation Networks", CVPR (Fig. 3, SE-ResNet module).

Each residual block (CifarBasicBlock) computes::

    y = relu(bn1(conv3x3(x, stride)))
    y = bn2(conv3x3(y))
    y = block(y)                        the attention block; skipped for the baseline
    out = relu(y + shortcut(x))         shortcut: identity, or conv1x1(stride) + bn on a shape change

Stages of [2, 2, 2, 2] (ResNet-18) or [3, 4, 6, 3] (ResNet-34) residual blocks, widths
64/128/256/512, the first block of stages 2-4 with stride 2. Then global average pool and a
dense layer to the logits.

Options and choices:

- ``stage_sizes``: residual blocks per stage, 1 to 4 stages (CifarResNet18/CifarResNet34 fix it; the plain
  ``CifarResNet`` accepts e.g. ``(1, 1)`` for a small, quick network).
- ``stem="cifar"`` (default): a 3x3 stride-1 conv, no max pool, for small images (32x32 CIFAR,
  the 8x8 digits). ``stem="imagenet"``: the paper's 7x7 stride-2 conv and 3x3 stride-2 max pool.
- ``zero_init_residual`` (default False, as torchvision): start each bn2 scale at 0, so every
  residual block begins as the identity (Goyal et al. 2017). With it the attention block sees an
  all-zero input at initialisation, so its own parameters get no gradient on the first step.
- ``block`` is a factory (``attnjax.blocks.factory``): every residual block builds its own, with its own parameters
  (``params/layer{stage}_{index}/block``) and its own sown maps.
- Padding as torchvision: 3x3 convs pad 1 on each side (Flax's "SAME" pads stride-2 convs on the
  bottom/right only), so the same weights give the same outputs.
- Convolutions before a batch norm have no bias (the norm's offset replaces it); batch norm is
  :func:`attnjax.layers.batch_norm`, synchronised across devices under attnjax's ``pmap``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import blocks
from attnjax.layers import BATCH_AXIS, batch_norm
from attnjax.validate import InputError, check_channels, check_nhwc

STEMS = ("cifar", "imagenet")
WIDTHS = (64, 128, 256, 512)
PAD_1 = ((1, 1), (1, 1))


class CifarBasicBlock(nn.Module):
    """Two 3x3 convs with batch norm, the attention ``block`` after the second norm, then the residual add."""

    features: int
    strides: int = 1
    block: Callable[..., nn.Module] | nn.Module | None = None  # a factory (see attnjax.blocks.factory) or a module
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    axis_name: str | None = BATCH_AXIS  # batch-norm synchronisation axis, passed on to the block

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = dict(use_bias=False, dtype=self.dtype)
        y = nn.Conv(self.features, (3, 3), self.strides, padding=PAD_1, name="conv1", **conv)(x)
        y = nn.relu(batch_norm(train, axis_name=self.axis_name, dtype=self.dtype, name="bn1")(y))
        y = nn.Conv(self.features, (3, 3), padding=PAD_1, name="conv2", **conv)(y)
        scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = batch_norm(train, axis_name=self.axis_name, dtype=self.dtype, scale_init=scale_init, name="bn2")(y)
        block = blocks.build(self.block, name="block", dtype=self.dtype, axis_name=self.axis_name)
        if block is not None:
            y = block(y, train=train)

        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = nn.Conv(self.features, (1, 1), self.strides, padding="VALID", name="downsample_conv", **conv)(x)
            shortcut = batch_norm(train, axis_name=self.axis_name, dtype=self.dtype, name="downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
    """A ResNet with BasicBlocks and a pluggable attention block in each (``None`` for the baseline).

    Takes NHWC images with any number of channels and any size; returns logits of shape
    (batch, num_classes). ``train`` selects batch statistics in the batch norms (and the block's).
    """

    num_classes: int = 10
    block: Callable[..., nn.Module] | nn.Module | None = None  # a factory, built once per residual block
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    stem: str = "cifar"
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    axis_name: str | None = BATCH_AXIS  # batch-norm synchronisation axis (Flax's): the step's caller maps over it

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        who = type(self).__name__
        check_nhwc(x, who)
        if self.stem not in STEMS:
            raise InputError(f"{who}: unknown stem {self.stem!r}; valid stems: {', '.join(STEMS)}")
        if not 1 <= len(self.stage_sizes) <= len(WIDTHS) or min(self.stage_sizes) < 1:
            raise InputError(f"{who}: stage_sizes must be 1 to 4 positive block counts, got {tuple(self.stage_sizes)}")
        if not self.is_initializing() and "conv1" in self.variables.get("params", {}):
            check_channels(x, self.variables["params"]["conv1"]["kernel"].shape[-2], who)

        x = x.astype(self.dtype)
        if self.stem == "cifar":
            x = nn.Conv(64, (3, 3), padding=PAD_1, use_bias=False, dtype=self.dtype, name="conv1")(x)
        else:
            x = nn.Conv(64, (7, 7), 2, padding=((3, 3), (3, 3)), use_bias=False, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(batch_norm(train, axis_name=self.axis_name, dtype=self.dtype, name="bn1")(x))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=PAD_1)

        for stage, (size, width) in enumerate(
            zip(self.stage_sizes, WIDTHS[: len(self.stage_sizes)], strict=True), start=1
        ):
            for index in range(size):
                x = CifarBasicBlock(
                    width,
                    strides=2 if stage > 1 and index == 0 else 1,
                    # Each CifarBasicBlock builds its own block from the factory, with its own parameters; a
                    # built module is copied (unbound) for each, as passing it would share one set.
                    block=self.block.copy(parent=None) if isinstance(self.block, nn.Module) else self.block,
                    zero_init_residual=self.zero_init_residual,
                    dtype=self.dtype,
                    axis_name=self.axis_name,
                    name=f"layer{stage}_{index}",
                )(x, train=train)

        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))  # the loss wants >= fp32 logits


class CifarResNet18(CifarResNet):
    """ResNet-18: stages of [2, 2, 2, 2] BasicBlocks."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)


class CifarResNet34(CifarResNet):
    """ResNet-34: stages of [3, 4, 6, 3] BasicBlocks."""

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
