"""timm's ResNets (timm 1.0.29, ``timm/models/resnet.py``) in Flax, NHWC, layer for layer: same layers, same
widths, same padding, the same outputs from the same weights (:mod:`attnjax.models.timm_weights` converts them).

Paper: Kaiming He, Xiangyu Zhang, Shaoqing Ren and Jian Sun (2016), "Deep Residual Learning for Image
Recognition", CVPR. Variants: ResNeXt (Xie et al. 2017, grouped 3x3 convs), the deep stems and the
average-pool shortcut of "Bag of Tricks" (He et al. 2019: ResNet-C/-D), SE-ResNet (Hu et al. 2018) and
ECA-ResNet (Wang et al. 2020), stochastic depth (Huang et al. 2016).

The network (:class:`ResNet`)::

    stem      ''            : conv7x7/2 (64) - bn1 - relu                          (timm: conv1, bn1)
              'deep'        : conv3x3/2 (w) - bn - relu - conv3x3 (w) - bn - relu - conv3x3 (2w) - bn1 - relu
              'deep_tiered' : the same with widths 3(w/4), w, 2w                   (timm: conv1.0 ... conv1.6, bn1)
              then maxpool 3x3/2, padding 1 (padded with -inf, as torch)
    stages    layer1..layer4: layers[i] residual blocks of planes channels[i] (64, 128, 256, 512), the first
              block of stages 2-4 with stride 2 and each stage's first block with a projection shortcut
              where the shape changes: conv1x1/stride + bn ('conv'), or with avg_down (ResNet-D)
              avgpool2x2/2 (ceil mode, padding not counted) + conv1x1 + bn ('avg')
    head      global average pool, dropout (drop_rate), fc

A residual block (``residual_block``: ``"basic"`` :class:`BasicBlock`, ``"bottleneck"`` :class:`Bottleneck`)::

    basic      y = relu(bn1(conv3x3/s(x))); y = bn2(conv3x3(y))                          out width planes
    bottleneck y = relu(bn1(conv1x1(x))); y = relu(bn2(conv3x3/s(y, groups=cardinality))); y = bn3(conv1x1(y))
               width = floor(planes * base_width / 64) * cardinality, out width 4 * planes
    then       y = block(y)                    the attention site, as timm's attn_layer (its ``se``)
               y = drop_path(y)                stochastic depth, in training only
               out = relu(y + shortcut(x))

The attention ``block`` is a factory (:func:`attnjax.blocks.factory`, or a class or ``functools.partial``):
every residual block builds its own after its last batch norm, with the block's output width C, named
``block`` (timm's ``se``, whatever the type). Any attnjax block works there. timm's SE and ECA networks
set it by default: ``seresnet*``/``seresnext*`` to ``se`` with timm's widths (``rd_ratio=1/16, rd_divisor=8``),
``ecaresnet*`` to ``eca`` with timm's kernel (``min_kernel_size=3``); see :data:`attnjax.models.timm_resnets.TIMM_ATTENTION`.

Choices, as timm's:

- padding: a k x k conv pads k // 2 on every side (torch's symmetric padding; Flax's "SAME" pads a stride-2
  conv on the bottom/right only); convs have no bias;
- batch norm :func:`attnjax.layers.batch_norm`: momentum 0.9 (torch's 0.1), epsilon 1e-5, synchronised
  over ``axis_name`` where it is mapped. As every Flax batch norm, its running variance takes in the biased
  batch variance where torch's takes in the unbiased one (see :func:`attnjax.layers.torch_running_var`):
  the outputs agree, the running variances after a training step differ by up to n/(n-1) in the update;
- initialisation: convs Kaiming-normal, fan-out, gain sqrt(2) (timm's ``kaiming_normal_(mode='fan_out')``);
  the last batch norm of each residual block starts at scale 0 when ``zero_init_last`` (timm's default); the
  fc as torch's ``nn.Linear`` (uniform, bound 1/sqrt(fan_in), weight and bias); batch norms scale 1,
  offset 0. The attention blocks keep their own initialisation (timm re-initialises SE's 1x1 convs with
  its conv rule; the parameters differ at init, not in what they compute);
- stochastic depth: residual block i of n (counted over the network) drops its branch with probability
  ``drop_path_rate * i / (n - 1)``, per example, and scales the kept ones by 1/(1 - p) (timm's ``DropPath``).
  It needs, in training, a PRNG stream named ``'dropout'``: ``model.apply(..., rngs={'dropout': key})``;
  attnjax's trainer passes one at every step. ``drop_rate`` (dropout before the fc) uses the same stream.

Not offered: timm's ``output_stride`` (dilation), ``down_kernel_size``, ``replace_stem_pool``,
``aa_layer``, ``drop_block_rate``, other activations and norms, and the stems ``deep_tiered_narrow``.

Extending (SK-ResNet, ResNeSt: timm's networks that replace the 3x3 conv): ``residual_block`` is a name in
:data:`RESIDUAL_BLOCKS`, a :class:`ResidualBlock` subclass, or a ``functools.partial`` of one with its own
options (timm's ``block`` with its ``block_args``). A new residual block subclasses :class:`ResidualBlock`,
sets ``expansion``, and writes ``__call__(x, train)`` from its convs and norms (named as timm's modules, so
the weight walk of :mod:`attnjax.models.timm_weights` names them as timm does) ending in
``self.finish(y, x, train)``: the attention site, stochastic depth, the shortcut and the add. The host
builds it per site with the fields of :class:`ResidualBlock`; registering it in :data:`RESIDUAL_BLOCKS`
makes it a ``--model-option residual_block=NAME``. So do timm's SK-ResNets (:mod:`attnjax.models.sknet`:
``sk_basic``, ``sk_bottleneck``) and ResNeSts (:mod:`attnjax.models.resnest`: ``resnest_bottleneck``), which
register theirs when :mod:`attnjax.models` is imported.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import blocks
from attnjax.layers import BATCH_AXIS, batch_norm
from attnjax.validate import InputError, check_channels, check_nhwc

STEM_TYPES = ("", "deep", "deep_tiered")
DROPOUT_RNG = "dropout"  # the PRNG stream of stochastic depth and of the head's dropout (Flax's usual name)

# timm's conv initialisation: kaiming_normal_(mode='fan_out', nonlinearity='relu'), std sqrt(2 / fan_out),
# fan_out = out channels * kh * kw (untruncated normal, as torch's).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch's nn.Linear default (kaiming_uniform_(a=sqrt(5)) for the weight, the same bound for the bias):
# uniform in +-1/sqrt(fan_in).
LINEAR_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """torch's symmetric padding of a k x k conv in timm's ResNets (``padding=k // 2``)."""
    return ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))


def conv(features: int, kernel: int, strides: int = 1, *, groups: int = 1, dtype=None, name: str) -> nn.Conv:
    """A bias-free k x k conv with timm's padding and initialisation."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides,
        padding=pad(kernel),
        feature_group_count=groups,
        use_bias=False,
        kernel_init=CONV_INIT,
        dtype=dtype,
        name=name,
    )


def avg_pool_ceil(x: jax.Array) -> jax.Array:
    """torch's ``AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)`` on NHWC: an odd side's last window
    holds one row (or column) and averages only it."""
    padding = ((0, x.shape[1] % 2), (0, x.shape[2] % 2))
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding=padding, count_include_pad=False)


def drop_path(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Stochastic depth (timm's ``drop_path``, ``scale_by_keep``): each example's ``x`` is 0 with probability
    ``rate``, else ``x / (1 - rate)``."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


def drop_path_rates(rate: float, layers: Sequence[int]) -> list[float]:
    """timm's linear rule: residual block i of n (over the whole network) gets ``rate * i / (n - 1)``."""
    n = sum(layers)
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


class ResidualBlock(nn.Module):
    """The fields and the shared end of a residual block (``__call__`` is the subclass's).

    ``planes`` is timm's: the block's output width is ``planes * expansion``. ``downsample`` is the projection
    shortcut: ``None`` (identity), ``"conv"`` (conv1x1/stride + bn, timm's ``downsample_conv``) or ``"avg"``
    (avgpool2x2/2 where strided + conv1x1 + bn, timm's ``downsample_avg``). ``block`` is the attention
    factory, built once here after the last norm.
    """

    planes: int
    strides: int = 1
    downsample: str | None = None
    cardinality: int = 1
    base_width: int = 64
    reduce_first: int = 1
    block: Callable[..., nn.Module] | nn.Module | None = None
    drop_path_rate: float = 0.0
    zero_init_last: bool = True
    dtype: Any = jnp.float32
    axis_name: str | None = BATCH_AXIS

    expansion: ClassVar[int] = 1

    def norm(self, train: bool, name: str, *, last: bool = False) -> nn.BatchNorm:
        """A batch norm of the block; ``last`` starts its scale at 0 when ``zero_init_last``."""
        scale_init = nn.initializers.zeros if last and self.zero_init_last else nn.initializers.ones
        return batch_norm(train, axis_name=self.axis_name, dtype=self.dtype, scale_init=scale_init, name=name)

    def finish(self, y: jax.Array, x: jax.Array, train: bool) -> jax.Array:
        """The end every residual block shares: attention, stochastic depth, shortcut, add, ReLU."""
        block = blocks.build(self.block, name="block", dtype=self.dtype, axis_name=self.axis_name)
        if block is not None:
            y = block(y, train=train)
        if train and self.drop_path_rate > 0:
            if not self.has_rng(DROPOUT_RNG):
                raise InputError(
                    f"drop_path_rate={self.drop_path_rate} needs, in training, a PRNG stream "
                    f"{DROPOUT_RNG!r}: model.apply(..., rngs={{{DROPOUT_RNG!r}: key}})"
                )
            y = drop_path(y, self.drop_path_rate, self.make_rng(DROPOUT_RNG))
        return nn.relu(y + self.shortcut(x, y.shape[-1], train))

    def shortcut(self, x: jax.Array, features: int, train: bool) -> jax.Array:
        """timm's ``downsample`` (made after the attention, as timm registers it): identity or a projection."""
        if self.downsample is None:
            return x
        if self.downsample == "conv":
            x = conv(features, 1, self.strides, dtype=self.dtype, name="downsample_0")(x)
            return self.norm(train, "downsample_1")(x)
        if self.downsample == "avg":
            if self.strides != 1:
                x = avg_pool_ceil(x)  # timm's downsample.0 (no parameters)
            x = conv(features, 1, dtype=self.dtype, name="downsample_1")(x)
            return self.norm(train, "downsample_2")(x)
        raise InputError(f"{type(self).__name__}: downsample must be None, 'conv' or 'avg', got {self.downsample!r}")


class BasicBlock(ResidualBlock):
    """timm's ``BasicBlock``: two 3x3 convs (ResNet-18/34), ``expansion`` 1; no cardinality or base width."""

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        who = type(self).__name__
        if self.cardinality != 1 or self.base_width != 64:
            raise InputError(
                f"{who} has no groups: cardinality must be 1 and base_width 64 (timm's rule), got "
                f"{self.cardinality} and {self.base_width}; use residual_block='bottleneck' for ResNeXt"
            )
        first = self.planes // self.reduce_first
        y = conv(first, 3, self.strides, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(self.norm(train, "bn1")(y))
        y = conv(self.planes * self.expansion, 3, dtype=self.dtype, name="conv2")(y)
        y = self.norm(train, "bn2", last=True)(y)
        return self.finish(y, x, train)


class Bottleneck(ResidualBlock):
    """timm's ``Bottleneck``: conv1x1, grouped conv3x3 (stride here), conv1x1 (ResNet-50+, ResNeXt),
    ``expansion`` 4."""

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = int(math.floor(self.planes * (self.base_width / 64)) * self.cardinality)
        first = width // self.reduce_first
        y = conv(first, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(self.norm(train, "bn1")(y))
        y = conv(width, 3, self.strides, groups=self.cardinality, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(self.norm(train, "bn2")(y))
        y = conv(self.planes * self.expansion, 1, dtype=self.dtype, name="conv3")(y)
        y = self.norm(train, "bn3", last=True)(y)
        return self.finish(y, x, train)


RESIDUAL_BLOCKS: dict[str, type[ResidualBlock]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def residual_block_class(residual_block, who: str):
    """``residual_block`` as a class (or partial of one): a name in :data:`RESIDUAL_BLOCKS`, a
    :class:`ResidualBlock` subclass or a ``functools.partial`` of one."""
    cls = residual_block.func if isinstance(residual_block, functools.partial) else residual_block
    if isinstance(cls, type) and issubclass(cls, ResidualBlock):
        return residual_block
    try:
        return RESIDUAL_BLOCKS[residual_block]
    except (KeyError, TypeError):
        raise InputError(
            f"{who}: unknown residual_block {residual_block!r}; valid: {', '.join(RESIDUAL_BLOCKS)} "
            "(or a ResidualBlock subclass, or a functools.partial of one)"
        ) from None


class ResNet(nn.Module):
    """timm's ``ResNet``: the stem, four stages of residual blocks with the attention ``block`` in each, the head.

    Takes NHWC images with any number of channels and any size the strides allow (down to 1 x 1 after the
    32x reduction); returns logits of shape (batch, num_classes). ``train`` selects batch statistics in the
    batch norms (and the blocks'), and turns on ``drop_path_rate`` and ``drop_rate``. The fields are timm's
    arguments of the same names (``layers``, ``channels``, ``cardinality``, ``base_width``, ``stem_width``,
    ``stem_type``, ``avg_down``, ``block_reduce_first``, ``drop_rate``, ``drop_path_rate``, ``zero_init_last``);
    ``residual_block`` is timm's ``block`` (``block`` here is the attention, timm's ``block_args.attn_layer``).
    """

    num_classes: int = 1000
    block: Callable[..., nn.Module] | nn.Module | None = None  # the attention factory, built per residual block
    layers: Sequence[int] = (3, 4, 6, 3)
    residual_block: str | type[ResidualBlock] = "bottleneck"
    channels: Sequence[int] = (64, 128, 256, 512)
    cardinality: int = 1
    base_width: int = 64
    stem_width: int = 64
    stem_type: str = ""
    avg_down: bool = False
    block_reduce_first: int = 1
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    zero_init_last: bool = True
    dtype: Any = jnp.float32
    axis_name: str | None = BATCH_AXIS  # batch-norm synchronisation axis (Flax's): the step's caller maps over it

    # Whether the attention is part of the network's definition (timm's named networks: None means none), for
    # models.default_block; attnjax's own models leave the choice to their caller.
    NETWORK_DEFINES_BLOCK: ClassVar[bool] = True

    def check(self):
        who = type(self).__name__
        cls = residual_block_class(self.residual_block, who)
        if self.stem_type not in STEM_TYPES:
            raise InputError(f"{who}: unknown stem_type {self.stem_type!r}; valid: {', '.join(map(repr, STEM_TYPES))}")
        if not self.layers or len(self.layers) != len(self.channels) or min(self.layers) < 1:
            raise InputError(
                f"{who}: layers must give a positive block count for each of the {len(self.channels)} stages "
                f"(channels={tuple(self.channels)}), got {tuple(self.layers)}"
            )
        if min(self.channels) < 1 or self.stem_width < 4 or self.cardinality < 1 or self.base_width < 1:
            raise InputError(
                f"{who}: channels, stem_width (at least 4), cardinality and base_width must be positive, got "
                f"{tuple(self.channels)}, {self.stem_width}, {self.cardinality}, {self.base_width}"
            )
        if self.block_reduce_first < 1:
            raise InputError(f"{who}: block_reduce_first must be >= 1, got {self.block_reduce_first}")
        for name in ("drop_rate", "drop_path_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise InputError(f"{who}: {name} must be in [0, 1), got {getattr(self, name)}")
        return cls

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        who = type(self).__name__
        check_nhwc(x, who)
        block_cls = self.check()
        first_conv = "conv1_0" if self.stem_type else "conv1"
        if not self.is_initializing() and first_conv in self.variables.get("params", {}):
            check_channels(x, self.variables["params"][first_conv]["kernel"].shape[-2], who)

        x = x.astype(self.dtype)
        if self.stem_type:  # 'deep' or 'deep_tiered': three 3x3 convs (timm's conv1 Sequential, indices 0..6)
            inplanes = self.stem_width * 2
            tiered = self.stem_type == "deep_tiered"
            widths = (3 * (self.stem_width // 4) if tiered else self.stem_width, self.stem_width)
            bn = functools.partial(batch_norm, train, axis_name=self.axis_name, dtype=self.dtype)
            x = nn.relu(bn(name="conv1_1")(conv(widths[0], 3, 2, dtype=self.dtype, name="conv1_0")(x)))
            x = nn.relu(bn(name="conv1_4")(conv(widths[1], 3, dtype=self.dtype, name="conv1_3")(x)))
            x = conv(inplanes, 3, dtype=self.dtype, name="conv1_6")(x)
        else:
            inplanes = 64  # timm: the 7x7 stem is 64 wide whatever stem_width
            x = conv(inplanes, 7, 2, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(batch_norm(train, axis_name=self.axis_name, dtype=self.dtype, name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=pad(3))

        rates = iter(drop_path_rates(self.drop_path_rate, self.layers))
        for stage, (planes, size) in enumerate(zip(self.channels, self.layers, strict=True)):
            strides = 1 if stage == 0 else 2
            expansion = (block_cls.func if isinstance(block_cls, functools.partial) else block_cls).expansion
            project = strides != 1 or inplanes != planes * expansion
            for index in range(size):
                x = block_cls(
                    planes,
                    strides=strides if index == 0 else 1,
                    downsample=("avg" if self.avg_down else "conv") if index == 0 and project else None,
                    cardinality=self.cardinality,
                    base_width=self.base_width,
                    reduce_first=self.block_reduce_first,
                    # Each residual block builds its own attention from the factory; a built module is copied
                    # (unbound) for each, as passing it would share one set of parameters.
                    block=self.block.copy(parent=None) if isinstance(self.block, nn.Module) else self.block,
                    drop_path_rate=next(rates),
                    zero_init_last=self.zero_init_last,
                    dtype=self.dtype,
                    axis_name=self.axis_name,
                    name=f"layer{stage + 1}_{index}",
                )(x, train=train)
                inplanes = planes * expansion

        x = jnp.mean(x, axis=(1, 2))
        if self.drop_rate > 0:
            x = nn.Dropout(self.drop_rate, rng_collection=DROPOUT_RNG)(x, deterministic=not train)
        x = nn.Dense(self.num_classes, kernel_init=LINEAR_INIT, bias_init=_linear_bias_init(inplanes), name="fc")(
            x.astype(self.dtype)
        )
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))  # the loss wants >= fp32 logits


def _linear_bias_init(fan_in: int):
    """torch's ``nn.Linear`` bias: uniform in +-1/sqrt(fan_in)."""
    bound = 1 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# timm's named networks (timm/models/resnet.py's @register_model functions), each exactly its model_args.
