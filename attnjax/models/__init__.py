"""Classification models that host the attention blocks, behind one registry.

    from attnjax import models
    net = models.create("attention_net", num_classes=10, block="seed")
    net = models.create("cifar_resnet18", num_classes=10, block="se", stem="imagenet")
    net = models.create("seresnet50", num_classes=10)  # timm's seresnet50, its SE included

Every model maps NHWC images to logits and is called as ``model.apply(variables, x, train=...)``.
timm's ResNets (:mod:`attnjax.models.resnet`), SK-ResNets (:mod:`attnjax.models.sknet`) and ResNeSts
(:mod:`attnjax.models.resnest`) are registered under timm's names; their weights convert
from and to timm's state dicts with :mod:`attnjax.models.timm_weights`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn

from attnjax import blocks
from attnjax.models.attention_net import AttentionNet
from attnjax.models.cifar_resnet import CifarBasicBlock, CifarResNet, CifarResNet18, CifarResNet34
from attnjax.models.resnest import TIMM_RESNESTS, ResNestBottleneck
from attnjax.models.resnet import BasicBlock, Bottleneck, ResNet
from attnjax.models.sknet import TIMM_SKNETS, SelectiveKernelBasic, SelectiveKernelBottleneck
from attnjax.models.timm_resnets import TIMM_RESNETS, attention_spec
from attnjax.validate import InputError

_REGISTRY: dict[str, type[nn.Module]] = {
    "attention_net": AttentionNet,
    "cifar_resnet18": CifarResNet18,
    "cifar_resnet34": CifarResNet34,
    **TIMM_RESNETS,  # timm's names: resnet18 ... ecaresnet101d
    **TIMM_SKNETS,  # skresnet18, skresnet34, skresnext50_32x4d
    **TIMM_RESNESTS,  # resnest14d, resnest26d, resnest50d
}

# timm's networks, by timm's name: the ones whose weights convert (attnjax.models.timm_weights).
TIMM_NETWORKS: dict[str, type[ResNet]] = {**TIMM_RESNETS, **TIMM_SKNETS, **TIMM_RESNESTS}

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


def default_block(name: str) -> tuple[str, dict] | None:
    """The attention that model ``name``'s own definition puts at its sites, as ``(block name, options)``.

    timm's networks define theirs: ``("se", {"rd_ratio": 0.0625, "rd_divisor": 8})`` in ``seresnet*`` and
    ``seresnext*`` (timm's SE widths), ``("eca", {"min_kernel_size": 3})`` in ``ecaresnet*`` (timm's ECA),
    ``("none", {})`` in the plain ``resnet*``/``resnext*`` and in ``skresnet*``/``skresnext*``/``resnest*``,
    whose attention (SelectiveKernel, split attention) is inside their residual blocks' convs, not a separate
    block (a ``block`` given to them is built at the usual site after the last norm). ``None`` for attnjax's own models
    (``attention_net``, ``cifar_resnet*``) and unknown names: they leave the choice to their caller
    (:func:`create` then builds the baseline; the trainer's default is ``seed``).
    """
    cls = _REGISTRY.get(name)
    if cls is None or not getattr(cls, "NETWORK_DEFINES_BLOCK", False):
        return None
    return attention_spec(cls.__dataclass_fields__["block"].default)


def create(
    name: str,
    *,
    num_classes: int,
    block: str | Callable[..., nn.Module] | nn.Module | None = None,
    block_options: dict | None = None,
    **options,
) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs and an attention ``block`` at each of its sites.

    ``block`` is a registered block name (with ``block_options``), ``"none"`` for the baseline, a
    block class or ``functools.partial`` (a factory: the host builds one block per site, passing its
    ``name`` and its ``dtype``), or a built module (copied per site). ``None`` (the default) is the
    model's own (:func:`default_block`): timm's SE or ECA in timm's SE/ECA networks, with
    ``block_options`` applied over timm's; the baseline in every other model.
    ``options`` are the model's own (``stem``, ``zero_init_residual``, ...), checked against its fields.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown model {name!r}; valid names: {', '.join(names())}") from None
    check_model_options(name, options)
    if block is None:
        own = default_block(name)
        if own is None or own[0] == NO_BLOCK:
            if block_options:
                raise InputError(f"block_options {block_options} need an attention block: {name!r} has none of its own")
            block = NO_BLOCK
        else:
            block, block_options = own[0], {**own[1], **(block_options or {})}
    if isinstance(block, str):
        if block == NO_BLOCK:
            if block_options:
                raise InputError(f"block_options {block_options} need an attention block, not {NO_BLOCK!r}")
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
        _refuse_an_option_of_the_renamed_model(name, unknown)
        raise InputError(f"model {name!r} has no option {', '.join(unknown)}; its options: {listed}")


def _refuse_an_option_of_the_renamed_model(name: str, unknown) -> None:
    """Options unknown to ``name`` but known to the model it named before (``RENAMED``): say so, and the new name."""
    renamed = RENAMED.get(name)
    if renamed and unknown and not set(unknown) - set(model_options(renamed)):
        raise InputError(
            f"model {name!r} (timm's network) has no option {', '.join(sorted(unknown))}: attnjax's CIFAR ResNet, which "
            f"has it, was named {name!r} until timm's networks were added and is now {renamed!r}: pass --model {renamed}"
        )


def parse_model_options(name: str, pairs) -> dict:
    """Model ``name``'s options from ``key=value`` strings, typed by their defaults."""
    keys = [str(pair).split("=", 1)[0].strip() for pair in pairs]
    _refuse_an_option_of_the_renamed_model(name, set(keys) - set(model_options(name)) - {"dtype", "axis_name"})
    return blocks.parse_key_values(pairs, model_options(name), f"model {name!r}")


__all__ = [
    "NO_BLOCK",
    "REGISTRY_VERSION",
    "RENAMED",
    "TIMM_NETWORKS",
    "AttentionNet",
    "BasicBlock",
    "Bottleneck",
    "CifarBasicBlock",
    "CifarResNet",
    "CifarResNet18",
    "CifarResNet34",
    "ResNestBottleneck",
    "ResNet",
    "SelectiveKernelBasic",
    "SelectiveKernelBottleneck",
    "block_names",
    "check_model_options",
    "create",
    "default_block",
    "model_options",
    "names",
    "parse_model_options",
]
