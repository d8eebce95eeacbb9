"""Triplet attention: three rotated spatial-attention gates over (C, W), (H, C) and (H, W).

Misra, Nalamada, Arasanipalai and Hou (2021), "Rotate to Attend: Convolutional Triplet
Attention Module", WACV.

Each branch rotates the tensor so that one axis is pooled away and the other two form a
plane, then gates the input with a map over that plane::

    Z-pool(t) = [max over the pooled axis, mean over the pooled axis]       2 channels
    gate = sigmoid(BN(conv7x7(Z-pool(rotate(x)))))                        1 channel, no conv bias
    y = (x * gate_cw + x * gate_hc + x * gate_hw) / 3                     each gate rotated back

The branches follow the official code (landskape-ai/triplet-attention), which for NCHW
input pools H out of ``x.permute(0, 2, 1, 3)`` (plane C x W), W out of
``x.permute(0, 3, 2, 1)`` (plane H x C) and C out of ``x`` itself (plane H x W); the plane's
first axis is the conv's row axis. Here, in NHWC:

    branch   pooled   conv plane (rows, cols)   sown name         sown shape
    cw       H        (C, W)                    "channel_width"   (N, 1, W, C)
    hc       W        (H, C)                    "height_channel"  (N, H, 1, C)
    hw       C        (H, W)                    "height_width"    (N, H, W, 1)

The sown gates are the sigmoid maps rotated back to NHWC, so each broadcasts against the
input. Parameters are named ``{branch}_conv`` and ``{branch}_bn``.

Follows the official code where the paper is silent: Z-pool stacks max before mean, the
7x7 conv has no bias and padding 3, and BN has epsilon 1e-5 and PyTorch momentum 0.01
(Flax momentum 0.99). No deviations from the paper.

On CPU the 7x7 convs (2 channels in, 1 out) are traced as one banded dot each
(:mod:`attnjax.ops.single_output_conv`), about 2x faster there for the block at small maps.
Same parameters, same values and gradients.

Batch-norm running variance: the running averages take in the biased batch variance (Flax's convention);
PyTorch's ``BatchNorm2d`` takes in the unbiased one, n/(n-1) times larger, n being the values per
channel in the batch. Outputs agree with PyTorch, but running variances imported from or exported to
PyTorch differ by up to n/(n-1): n = N*C*W for ``cw_bn``, N*H*C for ``hc_bn`` and N*H*W for ``hw_bn``
(their momentum is 0.99: pass ``momentum=0.99``). Convert them with ``attnjax.layers.torch_running_var``
and ``flax_running_var``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnjax.blocks.primitives import block_batch_norm, odd_size, sow_map
from attnjax.layers import BATCH_AXIS
from attnjax.ops.single_output_conv import single_output_conv
from attnjax.validate import check_nhwc

# For each branch, the NHWC permutation that puts the conv plane (rows, cols) at axes 1, 2
# and the pooled axis last.
ROTATIONS = {
    "cw": (0, 3, 2, 1),  # (N, C, W, H): pool H, plane C x W
    "hc": (0, 1, 3, 2),  # (N, H, C, W): pool W, plane H x C
    "hw": (0, 1, 2, 3),  # (N, H, W, C): pool C, plane H x W
}
SOWN_NAMES = {"cw": "channel_width", "hc": "height_channel", "hw": "height_width"}


def z_pool(x: jax.Array) -> jax.Array:
    """``[max_k x[..., k], mean_k x[..., k]]`` over the last axis, stacked as a last axis of size 2."""
    return jnp.stack([jnp.max(x, axis=-1), jnp.mean(x, axis=-1)], axis=-1)


def rotate(x: jax.Array, branch: str) -> jax.Array:
    """NHWC ``x`` transposed by ``ROTATIONS[branch]``: ``(N, rows, cols, pooled)``."""
    return jnp.transpose(x, ROTATIONS[branch])


def rotate_back(t: jax.Array, branch: str) -> jax.Array:
    """The inverse of :func:`rotate`: a ``(N, rows, cols, 1)`` gate becomes an NHWC gate that broadcasts against x."""
    return jnp.transpose(t, tuple(np.argsort(ROTATIONS[branch])))


def triplet_combine(x: jax.Array, gates: list[jax.Array]) -> jax.Array:
    """``y = mean_b (x * gate_b)`` over the branches' NHWC gates (each broadcasts against ``x``)."""
    return sum(x * gate for gate in gates) / len(gates)


class TripletAttention(nn.Module):
    """Triplet attention: Z-pool, 7x7 conv, BN and sigmoid on three rotations of x; the gated inputs averaged.

    NHWC in, same shape out; C is read from the input. ``train`` selects batch statistics.
    Sows the three gates as ``intermediates/channel_width`` ``(N, 1, W, C)``,
    ``intermediates/height_channel`` ``(N, H, 1, C)`` and ``intermediates/height_width``
    ``(N, H, W, 1)``. ``no_spatial=True`` drops the (H, W) branch, as in the official code.
    """

    kernel_size: int = 7
    no_spatial: bool = False
    dtype: Any = None
    axis_name: str | None = BATCH_AXIS  # batch-norm synchronisation axis (Flax's), used where bound; set by the host

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        who = type(self).__name__
        check_nhwc(x, who)
        odd_size(self.kernel_size, "kernel_size", who, "so that the gate keeps the map's size; the paper uses 7")
        pad = (self.kernel_size - 1) // 2
        gates = []
        for branch in ("cw", "hc") if self.no_spatial else ("cw", "hc", "hw"):
            t = nn.Conv(
                1,
                (self.kernel_size, self.kernel_size),
                padding=((pad, pad), (pad, pad)),
                use_bias=False,
                dtype=self.dtype,
                conv_general_dilated=single_output_conv,
                name=f"{branch}_conv",
            )(z_pool(rotate(x, branch)))
            t = block_batch_norm(self, train, f"{branch}_bn", momentum=0.99)(t)
            gate = rotate_back(jax.nn.sigmoid(t), branch)
            sow_map(self, SOWN_NAMES[branch], gate)
            gates.append(gate)
        return triplet_combine(x, gates)
