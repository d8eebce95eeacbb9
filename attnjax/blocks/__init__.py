"""Attention blocks for NHWC feature maps, behind one registry.

    from attnjax import blocks
    blocks.names()                       # ['bam', 'cbam', 'coord', 'eca', ...]
    block = blocks.create("seed", reduction=4)
    y = block.apply(block.init(key, x), x)   # same shape as x

Every block is called as ``block(x, train=False)`` on NHWC ``x``: it takes its channel
count from the input, returns the input's shape, and sows its attention map(s) under the
``intermediates`` collection. ``train`` selects batch statistics in blocks with batch norm.
"""

from __future__ import annotations

import flax.linen as nn

from attnjax.blocks.bam import BAM
from attnjax.blocks.cbam import CBAM
from attnjax.blocks.coord import CoordinateAttention
from attnjax.blocks.eca import EfficientChannelAttention
from attnjax.blocks.gc import GlobalContext
from attnjax.blocks.mhsa import MultiHeadSelfAttention
from attnjax.blocks.non_local import NonLocalAttention
from attnjax.blocks.primitives import global_avg_pool, reduced_channels, sigmoid_gate
from attnjax.blocks.se import SqueezeExcitation
from attnjax.blocks.seed import SeedAttention
from attnjax.blocks.simam import SimAMAttention
from attnjax.blocks.sk import SelectiveKernelAttention
from attnjax.blocks.softmax import SoftmaxAttention, softmax_attention, spatial_softmax
from attnjax.blocks.triplet import TripletAttention
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
}


def names() -> list[str]:
    """The registered block names, sorted."""
    return sorted(_REGISTRY)


def create(name: str, **options) -> nn.Module:
    """Build the block registered as ``name`` with its keyword ``options``."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown attention block {name!r}; valid names: {', '.join(names())}") from None
    return cls(**options)


__all__ = [
    "BAM",
    "CBAM",
    "CoordinateAttention",
    "EfficientChannelAttention",
    "GlobalContext",
    "MultiHeadSelfAttention",
    "NonLocalAttention",
    "SeedAttention",
    "SelectiveKernelAttention",
    "SimAMAttention",
    "SoftmaxAttention",
    "SqueezeExcitation",
    "TripletAttention",
    "create",
    "global_avg_pool",
    "names",
    "reduced_channels",
    "sigmoid_gate",
    "softmax_attention",
    "spatial_softmax",
]
