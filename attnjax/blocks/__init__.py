"""Attention blocks for NHWC feature maps, behind one registry.

    from attnjax import blocks
    blocks.names()                       # ['bam', 'cbam', 'coord', 'eca', ...]
    block = blocks.create("seed", reduction=4)
    y = block.apply(block.init(key, x), x)   # same shape as x

Every block is called as ``block(x, train=False)`` on NHWC ``x``: it takes its channel
count from the input, returns the input's shape, and sows its attention map(s) under the
``intermediates`` collection. ``train`` selects batch statistics in blocks with batch norm.

Precision: with a low-precision ``dtype`` every softmax of attention logits is computed in float32 and every
sown map is float32 (``primitives/precision.py``: ``softmax_in_float32``, ``sow_map``); the weights are cast
to the compute dtype for the product with the values.

Hosts (the models) take a block *factory*, not a built block: ``blocks.factory("cbam",
reduction=8)`` is a ``functools.partial`` of the class with checked options, and the host
calls it once per site (with its own ``name`` and ``dtype``). ``blocks.options("cbam")`` lists
a block's options and defaults; ``blocks.parse_options("cbam", ["reduction=8"])`` reads them
from ``key=value`` text, as ``--block-option`` gives them.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn

from attnjax.blocks.axial import AxialAttention
from attnjax.blocks.bam import BAM
from attnjax.blocks.bat import BilinearAttentionalTransform
from attnjax.blocks.bottleneck import BottleneckAttention
from attnjax.blocks.cbam import CBAM
from attnjax.blocks.ceca import CircularEfficientChannelAttention
from attnjax.blocks.coord import CoordinateAttention
from attnjax.blocks.criss_cross import CrissCrossAttention
from attnjax.blocks.danet import DualAttention
from attnjax.blocks.eca import EfficientChannelAttention
from attnjax.blocks.ecam import EfficientChannelAttentionMLP
from attnjax.blocks.ela import EfficientLocalAttention
from attnjax.blocks.ese import EffectiveSqueezeExcitation
from attnjax.blocks.external import ExternalAttention
from attnjax.blocks.gc import GlobalContext
from attnjax.blocks.gca import GlobalContextGate
from attnjax.blocks.ge import GatherExcite
from attnjax.blocks.halo import HaloAttention
from attnjax.blocks.lambda_layer import LambdaLayer
from attnjax.blocks.lcbam import LightCBAM
from attnjax.blocks.mhsa import MultiHeadSelfAttention
from attnjax.blocks.non_local import NonLocalAttention
from attnjax.blocks.primitives import (
    attention_pool,
    excitation_mlp,
    global_avg_pool,
    global_max_pool,
    odd_size,
    reduced_channels,
    resolve_heads,
    sigmoid_gate,
    spatial_conv,
    spatial_softmax,
)
from attnjax.blocks.psa import PolarizedSelfAttention
from attnjax.blocks.scoord import SimpleCoordinateAttention
from attnjax.blocks.se import SqueezeExcitation
from attnjax.blocks.seed import SeedAttention
from attnjax.blocks.shuffle import ShuffleAttention
from attnjax.blocks.simam import SimAMAttention
from attnjax.blocks.sk import SelectiveKernelAttention
from attnjax.blocks.softmax import SoftmaxAttention, softmax_attention
from attnjax.blocks.splat import SplitAttention
from attnjax.blocks.strip import StripAttention
from attnjax.blocks.triplet import TripletAttention
from attnjax.layers import BATCH_AXIS
from attnjax.validate import InputError

_REGISTRY: dict[str, type[nn.Module]] = {
    "seed": SeedAttention,
    "softmax": SoftmaxAttention,
    "se": SqueezeExcitation,
    "eca": EfficientChannelAttention,
    "cbam": CBAM,
    "bam": BAM,
    "gc": GlobalContext,
    "coord": CoordinateAttention,
    "nonlocal": NonLocalAttention,
    "simam": SimAMAttention,
    "sk": SelectiveKernelAttention,
    "triplet": TripletAttention,
    "mhsa": MultiHeadSelfAttention,
    # timm's create_attn kinds (same names)
    "ese": EffectiveSqueezeExcitation,
    "ecam": EfficientChannelAttentionMLP,
    "ceca": CircularEfficientChannelAttention,
    "ge": GatherExcite,
    "gca": GlobalContextGate,
    "lcbam": LightCBAM,
    "splat": SplitAttention,
    "lambda": LambdaLayer,
    "bottleneck": BottleneckAttention,
    "halo": HaloAttention,
    "scoord": SimpleCoordinateAttention,
    "ela": EfficientLocalAttention,
    "strip": StripAttention,
    "bat": BilinearAttentionalTransform,
    # External-Attention's catalogue
    "external": ExternalAttention,
    "psa": PolarizedSelfAttention,
    "shuffle": ShuffleAttention,
    "danet": DualAttention,
    "criss_cross": CrissCrossAttention,
    "axial": AxialAttention,
}


def names() -> list[str]:
    """The registered block names, sorted."""
    return sorted(_REGISTRY)


# Fields every flax Module has, and the ones a host sets per site: not block options.
_NOT_OPTIONS = {"parent", "name", "dtype", "axis_name"}


def _block_class(name: str) -> type[nn.Module]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown attention block {name!r}; valid names: {', '.join(names())}") from None


def options(name: str) -> dict[str, object]:
    """The options of block ``name`` and their defaults (``dtype`` is the host's to set)."""
    return {
        f.name: f.default
        for f in dataclasses.fields(_block_class(name))
        if f.init and f.name not in _NOT_OPTIONS and f.default is not dataclasses.MISSING
    }


def check_options(name: str, given: dict) -> None:
    """Refuse options that block ``name`` does not have, naming the ones it has."""
    valid = options(name)
    unknown = sorted(set(given) - set(valid))
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        raise InputError(f"attention block {name!r} has no option {', '.join(unknown)}; its options: {listed}")


def _parse_value(text: str, default, where: str):
    """``text`` as the type of ``default``: bool, int, float, str, or a tuple of ints (``1,2``)."""
    try:
        if default is None:  # an optional number (eca's kernel_size): none, an int or a float
            if text.lower() == "none":
                return None
            return float(text) if any(c in text for c in ".eE") else int(text)
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        kinds = {bool: "true or false", int: "an integer", float: "a number", type(None): "a number or none"}
        kind = kinds.get(type(default), type(default).__name__)
        shown = "comma-separated integers such as 1,2" if isinstance(default, tuple) else kind
        raise InputError(f"{where}: {text!r} is not {shown} (the default is {default!r})") from None
    return text


def parse_key_values(pairs, defaults: dict, who: str) -> dict:
    """``["key=value", ...]`` as a dict, each value read as the type of its default in ``defaults``."""
    parsed = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InputError(f"{who}: {pair!r} is not key=value (for example reduction=8)")
        if key not in defaults:
            listed = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
            raise InputError(f"{who} has no option {key!r}; its options: {listed}")
        parsed[key] = _parse_value(text.strip(), defaults[key], f"{who} option {key}")
    return parsed


def parse_options(name: str, pairs) -> dict:
    """Block ``name``'s options from ``key=value`` strings, typed by their defaults."""
    return parse_key_values(pairs, options(name), f"attention block {name!r}")


def factory(name: str, **given) -> functools.partial:
    """A factory of block ``name`` with ``given`` options (checked): call it with ``name=``/``dtype=`` per site."""
    check_options(name, given)
    return functools.partial(_block_class(name), **given)


def build(block, *, name: str, dtype, axis_name: str | None = BATCH_AXIS) -> nn.Module | None:
    """One block for one site of a host: from a factory, given the host's ``dtype`` and batch-norm ``axis_name``.

    A built module (a host's field) is returned as it is; a host with several sites gives each
    site's sub-host its own ``copy(parent=None)`` of it.
    """
    if block is None:
        return None
    if isinstance(block, nn.Module):
        return block  # a module given as the host's field is already the host's own child
    cls = block.func if isinstance(block, functools.partial) else block
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    given = block.keywords if isinstance(block, functools.partial) else {}
    host = {"dtype": dtype, "axis_name": axis_name}
    return block(name=name, **{k: v for k, v in host.items() if k in fields and k not in given})


def create(name: str, /, **options) -> nn.Module:
    """Build the block registered as ``name`` with its keyword ``options``, checked as :func:`factory` checks them.

    Besides the block's options (:func:`options`), the fields a host sets per site (``name``, ``dtype``,
    ``axis_name``) may be given too: the module is built here, not by a host.
    """
    check_options(name, {key: value for key, value in options.items() if key not in _NOT_OPTIONS})
    return _block_class(name)(**options)


__all__ = [
    "BAM",
    "CBAM",
    "AxialAttention",
    "BilinearAttentionalTransform",
    "BottleneckAttention",
    "CircularEfficientChannelAttention",
    "CoordinateAttention",
    "CrissCrossAttention",
    "DualAttention",
    "EffectiveSqueezeExcitation",
    "EfficientChannelAttention",
    "EfficientChannelAttentionMLP",
    "EfficientLocalAttention",
    "ExternalAttention",
    "GatherExcite",
    "GlobalContext",
    "GlobalContextGate",
    "HaloAttention",
    "LambdaLayer",
    "LightCBAM",
    "MultiHeadSelfAttention",
    "NonLocalAttention",
    "PolarizedSelfAttention",
    "SeedAttention",
    "SelectiveKernelAttention",
    "ShuffleAttention",
    "SimAMAttention",
    "SimpleCoordinateAttention",
    "SoftmaxAttention",
    "SplitAttention",
    "SqueezeExcitation",
    "StripAttention",
    "TripletAttention",
    "attention_pool",
    "build",
    "check_options",
    "create",
    "excitation_mlp",
    "factory",
    "global_avg_pool",
    "global_max_pool",
    "names",
    "odd_size",
    "options",
    "parse_key_values",
    "parse_options",
    "reduced_channels",
    "resolve_heads",
    "sigmoid_gate",
    "softmax_attention",
    "spatial_conv",
    "spatial_softmax",
]
