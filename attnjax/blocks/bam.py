"""BAM: channel and spatial branches summed into one 3-D gate, applied as a residual.

Paper: Jongchan Park, Sanghyun Woo, Joon-Young Lee and In So Kweon (2018),
"BAM: Bottleneck Attention Module", BMVC.

What it computes, for NHWC ``x`` with C channels, r = 16 and dilation d = 4::

    Mc = BN(MLP(avgpool(x)))                        (N, 1, 1, C); MLP: FC C -> C/r, BN, ReLU, FC -> C
    Ms = BN(conv1x1(g(g(g0(x)))))                   (N, H, W, 1)
         g0 = 1x1 conv C -> C/r, BN, ReLU;  g = 3x3 conv dilation d (padding d), BN, ReLU;  last conv -> 1
    M  = sigmoid(Mc + Ms)                           broadcast to (N, H, W, C)
    y  = x + x * M

Sown maps: ``intermediates/channel``, the branch output Mc (N, 1, 1, C), and ``intermediates/spatial``,
Ms (N, H, W, 1), both before the sigmoid (unbounded); ``intermediates/attention``, M (N, H, W, C), in (0, 1).

Every BN is ``attnjax.layers.batch_norm(train)``: batch statistics when ``train`` (synchronised across
devices under pmap), running averages otherwise. In training the channel branch normalises each
channel over the batch only, so it needs a batch of at least 2 images to carry information.

Deviations from the paper, and from the official code, which disagree:

- The paper's equations put a BN at the end of each branch (to put the two branches on one scale
  before the sum) and leave the hidden layers' activations unstated. The official code has BN + ReLU
  after every hidden layer but no final BNs. We use both: BN + ReLU after each hidden layer (without a
  nonlinearity the stacks collapse to linear maps) and the paper's final BNs.
- Fusion is the paper's sum, ``sigmoid(Mc + Ms)``; the official code multiplies the branches,
  ``sigmoid(Mc * Ms)``.
- Bottleneck width ``reduced_channels(C, r) = max(C // r, min(C, 8))`` for both branches, equal to the
  paper's C/r for C >= 128; the floor keeps small C working.

Batch-norm running variance: the running averages take in the biased batch variance (Flax's convention);
PyTorch's ``BatchNorm2d`` takes in the unbiased one, n/(n-1) times larger, n being the values per
channel in the batch. Outputs agree with PyTorch, but running variances imported from or exported to
PyTorch differ by up to n/(n-1): the channel branch's BNs see (N, 1, 1, .) maps, so n = N, 2x for a
batch of 2; the spatial branch's BNs have n = N*H*W. Convert them with
``attnjax.layers.torch_running_var`` and ``flax_running_var``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from attnjax.blocks.primitives import block_batch_norm, global_avg_pool, reduced_channels, sow_map
from attnjax.layers import BATCH_AXIS
from attnjax.validate import InputError, check_nhwc


def bam_attention(x: jax.Array, channel: jax.Array, spatial: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``M = sigmoid(channel + spatial)``, ``y = x + x * M``. Returns ``(y, M)``.

    ``channel`` (N, 1, 1, C) and ``spatial`` (N, H, W, 1) broadcast to the shape of ``x``.
    """
    gate = jax.nn.sigmoid(channel + spatial)
    return x + x * gate, gate


class BAM(nn.Module):
    """BAM block: y = x + x * sigmoid(Mc(x) + Ms(x)), with BN in both branches.

    NHWC in, same shape out; C is read from the input. ``train`` selects batch statistics in the
    batch norms; call ``apply(..., mutable=["batch_stats"])`` then to update the running averages.
    Sows ``intermediates/channel`` (N, 1, 1, C), ``intermediates/spatial`` (N, H, W, 1) and
    ``intermediates/attention`` (N, H, W, C).
    """

    reduction: int = 16
    dilation: int = 4
    dtype: Any = None
    axis_name: str | None = BATCH_AXIS  # batch-norm synchronisation axis (Flax's), used where bound; set by the host

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_nhwc(x, type(self).__name__)
        if self.dilation < 1:
            raise InputError(f"dilation must be >= 1 (the paper uses 4), got {self.dilation}")
        channels = x.shape[-1]
        hidden = reduced_channels(channels, self.reduction)

        def bn(name):
            return block_batch_norm(self, train, name)

        mc = nn.Dense(hidden, dtype=self.dtype, name="channel_reduce")(global_avg_pool(x))
        mc = nn.relu(bn("channel_reduce_bn")(mc))
        mc = nn.Dense(channels, dtype=self.dtype, name="channel_expand")(mc)
        mc = bn("channel_bn")(mc)

        ms = nn.Conv(hidden, (1, 1), dtype=self.dtype, name="spatial_reduce")(x)
        ms = nn.relu(bn("spatial_reduce_bn")(ms))
        d = self.dilation
        for i in range(2):
            ms = nn.Conv(
                hidden,
                (3, 3),
                kernel_dilation=(d, d),
                padding=((d, d), (d, d)),  # keeps H and W
                dtype=self.dtype,
                name=f"spatial_dilated_{i}",
            )(ms)
            ms = nn.relu(bn(f"spatial_dilated_{i}_bn")(ms))
        ms = nn.Conv(1, (1, 1), dtype=self.dtype, name="spatial_final")(ms)
        ms = bn("spatial_bn")(ms)

        y, gate = bam_attention(x, mc, ms)
        sow_map(self, "channel", mc)
        sow_map(self, "spatial", ms)
        sow_map(self, "attention", gate)
        return y
