"""SK: selective kernel attention, a softmax choice between receptive fields per channel.

Li, Wang, Hu and Yang (2019), "Selective Kernel Networks", CVPR. Also, with its options, exactly
timm's ``SelectiveKernel`` (timm 1.0.29, ``timm/layers/selective_kernel.py``): the layer that
replaces the 3x3 conv of each residual block in timm's SK-ResNets (see "As timm's conv layer" below).

Split, fuse, select, with M branches (M = 2 by default)::

    U_m = relu(BN(conv3x3_m(x)))       grouped 3x3 convs, dilation 1 and 2, C -> C
    U = sum_m U_m
    s = GAP(U)                         (N, C)
    z = relu(BN(fc(s)))                C -> d, d = max(C // r, min(C, L)), r = 16, L = 32
    a_m = softmax_m(fc_m(z))           FCs d -> C, one per branch (one d -> M*C conv, branch-major),
                                       softmax across branches per channel
    y = sum_m a_m * U_m

With the default options the output keeps the input's shape. Sows the branch weights ``a`` as
``intermediates/attention``, shape ``(N, 1, 1, C_out, M)`` (broadcastable against the stacked
branches ``(N, H', W', C_out, M)``); they sum to 1 over the last axis.

Choices and deviations (the defaults, attnjax's block):

- The 5x5 branch is a 3x3 conv with dilation 2, as the paper itself recommends (and timm's
  ``keep_3x3``).
- Groups: the paper's G = 32, taken as the largest divisor of C that is at most 32
  (``sk_groups``). For C <= 32 that is C (depthwise convs); for C = 64 it is 32; for a C that
  32 does not divide (48, 40) it is the nearest smaller divisor (24, 20) rather than an error;
  for a prime C above 32 it is 1. (With ``out_channels`` or ``split_input``: the largest divisor
  of gcd(a branch's input channels, C_out) up to ``groups``.)
- d = ``reduced_channels(C_out, r, min_channels=L)`` = ``max(C // r, min(C, L))``: the paper's
  ``max(C / r, L)`` for C >= L, but never wider than C itself (for C < 32 the paper's d = 32
  would widen the bottleneck past the input).
- The convs and FCs have no bias (each conv is followed by BN, and the paper's selection
  FCs are written without one). BN uses the shared :func:`attnjax.layers.batch_norm`
  (epsilon 1e-5, momentum 0.9 = PyTorch's 0.1, two-pass variance).
- The block is SK convolution used as an attention block: input and output both have C
  channels, stride 1.

The registry defaults are timm's ``SelectiveKernel(C, C, groups=sk_groups(C), rd_channels=d,
split_input=False)`` exactly (checked against timm in tests/blocks/test_sk.py); timm's own
defaults differ (``groups=1``, ``split_input=True``, d = ``make_divisible(C / 16, 8)``), so they
are not the registry's.

As timm's conv layer: ``SelectiveKernel(in, out, kernel_size, stride, dilation, groups, rd_ratio,
rd_channels, rd_divisor, keep_3x3, split_input)`` is this block with the same options
(``out_channels=out``, the rest by the same names), where

- ``kernel_size``: ``()`` (the default) is timm's default ``None`` = ``[3, 5]`` while ``dilations``
  keeps its default ``(1, 2)``; with other ``dilations`` it means 3x3 branches at ``dilation *
  dilations[m]`` (attnjax's option). A tuple is timm's list (one branch per entry), an int k is
  timm's int (two branches of k).
  With ``keep_3x3`` (timm's default) a k x k branch is a 3x3 conv of dilation ``dilation * (k - 1)
  // 2``, else a k x k conv of dilation ``dilation``. Giving ``kernel_size`` and ``dilations``
  (other than their default) is an error. Kernel sizes must be odd and >= 3, as timm asserts
  (timm checks only the first entry).
- ``stride`` and ``dilation``: every branch conv's, padded as timm pads (``get_padding``:
  ``((stride - 1) + dilation * (k - 1)) // 2`` on each side).
- ``groups``: timm's ``groups`` (timm takes ``min(C_out, groups)`` and requires it to divide the
  channels); here the largest divisor of gcd(branch input, C_out) up to ``groups``, which is
  timm's value wherever timm accepts it.
- ``split_input``: each branch convolves its own ``C_in / M`` input channels (``torch.split``
  order: branch m takes channels ``[m C_in / M, (m + 1) C_in / M)``); C_in must be a multiple of M.
- ``rd_ratio``, ``rd_channels``, ``rd_divisor``: giving any of them (all None by default) selects
  timm's width rule, d = ``rd_channels``, else ``make_divisible(C_out * rd_ratio, rd_divisor)``
  (timm's rounding, :func:`attnjax.blocks.primitives.make_divisible`), with timm's defaults
  ``rd_ratio=1/16`` and ``rd_divisor=8`` for the ones not given. Giving them with ``reduction`` or
  ``min_channels`` other than their defaults (attnjax's rule) is an error.
- Not offered: timm's ``act_layer`` and ``norm_layer`` (always ReLU and BatchNorm, timm's
  defaults and its SK-ResNets'), ``aa_layer`` and ``drop_layer`` (None in timm's SK-ResNets).

Parameters, one for one with timm's state dict (conv kernels HWIO here, OIHW in PyTorch:
``weight = kernel.transpose(3, 2, 0, 1)``; BN ``scale`` is ``weight``; running ``mean``/``var``
in ``batch_stats`` are ``running_mean``/``running_var``; ``num_batches_tracked`` has no
counterpart)::

    params/paths_{m}/conv/kernel    (k, k, C_in' / G, C_out)   paths.{m}.conv.weight
    params/paths_{m}/bn/scale, bias (C_out,)                   paths.{m}.bn.weight, .bias
    batch_stats/paths_{m}/bn/mean, var                         paths.{m}.bn.running_mean, .running_var
    params/attn/fc_reduce/kernel    (1, 1, C_out, d)           attn.fc_reduce.weight
    params/attn/bn/scale, bias      (d,)                       attn.bn.weight, .bias
    batch_stats/attn/bn/mean, var                              attn.bn.running_mean, .running_var
    params/attn/fc_select/kernel    (1, 1, d, M * C_out)       attn.fc_select.weight

(C_in' is C_in / M with ``split_input``, else C_in.) ``paths_{m}`` mirrors timm's ``ConvNormAct``
(conv, then BN with its ReLU, timm's ``BatchNormAct2d`` named ``bn``), ``attn`` timm's
``SelectiveKernelAttn``; ``fc_select``'s outputs are branch-major (channel ``m * C_out + c`` is
branch m's logit for channel c), as timm's.

On CPU the grouped convs are traced as dense convs with a block-diagonal kernel
(:mod:`attnjax.ops.grouped_conv`): XLA:CPU computes a grouped conv's kernel gradient so slowly
that the block's train step is 30-60x faster this way. Same parameters (the grouped kernels),
same values and gradients.

Batch-norm running variance: the running averages take in the biased batch variance (Flax's convention);
PyTorch's ``BatchNorm2d`` takes in the unbiased one, n/(n-1) times larger, n being the values per
channel in the batch. Outputs agree with PyTorch, but running variances imported from or exported to
PyTorch differ by up to n/(n-1): the branch BNs have n = N*H'*W', but ``attn/bn`` sees (N, 1, 1, d)
features, so n = N: 2x for a batch of 2. Convert them with ``attnjax.layers.torch_running_var`` and
``flax_running_var`` (for inference with timm's weights, load ``running_var`` as it is).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from attnjax.blocks.primitives import (
    block_batch_norm,
    make_divisible,
    odd_size,
    reduced_channels,
    refuse_both_width_rules,
    softmax_in_float32,
    sow_map,
)
from attnjax.layers import BATCH_AXIS
from attnjax.ops.grouped_conv import grouped_conv
from attnjax.validate import InputError, check_nhwc

DEFAULT_DILATIONS = (1, 2)
TIMM_KERNEL_SIZE = (3, 5)  # timm's default kernel_size (None): a 3x3 and a 5x5 branch
TIMM_RD_RATIO = 1 / 16  # timm's SelectiveKernel defaults, for the rd_* options not given
TIMM_RD_DIVISOR = 8


def sk_groups(channels: int, groups: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``groups`` (``groups`` itself when it divides)."""
    if groups < 1:
        raise InputError(f"groups must be >= 1, got {groups}")
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


def conv_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """timm's symmetric padding (``timm.layers.get_padding``): ``((stride - 1) + dilation * (k - 1)) // 2``."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


def sk_branches(
    kernel_size: int | tuple[int, ...] = (),
    dilations: tuple[int, ...] = DEFAULT_DILATIONS,
    dilation: int = 1,
    keep_3x3: bool = True,
    who: str = "SelectiveKernelAttention",
) -> tuple[tuple[int, int], ...]:
    """``((k, d), ...)``: each branch conv's kernel size and dilation.

    timm's rule: an int k is ``(k, k)``; with ``keep_3x3`` a k x k branch is 3x3 at dilation ``dilation * (k - 1)
    // 2``, without it k x k at ``dilation``. ``kernel_size=()`` is timm's default ``(3, 5)`` when ``dilations`` is
    its default ``(1, 2)`` (with ``keep_3x3`` that is 3x3 at dilations ``(1, 2) * dilation``), else 3x3 branches
    at ``dilation * dilations[m]`` (attnjax's option; ``keep_3x3`` must then be True).
    """
    if dilation < 1:
        raise InputError(f"{who}: dilation must be >= 1, got {dilation}")
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    kernel_size = tuple(kernel_size)
    if not kernel_size and tuple(dilations) == DEFAULT_DILATIONS:
        kernel_size = TIMM_KERNEL_SIZE  # the same branches, 3x3 at dilations (1, 2) x dilation, with keep_3x3
    if not kernel_size:
        if not dilations or min(dilations) < 1:
            raise InputError(f"{who}: dilations must be one or more integers >= 1 (one per branch), got {dilations}")
        if not keep_3x3:
            raise InputError(
                f"{who}: keep_3x3=False asks for k x k branches, but dilations={tuple(dilations)} gives 3x3 ones; give "
                f"kernel_size (timm's branch kernels) instead of dilations"
            )
        return tuple((3, dilation * d) for d in dilations)
    if tuple(dilations) != DEFAULT_DILATIONS:
        raise InputError(
            f"{who}: kernel_size={kernel_size} (timm's branch kernels) and dilations={tuple(dilations)} (attnjax's "
            f"branch dilations) both set the branches; give one of them"
        )
    for k in kernel_size:
        odd_size(k, "kernel_size", who, "each branch's; timm's default is 3, 5")
        if k < 3:
            raise InputError(f"{who}: kernel_size entries must be >= 3 (timm's rule), got {k}")
    if keep_3x3:
        return tuple((3, dilation * (k - 1) // 2) for k in kernel_size)
    return tuple((k, dilation) for k in kernel_size)


def sk_widths(
    in_channels: int,
    out_channels: int,
    paths: int,
    *,
    groups: int = 32,
    split_input: bool = False,
    reduction: int = 16,
    min_channels: int = 32,
    rd_ratio: float | None = None,
    rd_channels: int | None = None,
    rd_divisor: int | None = None,
    who: str = "SelectiveKernelAttention",
) -> tuple[int, int, int]:
    """``(C_in', G, d)``: a branch's input channels, the branch convs' groups and the attention's hidden width.

    C_in' = C_in / M with ``split_input``, else C_in; G = the largest divisor of gcd(C_in', C_out) up to
    ``groups``; d = attnjax's ``reduced_channels(C_out, reduction, min_channels)``, or, when any ``rd_*``
    option is given, timm's ``rd_channels`` or ``make_divisible(C_out * rd_ratio, rd_divisor)``.
    """
    if split_input and in_channels % paths:
        raise InputError(
            f"{who}: split_input divides the {in_channels} input channels among the {paths} branches, so it needs "
            f"a multiple of {paths} (timm asserts the same); got {in_channels}"
        )
    path_in = in_channels // paths if split_input else in_channels
    conv_groups = sk_groups(math.gcd(path_in, out_channels), groups)
    if rd_ratio is None and rd_channels is None and rd_divisor is None:
        return path_in, conv_groups, reduced_channels(out_channels, reduction, min_channels)
    refuse_both_width_rules(reduction=(reduction, 16), min_channels=(min_channels, 32))
    if rd_channels is not None:
        if rd_channels < 1:
            raise InputError(f"rd_channels must be >= 1 or None, got {rd_channels}")
        return path_in, conv_groups, rd_channels
    if rd_ratio is not None and not rd_ratio > 0:
        raise InputError(f"rd_ratio must be > 0 or None, got {rd_ratio}")
    if rd_divisor is not None and rd_divisor < 1:
        raise InputError(f"rd_divisor must be >= 1 or None, got {rd_divisor}")
    ratio = TIMM_RD_RATIO if rd_ratio is None else rd_ratio
    divisor = TIMM_RD_DIVISOR if rd_divisor is None else rd_divisor
    return path_in, conv_groups, make_divisible(out_channels * ratio, divisor=divisor)


def split_paths(x: jax.Array, paths: int, split_input: bool) -> list[jax.Array]:
    """Each branch's input: ``x`` itself, or with ``split_input`` its m-th of M equal channel chunks."""
    return jnp.split(x, paths, axis=-1) if split_input else [x] * paths


def path_logits(logits: jax.Array, paths: int) -> jax.Array:
    """``fc_select``'s branch-major logits ``(..., M*C)`` (channel ``m*C + c``) as ``(..., C, M)``."""
    *lead, width = logits.shape
    return jnp.moveaxis(logits.reshape(*lead, paths, width // paths), -2, -1)


def select_kernels(branches: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a = softmax over m of logits``, ``y = sum_m a_m * U_m``. Returns ``(y, a)``.

    ``branches``: the stacked ``U_m``, ``(N, H, W, C, M)``; ``logits``: ``(N, 1, 1, C, M)``.
    """
    weights = softmax_in_float32(logits)  # the map, float32; the sum in the logits' dtype
    return jnp.sum(weights.astype(logits.dtype) * branches, axis=-1), weights


class SKConvNormAct(nn.Module):
    """One branch, timm's ``ConvNormAct``: k x k conv (no bias, timm's padding), BN, ReLU; children ``conv``, ``bn``."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    dtype: Any = None
    axis_name: str | None = BATCH_AXIS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        k, pad = self.kernel_size, conv_padding(self.kernel_size, self.stride, self.dilation)
        u = nn.Conv(
            self.features,
            (k, k),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            kernel_dilation=self.dilation,
            feature_group_count=self.groups,
            use_bias=False,
            dtype=self.dtype,
            conv_general_dilated=grouped_conv,
            name="conv",
        )(x)
        return nn.relu(block_batch_norm(self, train, "bn")(u))


class PointwiseConv(nn.Module):
    """A 1x1 conv without bias on pooled ``(N, 1, 1, C)`` features, as a matrix product: the HWIO kernel ``(1, 1,
    C, features)`` of ``nn.Conv`` (PyTorch's ``Conv2d(C, features, 1, bias=False)`` weight, transposed), computed
    by ``dot_general`` (no convolution is traced: grouped and dense convs stay the branches' own)."""

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features))
        x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
        return jnp.dot(x, kernel[0, 0])


class SKAttn(nn.Module):
    """The fuse and select steps, timm's ``SelectiveKernelAttn``: stacked branches ``(N, H, W, C, M)`` -> logits
    ``(N, 1, 1, C, M)``; children ``fc_reduce`` (1x1 conv C -> d, no bias), ``bn`` (then ReLU), ``fc_select``
    (1x1 conv d -> M*C, no bias, branch-major outputs)."""

    hidden: int
    dtype: Any = None
    axis_name: str | None = BATCH_AXIS

    @nn.compact
    def __call__(self, branches: jax.Array, train: bool = False) -> jax.Array:
        channels, paths = branches.shape[-2:]
        s = jnp.mean(jnp.sum(branches, axis=-1), axis=(1, 2), keepdims=True)  # (N, 1, 1, C)
        z = PointwiseConv(self.hidden, self.dtype, name="fc_reduce")(s)
        z = nn.relu(block_batch_norm(self, train, "bn")(z))
        logits = PointwiseConv(paths * channels, self.dtype, name="fc_select")(z)
        return path_logits(logits, paths)


class SelectiveKernelAttention(nn.Module):
    """SK: grouped 3x3 branches (one per dilation), fused by GAP and an FC, selected by a softmax per channel.

    NHWC in; with the defaults the same shape out (``out_channels``, ``stride``: timm's ``SelectiveKernel``
    as a conv, see the module's docstring). ``train`` selects batch statistics. Sows the branch weights
    ``(N, 1, 1, C_out, M)`` as ``intermediates/attention``.
    """

    dilations: tuple[int, ...] = DEFAULT_DILATIONS
    groups: int = 32
    reduction: int = 16
    min_channels: int = 32  # the paper's L
    # timm's SelectiveKernel options (see the module's docstring); the defaults keep attnjax's block.
    out_channels: int | None = None  # None: the input's channels
    kernel_size: int | tuple[int, ...] = ()  # (): 3x3 branches at `dilations`; else timm's kernel_size
    stride: int = 1
    dilation: int = 1
    keep_3x3: bool = True
    split_input: bool = False
    rd_ratio: float | None = None  # any rd_* given: timm's width rule (rd_ratio 1/16, rd_divisor 8 by default)
    rd_channels: int | None = None
    rd_divisor: int | None = None
    dtype: Any = None
    axis_name: str | None = BATCH_AXIS  # batch-norm synchronisation axis (Flax's), used where bound; set by the host

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        who = type(self).__name__
        check_nhwc(x, who)
        if self.out_channels is not None and self.out_channels < 1:
            raise InputError(
                f"{who}: out_channels must be >= 1 or None (the input's channels), got {self.out_channels}"
            )
        if self.stride < 1:
            raise InputError(f"{who}: stride must be >= 1, got {self.stride}")
        branches_spec = sk_branches(self.kernel_size, self.dilations, self.dilation, self.keep_3x3, who)
        in_channels = x.shape[-1]
        out_channels = self.out_channels or in_channels
        paths = len(branches_spec)
        _, groups, hidden = sk_widths(
            in_channels,
            out_channels,
            paths,
            groups=self.groups,
            split_input=self.split_input,
            reduction=self.reduction,
            min_channels=self.min_channels,
            rd_ratio=self.rd_ratio,
            rd_channels=self.rd_channels,
            rd_divisor=self.rd_divisor,
            who=who,
        )

        inputs = split_paths(x, paths, self.split_input)
        branches = []
        for m, (k, d) in enumerate(branches_spec):
            path = SKConvNormAct(out_channels, k, self.stride, d, groups, self.dtype, self.axis_name, name=f"paths_{m}")
            branches.append(path(inputs[m], train))
        branches = jnp.stack(branches, axis=-1)  # (N, H', W', C_out, M)
        logits = SKAttn(hidden, self.dtype, self.axis_name, name="attn")(branches, train)
        y, weights = select_kernels(branches, logits)
        sow_map(self, "attention", weights)
        return y
