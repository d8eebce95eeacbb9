"""Light CBAM: CBAM with the average- and max-pooled descriptors averaged before one pass of each gate.

Source: timm's ``LightCbamModule`` (Ross Wightman, 2020, ``timm/layers/cbam.py`` in
huggingface/pytorch-image-models), an experimental lighter variant of CBAM: Sanghyun Woo, Jongchan Park,
Joon-Young Lee and In So Kweon (2018), "CBAM: Convolutional Block Attention Module", ECCV. There is no
paper for the light variant; timm's code defines it, and attnjax's ``cbam`` (:mod:`attnjax.blocks.cbam`)
fixes the choices the two share.

What it computes, for NHWC ``x`` with C channels::

    Mc = sigmoid(MLP(0.5 * avgpool(x) + 0.5 * maxpool(x)))      (N, 1, 1, C); one MLP C -> C/r -> C (ReLU), r = 16
    x' = x * Mc
    Ms = sigmoid(conv7x7(0.5 * mean_c(x') + 0.5 * max_c(x')))   (N, H, W, 1); 1 -> 1 channel, padding 3
    y  = x' * Ms

CBAM runs its MLP twice (on each pooled descriptor) and its 7x7 conv on two stacked maps; the light
variant averages the two descriptors first, so the MLP runs once and the conv has one input channel.

Sown maps, both in (0, 1): ``intermediates/channel``, Mc of shape (N, 1, 1, C), and
``intermediates/spatial``, Ms of shape (N, H, W, 1).

Choices and deviations from timm:

- The spatial gate has no batch norm, and its 7x7 conv has a bias, as in attnjax's ``cbam`` (the CBAM
  paper's equation). timm's ``LightSpatialAttn`` puts a BN after a bias-free conv (``ConvNormAct``),
  which makes the gate depend on the other images of the batch in training (``spatial_norm=True`` gives it).
- The MLP layers have biases, as in attnjax's ``cbam`` and the official CBAM code; timm's default is
  ``mlp_bias=False`` (an option here too).
- CBAM's [mean, max] order does not arise: the two maps are summed, not stacked.
- Bottleneck width ``reduced_channels(C, r) = max(C // r, min(C, 8))``, as in ``cbam``; timm rounds C/r to
  the nearest integer (at least 1): 8 against 4 at C = 64. The two agree for C >= 128 when r divides C.

timm's options (``timm/layers/cbam.py``; ``create_attn('lcbam')`` is this block), under timm's names:

- ``rd_ratio``, ``rd_channels``, ``rd_divisor``: timm's MLP width instead of ``reduction``'s (giving both is
  an error): ``rd_channels`` if given, else C * ``rd_ratio`` (default timm's 1/16) rounded to the nearest
  multiple of ``rd_divisor`` (default 1), at least one (:func:`attnjax.blocks.primitives.bottleneck_width`);
- ``act_layer``: the MLP's activation by timm's name (``relu``, default;
  :data:`attnjax.blocks.primitives.ACTIVATIONS`);
- ``mlp_bias``: biases on the two MLP layers (default True, attnjax's; timm's default False);
- ``spatial_norm``: timm's spatial gate, a bias-free 7x7 conv followed by a batch norm (``spatial_bn``;
  timm's ``ConvNormAct``), instead of the conv with a bias. The gate then depends on the batch in training
  (``train=True``: batch statistics) and the block has ``batch_stats``; the running variance follows Flax's
  convention (see :mod:`attnjax.layers`). Not a timm option: timm always has the BN.
- ``kernel_size`` is timm's ``spatial_kernel_size``.

``LightCBAM(rd_divisor=1, mlp_bias=False, spatial_norm=True)`` has timm's ``'lcbam'`` parameters
(``reduce``/``expand`` = ``channel.fc1``/``fc2``, ``spatial_conv``/``spatial_bn`` = ``spatial.conv.conv``/``bn``)
and its output in evaluation and training. timm's ``gate_layer`` is not offered: timm's light module ignores
it (its channel gate calls ``F.sigmoid`` and its spatial gate is not given it), so both gates are sigmoids.

On CPU the spatial gate's 7x7 conv (1 channel in, 1 out) is traced as one banded dot
(:mod:`attnjax.ops.single_output_conv`), as in ``cbam``. Same parameters, same values and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.blocks.cbam import CBAM
from attnjax.blocks.primitives import (
    activation_function,
    block_batch_norm,
    bottleneck_width,
    excitation_mlp,
    global_avg_pool,
    global_max_pool,
    spatial_conv,
)
from attnjax.layers import BATCH_AXIS


def light_global_pool(x: jax.Array) -> jax.Array:
    """``0.5 * avgpool(x) + 0.5 * maxpool(x)`` over the positions, shape (N, 1, 1, C)."""
    return 0.5 * global_avg_pool(x) + 0.5 * global_max_pool(x)


def light_channel_pool(x: jax.Array) -> jax.Array:
    """``0.5 * mean_c(x) + 0.5 * max_c(x)`` over the channels, shape (N, H, W, 1)."""
    return 0.5 * jnp.mean(x, axis=-1, keepdims=True) + 0.5 * jnp.max(x, axis=-1, keepdims=True)


class LightCBAM(CBAM):
    """Light CBAM block: channel gate from one MLP pass on the averaged avg/max descriptor, then a 7x7 spatial
    gate on the averaged channel mean/max map.

    NHWC in, same shape out; C is read from the input. Sows ``intermediates/channel`` (N, 1, 1, C)
    and ``intermediates/spatial`` (N, H, W, 1). CBAM's layers, options and sown maps; only the two
    poolings differ.
    """

    rd_ratio: float | None = None  # timm's width rule instead of reduction's: C * rd_ratio (timm: 1/16), ...
    rd_channels: int | None = None  # ... or exactly rd_channels ...
    rd_divisor: int | None = None  # ... rounded to a multiple of rd_divisor (timm: 1)
    act_layer: str = "relu"  # the MLP's activation, by timm's name
    mlp_bias: bool = True  # timm: False
    spatial_norm: bool = False  # timm's spatial gate: bias-free conv + batch norm
    axis_name: str | None = BATCH_AXIS  # batch-norm synchronisation axis (spatial_norm=True), set by the host

    kernel_size_note = "timm uses 7"

    def channel_mlp(self, channels: int):
        """The channel gate's MLP C -> hidden -> C (layers ``reduce``, ``expand``), attnjax's or timm's width."""
        widths = (self.reduction, self.rd_ratio, self.rd_channels, self.rd_divisor)
        hidden = bottleneck_width(channels, *widths, timm_ratio=1 / 16)
        activation = activation_function(self.act_layer)
        return excitation_mlp(channels, hidden, self.dtype, use_bias=self.mlp_bias, activation=activation)

    def spatial_logits(self, pooled: jax.Array, kernel_size: int, train: bool) -> jax.Array:
        """The k x k conv ``spatial_conv`` of the pooled map, with a bias, or bias-free and then the batch norm
        ``spatial_bn`` (``spatial_norm``, timm's)."""
        logits = spatial_conv(kernel_size, self.dtype, use_bias=not self.spatial_norm)(pooled)
        return block_batch_norm(self, train, "spatial_bn")(logits) if self.spatial_norm else logits

    def channel_logits(self, mlp, x: jax.Array) -> jax.Array:
        """``MLP(0.5 avgpool(x) + 0.5 maxpool(x))``: one pass of the MLP, (N, 1, 1, C)."""
        return mlp(light_global_pool(x))

    def spatial_pool(self, x: jax.Array) -> jax.Array:
        """The spatial gate's input, ``0.5 mean_c(x) + 0.5 max_c(x)`` (N, H, W, 1)."""
        return light_channel_pool(x)
