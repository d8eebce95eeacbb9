"""Grouped convolution, traced as a dense conv with a block-diagonal kernel where that is faster (XLA:CPU).

:func:`grouped_conv` has the signature of ``jax.lax.conv_general_dilated``, so it drops into
``flax.linen.Conv(..., conv_general_dilated=grouped_conv)`` with the parameters unchanged: the
kernel stays the grouped ``(..., C_in / G, C_out)`` one. With the ``block_diagonal`` formulation
(see :mod:`attnjax.ops`) a conv with ``feature_group_count = G > 1`` is computed as an ungrouped
conv whose ``(..., C_in, C_out)`` kernel holds group g's weights in block (g, g) and zeros
elsewhere.

Why: on XLA:CPU (jaxlib 0.10.2) the kernel gradient of a grouped conv is lowered to a
base-dilated conv that runs on XLA's naive loop emitter: the SK block is 30-60x slower than
with the dense conv (76-80x on an AVX-512 Xeon). The dense conv does G times the FLOPs but
runs on the fast (Eigen) path, and its kernel gradient flows back to the grouped kernel
through the block selection. Values and gradients equal the grouped conv's (to float rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.ops import conv_with_formulation, formulation


def block_diagonal_kernel(kernel: jax.Array, groups: int, in_axis: int, out_axis: int) -> jax.Array:
    """The dense kernel of a grouped conv: ``kernel``'s ``in_axis`` widened G times, zero off the diagonal blocks.

    ``kernel`` has ``C_in / G`` entries on ``in_axis`` and ``C_out`` on ``out_axis`` (any layout, HWIO in
    Flax). The result has ``C_in`` on ``in_axis``: entry ``(i, o)`` is ``kernel[i mod C_in/G, o]`` when input
    channel i and output channel o are in the same group (``i // (C_in/G) == o // (C_out/G)``), else 0.
    """
    group_in, channels_out = kernel.shape[in_axis], kernel.shape[out_axis]
    group_out = channels_out // groups
    # (C_in, C_out) 0/1 mask of the diagonal blocks, laid out along in_axis and out_axis of the kernel.
    same_group = jnp.arange(groups * group_in)[:, None] // group_in == jnp.arange(channels_out)[None, :] // group_out
    tiled = jnp.concatenate([kernel] * groups, axis=in_axis) if groups > 1 else kernel
    shape = [1] * kernel.ndim
    shape[in_axis], shape[out_axis] = groups * group_in, channels_out
    mask = same_group if in_axis < out_axis else same_group.T
    return jnp.where(mask.reshape(shape), tiled, jnp.zeros((), kernel.dtype))


@conv_with_formulation
def grouped_conv(lhs, rhs, *, feature_group_count: int, batch_group_count: int, dimension_numbers, **arguments):
    """``lax.conv_general_dilated``, with grouped convs traced as dense block-diagonal convs where chosen.

    With ``formulation("grouped_conv") == "block_diagonal"`` and ``feature_group_count > 1`` (and no
    ``batch_group_count``) the conv runs ungrouped on :func:`block_diagonal_kernel` of ``rhs``; every
    other call is passed to ``lax.conv_general_dilated`` unchanged.
    """
    if feature_group_count == 1 or batch_group_count != 1 or formulation("grouped_conv") != "block_diagonal":
        return None
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    out_axis, in_axis = numbers.rhs_spec[0], numbers.rhs_spec[1]
    dense = block_diagonal_kernel(rhs, feature_group_count, in_axis, out_axis)
    return lax.conv_general_dilated(
        lhs, dense, feature_group_count=1, batch_group_count=1, dimension_numbers=dimension_numbers, **arguments
    )
