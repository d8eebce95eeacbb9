"""Gather-Excite: gather context over a spatial extent, excite every position with a gate from it.

Paper: Jie Hu, Li Shen, Samuel Albanie, Gang Sun and Andrea Vedaldi (2018), "Gather-Excite: Exploiting
Feature Context in Convolutional Neural Networks", NeurIPS.

What it computes, for NHWC ``x`` with C channels and extent ratio e (``extent``; 0 = global)::

    g = gather(x)                          (N, h, w, C): h = ceil(H / e), w = ceil(W / e); (N, 1, 1, C) if global
    t = mlp(g)  if use_mlp  else  g        1x1 convs C -> C/r -> C with a ReLU (r = 16), at each gathered position
    s = sigmoid(interp(t))                 nearest-neighbour back to (H, W); a global t broadcasts
    y = x * s

The gather, parameter-free (``extra_params=False``)::

    global:  g = mean over (H, W) of x
    e >= 2:  g = average pooling, window 2e - 1, stride e, padding e - 1, padded positions not counted
             (g[i, j] averages the positions within e - 1 rows and columns of (i e, j e))

and with parameters (``extra_params=True``)::

    global:  g = BN(sum_{h,w} k[h, w, c] x[h, w, c])      one depthwise conv whose kernel covers the map
    e = 2^n: g = BN(dw_n(... relu(BN(dw_1(x))) ...))       n depthwise 3x3 convs, stride 2, padding 1

The paper's variants, as timm's options map them: GE-θ- (no parameters) is ``extra_params=False,
use_mlp=False``; GE-θ (parametric gather) is ``extra_params=True, use_mlp=False``; GE-θ+ is
``extra_params=True, use_mlp=True``. ``interp`` is nearest neighbour, as PyTorch's ``F.interpolate``
default: output row i takes gathered row ``floor(i h / H)``.

Sown map: ``intermediates/attention``, the gate ``s`` as it multiplies ``x``: (N, 1, 1, C) for the global
extent, (N, H, W, C) for a finite one; in (0, 1).

Maps no larger than the extent: the gather never fails. Pooling windows are clipped to the map, so an
H x W map with H, W <= e gathers to 1 x 1, the global mean (a finite extent then equals the global
extent); the stride-2 convs take any map to ceil(H/2) x ceil(W/2), down to 1 x 1 (a 1 x 1 map: only the
kernel's centre sees it). ``extra_params=True`` with the global extent makes a kernel of the map's size,
so the block then accepts only maps of the size it was initialised on (others raise an ``InputError``).

Batch norms (``extra_params=True`` only) are ``attnjax.layers.batch_norm(train)``: batch statistics when
``train`` (synchronised across devices under pmap), running averages otherwise.

Choices and deviations:

- Defaults are timm's ``GatherExcite`` as ``create_attn('ge')`` builds it: ``extent=0``, ``extra_params=False``,
  ``use_mlp=True``. That is squeeze-and-excitation (global pool, MLP, sigmoid), as timm notes; it is not one
  of the paper's named variants (GE-θ- has no MLP). Choose ``extent`` and the other options for the paper's.
- Where the paper is silent and timm decides: the average pooling's window 2e - 1 with padding e - 1 and
  padded positions not counted; a BN after every gather conv and a ReLU between them; the extent must be
  even (timm's assertion). With ``extra_params=True`` a finite extent must moreover be a power of two,
  since it sets the number of stride-2 convs (timm silently takes ``int(log2(e))`` convs for e = 6).
- No biases on the gather convs (as timm's, ``create_conv2d``'s default): each is followed by a BN.
- The global gather with parameters is the paper's: a depthwise conv without padding whose kernel is the
  map's size, giving one value per channel. timm builds that conv with 'same' padding ((k - 1) // 2), which
  gives an H x W output whose positions each see part of the map, not a global gather.
- MLP width ``reduced_channels(C, r) = max(C // r, min(C, 8))`` as attnjax's SE, not timm's
  ``max(1, round(C / 16))`` (8 against 4 at C = 64); they agree for C >= 128 up to rounding (timm rounds,
  attnjax floors). timm's rule is an option (below).
- Nearest-neighbour indices are computed exactly in integers; PyTorch computes the scale in float32, which
  differs for rare sizes (for example H = 122 with e = 8: rounding moves one row).

timm's options (``timm/layers/gather_excite.py``, ``create_attn('ge')`` is this block), under timm's names:

- ``rd_ratio``, ``rd_channels``, ``rd_divisor``: timm's MLP width instead of ``reduction``'s (giving both is
  an error): ``rd_channels`` if given, else C * ``rd_ratio`` (default timm's 1/16) rounded to the nearest
  multiple of ``rd_divisor`` (default 1), at least one (:func:`attnjax.blocks.primitives.bottleneck_width`);
- ``act_layer``: the MLP's activation and the one between the gather convs, by timm's name (``relu``,
  default; :data:`attnjax.blocks.primitives.ACTIVATIONS`); ``gate_layer``: ``sigmoid`` (default) or
  ``hard_sigmoid``;
- ``add_maxpool``: timm's experimental gather ``0.5 avg + 0.5 max``: the global mean and max, or for a finite
  extent the average pooling above and a max pooling over the same windows (window 2e - 1, stride e,
  padding e - 1, padded positions never the max). Only for the parameter-free gather: with
  ``extra_params=True`` timm silently ignores it, attnjax refuses it.

timm's ``norm_layer`` is not offered (the gather's BNs are always there, timm's default). With
``rd_divisor=1`` (or any timm option) the block has timm's parameters and output; timm 1.0.29's own
``GatherExcite`` fails to build (it passes its ``device``/``dtype`` keys as positional arguments, ``*dd``),
so the parity test (tests/blocks/test_ge.py) runs timm's code with that call bug bypassed.

Batch-norm running variance: the running averages take in the biased batch variance (Flax's convention);
PyTorch's ``BatchNorm2d`` takes in the unbiased one, n/(n-1) times larger, n being the values per
channel in the batch. Outputs agree with PyTorch, but running variances imported from or exported to
PyTorch differ by up to n/(n-1): ``gather_0_bn`` (extent 0) sees (N, 1, 1, C) maps, so n = N, 2x for a
batch of 2; ``gather_{i}_bn`` has n = N times the size of its strided map. Convert them with
``attnjax.layers.torch_running_var`` and ``flax_running_var``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from attnjax.blocks.primitives import (
    activation_function,
    block_batch_norm,
    bottleneck_width,
    excitation_mlp,
    gate_function,
    global_avg_pool,
    global_max_pool,
    sow_map,
)
from attnjax.layers import BATCH_AXIS
from attnjax.validate import InputError, check_nhwc


def gather_conv_count(extent: int, extra_params: bool) -> int:
    """How many gather convs the options make (0 without parameters), after checking ``extent``."""
    if extent != 0 and (extent < 2 or extent % 2):
        raise InputError(f"extent must be 0 (global) or an even number >= 2 (the paper uses 2, 4 and 8), got {extent}")
    if not extra_params:
        return 0
    if extent == 0:
        return 1
    if extent & (extent - 1):
        raise InputError(
            f"with extra_params=True the extent sets the number of stride-2 convs, log2(extent), so it must be "
            f"a power of two (2, 4, 8, ...); got {extent}"
        )
    return extent.bit_length() - 1


def _window_counts(size: int, extent: int) -> np.ndarray:
    """Positions of [0, size) inside each pooling window: window i covers [i e - (e-1), i e + (e-1)]."""
    starts = np.arange((size - 1) // extent + 1) * extent
    return np.minimum(size - 1, starts + extent - 1) - np.maximum(0, starts - extent + 1) + 1


def average_gather(x: jax.Array, extent: int) -> jax.Array:
    """The parameter-free gather: the global mean (``extent=0``, (N, 1, 1, C)), else average pooling with
    window 2e - 1, stride e and padding e - 1, averaging only the positions inside the map:
    (N, ceil(H/e), ceil(W/e), C)."""
    if extent == 0:
        return global_avg_pool(x)
    window, pad = 2 * extent - 1, extent - 1
    sums = jax.lax.reduce_window(
        x,
        np.zeros((), x.dtype),  # a constant: JAX then uses its differentiable windowed sum
        jax.lax.add,
        (1, window, window, 1),
        (1, extent, extent, 1),
        ((0, 0), (pad, pad), (pad, pad), (0, 0)),
    )
    counts = np.outer(_window_counts(x.shape[1], extent), _window_counts(x.shape[2], extent))
    return sums / jnp.asarray(counts[None, :, :, None], x.dtype)


def max_gather(x: jax.Array, extent: int) -> jax.Array:
    """The max over :func:`average_gather`'s windows: the global max (``extent=0``), else max pooling with window
    2e - 1, stride e and padding e - 1 (padding never the max). timm's experimental ``add_maxpool`` half."""
    if extent == 0:
        return global_max_pool(x)
    window, pad = 2 * extent - 1, extent - 1
    return jax.lax.reduce_window(
        x,
        np.array(-np.inf, x.dtype),  # the identity of max: JAX then uses its differentiable windowed max
        jax.lax.max,
        (1, window, window, 1),
        (1, extent, extent, 1),
        ((0, 0), (pad, pad), (pad, pad), (0, 0)),
    )


def gather(x: jax.Array, extent: int, add_maxpool: bool = False) -> jax.Array:
    """The parameter-free gather: :func:`average_gather`, or with ``add_maxpool`` timm's ``0.5 avg + 0.5 max``."""
    g = average_gather(x, extent)
    return 0.5 * g + 0.5 * max_gather(x, extent) if add_maxpool else g


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise cross-correlation, zero padding, no bias: ``kernel`` (kh, kw, C) acts on each channel alone.

    ``out[n, i, j, c] = sum_{a,b} kernel[a, b, c] * xp[n, i s + a, j s + b, c]``, xp the padded ``x``;
    out is (N, (H + 2p - kh) // s + 1, (W + 2p - kw) // s + 1, C). Written as kh*kw strided slices.
    """
    kh, kw = kernel.shape[:2]
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = (padded.shape[1] - kh) // stride + 1
    wo = (padded.shape[2] - kw) // stride + 1
    return sum(
        kernel[a, b] * padded[:, a : a + stride * (ho - 1) + 1 : stride, b : b + stride * (wo - 1) + 1 : stride]
        for a in range(kh)
        for b in range(kw)
    )


def global_depthwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The depthwise conv whose (H, W, C) kernel covers the whole map, no padding: (N, 1, 1, C)."""
    return jnp.sum(x * kernel, axis=(1, 2), keepdims=True)


def nearest_resize(t: jax.Array, height: int, width: int) -> jax.Array:
    """Nearest-neighbour resize of (N, h, w, C) to (N, height, width, C), PyTorch's 'nearest' rule:
    output row i takes input row ``floor(i h / height)`` (exactly, in integers), columns alike."""
    rows = np.arange(height) * t.shape[1] // height
    cols = np.arange(width) * t.shape[2] // width
    return t[:, rows][:, :, cols]


def excite(x: jax.Array, t: jax.Array, global_extent: bool, gate=jax.nn.sigmoid) -> tuple[jax.Array, jax.Array]:
    """``s = sigmoid(interp(t))`` (or ``gate``), ``y = x * s``; a global (N, 1, 1, C) ``t`` broadcasts.
    Returns ``(y, s)``."""
    if not global_extent:
        t = nearest_resize(t, x.shape[1], x.shape[2])
    s = gate(t)
    return x * s, s


class GatherExcite(nn.Module):
    """Gather-excite block: gather over the extent (pooling or depthwise convs), optional MLP, nearest
    interpolation back, sigmoid, times the input.

    NHWC in, same shape out; C is read from the input. ``train`` selects batch statistics in the gather's
    batch norms (``extra_params=True`` only). Sows the gate as ``intermediates/attention``: (N, 1, 1, C) for
    ``extent=0``, (N, H, W, C) otherwise.
    """

    extent: int = 0  # 0: global; else an even ratio (2, 4, 8)
    extra_params: bool = False  # depthwise convs (GE-θ) instead of average pooling (GE-θ-)
    use_mlp: bool = True  # 1x1 convs C -> C/r -> C on the gathered features (GE-θ+ with extra_params)
    reduction: int = 16
    rd_ratio: float | None = None  # timm's width rule instead of reduction's: C * rd_ratio (timm: 1/16), ...
    rd_channels: int | None = None  # ... or exactly rd_channels ...
    rd_divisor: int | None = None  # ... rounded to a multiple of rd_divisor (timm: 1)
    add_maxpool: bool = False  # timm's experimental 0.5 avg + 0.5 max gather (parameter-free gather only)
    act_layer: str = "relu"  # by timm's name: the MLP's and the gather convs' activation
    gate_layer: str = "sigmoid"  # or "hard_sigmoid"
    dtype: Any = None
    axis_name: str | None = BATCH_AXIS  # batch-norm synchronisation axis (Flax's), used where bound; set by the host

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_nhwc(x, type(self).__name__)
        num_convs = gather_conv_count(self.extent, self.extra_params)
        _, height, width, channels = x.shape
        widths = (self.reduction, self.rd_ratio, self.rd_channels, self.rd_divisor)
        hidden = bottleneck_width(channels, *widths, timm_ratio=1 / 16) if self.use_mlp else None
        activation = activation_function(self.act_layer)
        gate = gate_function(self.gate_layer)
        if self.add_maxpool and self.extra_params:
            raise InputError(
                "add_maxpool applies to the parameter-free gather only (extra_params=False); timm ignores it with "
                "extra_params=True"
            )

        # LeCun normal with fan-in kh * kw (a depthwise kernel sees one channel)
        init = nn.initializers.lecun_normal(in_axis=(), out_axis=-1)
        if not self.extra_params:
            g = gather(x, self.extent, self.add_maxpool)
        elif self.extent == 0:
            if self.has_variable("params", "gather_0"):
                built = self.get_variable("params", "gather_0").shape
                if built != (height, width, channels):
                    raise InputError(
                        f"GatherExcite(extent=0, extra_params=True) has a gather kernel of the map's size and was "
                        f"built for {built[0]}x{built[1]}x{built[2]} maps, got {height}x{width}x{channels}; use a "
                        f"finite extent (2, 4, 8) or extra_params=False for other sizes, or initialise it for this size"
                    )
            g, kernel = promote_dtype(x, self.param("gather_0", init, (height, width, channels)), dtype=self.dtype)
            g = block_batch_norm(self, train, "gather_0_bn")(global_depthwise(g, kernel))
        else:
            g = x
            for i in range(num_convs):
                g, kernel = promote_dtype(g, self.param(f"gather_{i}", init, (3, 3, channels)), dtype=self.dtype)
                g = block_batch_norm(self, train, f"gather_{i}_bn")(depthwise_conv(g, kernel, stride=2, padding=1))
                if i < num_convs - 1:
                    g = activation(g)
        if self.use_mlp:
            g = excitation_mlp(channels, hidden, self.dtype, activation=activation)(g)
        y, s = excite(x, g, global_extent=self.extent == 0, gate=gate)
        sow_map(self, "attention", s)
        return y
