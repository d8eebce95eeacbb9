"""Classification models that host the attention blocks, behind one registry.

    from attnjax import models
    net = models.create("attention_net", num_classes=10, block="seed")
    net = models.create("resnet18", num_classes=10, block="se", stem="imagenet")

Every model maps NHWC images to logits and is called as ``model.apply(variables, x, train=...)``.
"""

from __future__ import annotations

import flax.linen as nn

from attnjax import blocks
from attnjax.models.attention_net import AttentionNet
from attnjax.models.resnet import BasicBlock, ResNet, ResNet18, ResNet34
from attnjax.validate import InputError

_REGISTRY: dict[str, type[nn.Module]] = {
    "attention_net": AttentionNet,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
}

NO_BLOCK = "none"  # the name that selects the baseline without attention


def names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def block_names() -> list[str]:
    """Every value the ``block`` argument of :func:`create` accepts."""
    return [NO_BLOCK, *blocks.names()]


def create(name: str, *, num_classes: int, block: str | nn.Module | None = None, **options) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs and an attention ``block``.

    ``block`` is a registered block name, ``"none"``/``None`` for the baseline, or a module.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown model {name!r}; valid names: {', '.join(names())}") from None
    if isinstance(block, str):
        block = None if block == NO_BLOCK else _create_block(block)
    return cls(num_classes=num_classes, block=block, **options)


def _create_block(name: str) -> nn.Module:
    if name not in blocks.names():
        raise InputError(f"unknown attention block {name!r}; valid names: {', '.join(block_names())}")
    return blocks.create(name)


__all__ = [
    "AttentionNet",
    "BasicBlock",
    "NO_BLOCK",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "block_names",
    "create",
    "names",
]
