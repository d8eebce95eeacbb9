"""A KxK conv with a few input channels and one output channel, traced as one banded dot where that is faster.

:func:`single_output_conv` has the signature of ``jax.lax.conv_general_dilated``, so it drops into
``flax.linen.Conv(1, (7, 7), ..., conv_general_dilated=single_output_conv)`` with the parameters
unchanged. It is meant for the spatial gates of triplet attention and CBAM: 7x7 convs from 2
pooled channels to 1.

With the ``banded`` formulation (see :mod:`attnjax.ops`) the conv of a zero-padded input
``xp`` (N, H + K - 1, W + K - 1, C) with an HWIO kernel ``k`` (K, K, C, 1) is written as::

    rows[n, h, a, j, c] = xp[n, h + a, j, c]                    the K row shifts, (N, H, K, W + K - 1, C)
    band[a, j, c, w]    = k[a, j - w, c, 0] if 0 <= j - w < K   else 0, (K, W + K - 1, C, W)
    y[n, h, w, 0]       = sum_{a, j, c} rows[n, h, a, j, c] * band[a, j, c, w]

a single dot over (K, W + K - 1, C). Why: XLA:CPU runs such convs (C_in = 2, C_out = 1) and
their gradients slowly on both of its conv paths, while the dot is one matmul with W outputs
per row; it does (W + K - 1) / K times the conv's FLOPs, a good trade for the narrow maps
these blocks see.

Only the case it is meant for is reformulated: 2 spatial dims in NHWC / HWIO / NHWC layout,
one output feature, stride 1, no input or kernel dilation, no groups, explicit padding that
keeps the size (``lo + hi = K - 1`` on each axis), and a map at most ``MAX_WIDTH`` columns wide
(the band's cost grows with W; beyond that the conv is faster). Every other call goes to
``lax.conv_general_dilated`` unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.ops import conv_with_formulation, formulation

# The widest map (output columns) traced as a band. The dot does (W + K - 1) / K times the conv's
# FLOPs: on XLA:CPU (2 cores, K = 7, C = 2, fwd+bwd) it is ~2x faster than the conv up to W = 128,
# even at W = 256, and 2-3x slower at W = 512 (triplet's (H, C) plane at C = 512).
MAX_WIDTH = 128
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def banded_matrix(kernel: jax.Array, width: int) -> jax.Array:
    """``band[a, j, c, w] = kernel[a, j - w, c, 0]`` for ``0 <= j - w < K``, else 0: shape (K, width + K - 1, C, width).

    ``kernel`` is HWIO ``(K_h, K, C, 1)``. Built as a gather of the kernel's taps with static indices
    (one shifted copy of each kernel row per output column), so gradients flow back to the kernel
    as the matching scatter-add.
    """
    taps = kernel.shape[1]
    padded_width = width + taps - 1
    j = jnp.arange(padded_width)[:, None]
    tap = j - jnp.arange(width)[None, :]  # (width + K - 1, width): the kernel tap that column j meets at output w
    inside = (tap >= 0) & (tap < taps)
    gathered = jnp.take(kernel[..., 0], jnp.clip(tap, 0, taps - 1), axis=1)  # (K_h, width + K - 1, width, C)
    band = jnp.where(inside[None, :, :, None], gathered, jnp.zeros((), kernel.dtype))
    return jnp.transpose(band, (0, 1, 3, 2))


def _is_same_padding(padding, kernel_shape) -> bool:
    """Whether ``padding`` is explicit ``(lo, hi)`` pairs that keep each spatial size (``lo + hi = K - 1``)."""
    if isinstance(padding, str):
        return False  # "SAME" / "VALID": left to lax
    try:
        pairs = tuple(tuple(int(p) for p in pair) for pair in padding)
    except TypeError:
        return False
    return len(pairs) == len(kernel_shape) and all(
        len(pair) == 2 and min(pair) >= 0 and sum(pair) == k - 1 for pair, k in zip(pairs, kernel_shape, strict=True)
    )


def _handles(
    lhs,
    rhs,
    *,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
    **_,
) -> bool:
    """Whether the call is the one the banded formulation covers (see the module docstring)."""
    if lhs.ndim != 4 or rhs.ndim != 4 or (feature_group_count, batch_group_count) != (1, 1):
        return False
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _NHWC:
        return False
    ones = (1, 1)
    return (
        rhs.shape[3] == 1
        and rhs.shape[2] == lhs.shape[3]
        and tuple(window_strides) == ones
        and tuple(lhs_dilation or ones) == ones
        and tuple(rhs_dilation or ones) == ones
        and lhs.shape[2] <= MAX_WIDTH
        and _is_same_padding(padding, rhs.shape[:2])
    )


@conv_with_formulation
def single_output_conv(lhs, rhs, **arguments):
    """``lax.conv_general_dilated``, with a size-keeping one-output NHWC conv traced as one banded dot where chosen.

    The banded path is taken when ``formulation("single_output_conv") == "banded"`` and the call is
    the case described in the module docstring; otherwise this is ``lax.conv_general_dilated``.
    """
    if formulation("single_output_conv") != "banded" or not _handles(lhs, rhs, **arguments):
        return None
    return banded_conv(
        lhs,
        rhs,
        arguments["padding"],
        precision=arguments["precision"],
        preferred_element_type=arguments["preferred_element_type"],
    )


def banded_conv(lhs, rhs, padding, *, precision=None, preferred_element_type=None) -> jax.Array:
    """The banded formulation itself, unchecked: ``lhs`` NHWC, ``rhs`` HWIO with one output, explicit ``padding``."""
    taps_h = rhs.shape[0]
    height, width = lhs.shape[1], lhs.shape[2]
    padded = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    rows = jnp.stack([padded[:, a : a + height] for a in range(taps_h)], axis=2)  # (N, H, K, W + K - 1, C)
    y = jnp.einsum(
        "nhajc,ajcw->nhw",
        rows,
        banded_matrix(rhs, width),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return y[..., None]
