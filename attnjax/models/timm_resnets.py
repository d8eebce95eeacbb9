"""timm's named ResNets (``resnet18`` ... ``ecaresnet101d``): :class:`attnjax.models.resnet.ResNet` with each
network's depths, stem, shortcut and attention, as timm 1.0.29 defines them in ``timm/models/resnet.py``.

timm's SE and ECA networks set their attention by default (:data:`TIMM_ATTENTION`): ``seresnet*``/``seresnext*``
``se`` with timm's widths, ``ecaresnet*`` ``eca`` with timm's kernel floor. :mod:`attnjax.models` registers
:data:`TIMM_RESNETS` under timm's names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn

from attnjax import blocks
from attnjax.models.resnet import ResidualBlock, ResNet

# The attention of timm's named SE/ECA networks, as attnjax blocks with the options that give timm's
# modules exactly: create_attn('se', C) is SEModule(rd_ratio=1/16, rd_divisor=8, bias, relu, sigmoid),
# create_attn('eca', C) is EcaModule(gamma=2, beta=1, k >= 3, sigmoid).
TIMM_ATTENTION: dict[str, dict[str, Any]] = {
    "se": {"rd_ratio": 1 / 16, "rd_divisor": 8},
    "eca": {"min_kernel_size": 3},
}


def timm_attention(name: str) -> functools.partial:
    """The factory of timm's attention ``name`` (``se``, ``eca``) with timm's options: :data:`TIMM_ATTENTION`."""
    return blocks.factory(name, **TIMM_ATTENTION[name])


class ResNet18(ResNet):
    """timm's ``resnet18``: BasicBlocks (2, 2, 2, 2), 7x7 stem."""

    layers: Sequence[int] = (2, 2, 2, 2)
    residual_block: str | type[ResidualBlock] = "basic"


class ResNet26(ResNet):
    """timm's ``resnet26``: Bottlenecks (2, 2, 2, 2), 7x7 stem."""

    layers: Sequence[int] = (2, 2, 2, 2)


class ResNet34(ResNet):
    """timm's ``resnet34``: BasicBlocks (3, 4, 6, 3), 7x7 stem."""

    layers: Sequence[int] = (3, 4, 6, 3)
    residual_block: str | type[ResidualBlock] = "basic"


class ResNet50(ResNet):
    """timm's ``resnet50``: Bottlenecks (3, 4, 6, 3), 7x7 stem."""


class ResNet101(ResNet):
    """timm's ``resnet101``: Bottlenecks (3, 4, 23, 3), 7x7 stem."""

    layers: Sequence[int] = (3, 4, 23, 3)


class ResNet152(ResNet):
    """timm's ``resnet152``: Bottlenecks (3, 8, 36, 3), 7x7 stem."""

    layers: Sequence[int] = (3, 8, 36, 3)


class ResNet50D(ResNet):
    """timm's ``resnet50d``: ResNet-50 with the deep stem (32, 32, 64) and average-pool shortcuts (ResNet-D)."""

    stem_width: int = 32
    stem_type: str = "deep"
    avg_down: bool = True


class ResNeXt50_32x4d(ResNet):
    """timm's ``resnext50_32x4d``: ResNet-50 with 32 groups of width 4 in the 3x3 convs."""

    cardinality: int = 32
    base_width: int = 4


_SE = timm_attention("se")
_ECA = timm_attention("eca")


class SEResNet18(ResNet18):
    """timm's ``seresnet18``: ResNet-18 with timm's SE in every residual block."""

    block: Callable[..., nn.Module] | nn.Module | None = _SE


class SEResNet34(ResNet34):
    """timm's ``seresnet34``: ResNet-34 with timm's SE in every residual block."""

    block: Callable[..., nn.Module] | nn.Module | None = _SE


class SEResNet50(ResNet50):
    """timm's ``seresnet50``: ResNet-50 with timm's SE in every residual block."""

    block: Callable[..., nn.Module] | nn.Module | None = _SE


class SEResNet101(ResNet101):
    """timm's ``seresnet101``: ResNet-101 with timm's SE in every residual block."""

    block: Callable[..., nn.Module] | nn.Module | None = _SE


class SEResNeXt50_32x4d(ResNeXt50_32x4d):
    """timm's ``seresnext50_32x4d``: ResNeXt-50 32x4d with timm's SE in every residual block."""

    block: Callable[..., nn.Module] | nn.Module | None = _SE


class ECAResNet26T(ResNet26):
    """timm's ``ecaresnet26t``: ResNet-26 with the tiered deep stem (24, 32, 64), average-pool shortcuts, ECA."""

    stem_width: int = 32
    stem_type: str = "deep_tiered"
    avg_down: bool = True
    block: Callable[..., nn.Module] | nn.Module | None = _ECA


class ECAResNet50D(ResNet50D):
    """timm's ``ecaresnet50d``: ResNet-50-D with timm's ECA in every residual block."""

    block: Callable[..., nn.Module] | nn.Module | None = _ECA


class ECAResNet50T(ResNet50):
    """timm's ``ecaresnet50t``: ResNet-50 with the tiered deep stem (24, 32, 64), average-pool shortcuts, ECA."""

    stem_width: int = 32
    stem_type: str = "deep_tiered"
    avg_down: bool = True
    block: Callable[..., nn.Module] | nn.Module | None = _ECA


class ECAResNet101D(ResNet101):
    """timm's ``ecaresnet101d``: ResNet-101 with the deep stem, average-pool shortcuts and timm's ECA."""

    stem_width: int = 32
    stem_type: str = "deep"
    avg_down: bool = True
    block: Callable[..., nn.Module] | nn.Module | None = _ECA


# timm's name -> the class. attnjax.models registers them under these names.
TIMM_RESNETS: dict[str, type[ResNet]] = {
    "resnet18": ResNet18,
    "resnet26": ResNet26,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
    "resnet50d": ResNet50D,
    "resnext50_32x4d": ResNeXt50_32x4d,
    "seresnet18": SEResNet18,
    "seresnet34": SEResNet34,
    "seresnet50": SEResNet50,
    "seresnet101": SEResNet101,
    "seresnext50_32x4d": SEResNeXt50_32x4d,
    "ecaresnet26t": ECAResNet26T,
    "ecaresnet50d": ECAResNet50D,
    "ecaresnet50t": ECAResNet50T,
    "ecaresnet101d": ECAResNet101D,
}


def attention_spec(block) -> tuple[str, dict[str, Any]] | None:
    """``(name, options)`` of a factory of a registered block (``None`` -> ``("none", {})``), else ``None``."""
    if block is None:
        return ("none", {})
    if isinstance(block, functools.partial):
        for name in blocks.names():
            if blocks.factory(name).func is block.func:
                return (name, dict(block.keywords))
    return None
