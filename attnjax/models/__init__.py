"""Classification models that host the attention blocks, behind one registry.

    from attnjax import models
    net = models.create("attention_net", num_classes=10, block="seed")
    net = models.create("cifar_resnet18", num_classes=10, block="se", stem="imagenet")

Every model maps NHWC images to logits and is called as ``model.apply(variables, x, train=...)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn

from attnjax import blocks
from attnjax.models.attention_net import AttentionNet
from attnjax.models.cifar_resnet import CifarBasicBlock, CifarResNet, CifarResNet18, CifarResNet34
from attnjax.validate import InputError

_REGISTRY: dict[str, type[nn.Module]] = {
    "attention_net": AttentionNet,
    "cifar_resnet18": CifarResNet18,
    "cifar_resnet34": CifarResNet34,
}

# Names that runs recorded before timm's networks were registered under them (config.json and
# checkpoints without a "registry" version): what they mean now.
RENAMED = {"resnet18": "cifar_resnet18", "resnet34": "cifar_resnet34"}
REGISTRY_VERSION = 2  # recorded with every run's config; 1 (absent) means the names before RENAMED

NO_BLOCK = "none"  # the name that selects the baseline without attention


def names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def block_names() -> list[str]:
    """Every value the ``block`` argument of :func:`create` accepts."""
    return [NO_BLOCK, *blocks.names()]


def create(
    name: str,
    *,
    num_classes: int,
    block: str | Callable[..., nn.Module] | nn.Module | None = None,
    block_options: dict | None = None,
    **options,
) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs and an attention ``block`` at each of its sites.

    ``block`` is a registered block name (with ``block_options``), ``"none"``/``None`` for the
    baseline, a block class or ``functools.partial`` (a factory: the host builds one block per
    site, passing its ``name`` and its ``dtype``), or a built module (copied per site).
    ``options`` are the model's own (``stem``, ``zero_init_residual``, ...), checked against its fields.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown model {name!r}; valid names: {', '.join(names())}") from None
    check_model_options(name, options)
    if isinstance(block, str):
        if block == NO_BLOCK:
            block = None
        elif block not in blocks.names():
            raise InputError(f"unknown attention block {block!r}; valid names: {', '.join(block_names())}")
        else:
            block = blocks.factory(block, **(block_options or {}))
    elif block_options:
        block = functools.partial(block, **block_options)
    return cls(num_classes=num_classes, block=block, **options)


# Set by create itself or by the training loop, not model options.
_NOT_MODEL_OPTIONS = {"parent", "name", "num_classes", "block", "dtype", "axis_name"}


def model_options(name: str) -> dict[str, object]:
    """The options of model ``name`` and their defaults."""
    return {
        f.name: f.default
        for f in dataclasses.fields(_REGISTRY[name])
        if f.init and f.name not in _NOT_MODEL_OPTIONS and f.default is not dataclasses.MISSING
    }


def check_model_options(name: str, given: dict) -> None:
    valid = model_options(name)
    unknown = sorted(set(given) - set(valid) - {"dtype", "axis_name"})
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        raise InputError(f"model {name!r} has no option {', '.join(unknown)}; its options: {listed}")


def parse_model_options(name: str, pairs) -> dict:
    """Model ``name``'s options from ``key=value`` strings, typed by their defaults."""
    return blocks.parse_key_values(pairs, model_options(name), f"model {name!r}")


__all__ = [
    "NO_BLOCK",
    "REGISTRY_VERSION",
    "RENAMED",
    "AttentionNet",
    "CifarBasicBlock",
    "CifarResNet",
    "CifarResNet18",
    "CifarResNet34",
    "block_names",
    "check_model_options",
    "create",
    "model_options",
    "names",
    "parse_model_options",
]
