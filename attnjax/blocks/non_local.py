"""Non-local block, embedded Gaussian version.

Wang, Girshick, Gupta and He (2018), "Non-local Neural Networks", CVPR.

Every position attends to every position of the same image::

    theta, phi, g = conv1x1(x)                    C -> C' each, C' = max(C // 2, 1)
    f[i, j] = softmax_j(theta_i . phi_j)          over all P = H*W positions j
    y_i = sum_j f[i, j] g_j
    z = x + W_z(y)                                W_z: conv1x1 C' -> C

Sows the affinity ``f`` as ``intermediates/attention``, shape ``(N, H*W, H*W)``: row ``i``
is query position ``i`` in row-major ``(h, w)`` order, and every row sums to 1.

Deviations from the paper:
- W_z starts at zero (kernel and bias), so ``z = x`` exactly at initialisation. The paper
  gets the same identity start by putting a BN after W_z with gamma zero-initialised; we
  leave that BN out so that the block behaves the same in train and eval mode and does not
  depend on the batch (the paper's own alternative, without BN, also zero-initialises W_z).
- No subsampling of phi and g by max pooling (the paper's optional trick to cut the cost
  by 4): the affinity covers every position, and 1x1 inputs work.
- The bottleneck is ``reduced_channels(C, 2, min_channels=1)`` = ``max(C // 2, 1)``: the
  paper's C/2, floored at 1 as its ``inter_channels`` is (C = 1 would otherwise give 0).
  The module file is ``non_local.py`` because ``nonlocal`` is a Python keyword; the
  registry name is ``nonlocal``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.blocks.primitives import (
    reduced_channels,
    softmax_in_float32,
    sow_map,
)
from attnjax.validate import check_nhwc


def embedded_gaussian_affinity(theta: jax.Array, phi: jax.Array) -> jax.Array:
    """``f[n, i, j] = softmax_j(theta[n, i] . phi[n, j])`` for ``(N, P, C')`` inputs; returns ``(N, P, P)``.

    No 1/sqrt(C') scale: the paper's embedded Gaussian is ``exp(theta_i^T phi_j)`` normalised. Computed and
    returned in at least float32 (:mod:`attnjax.blocks.primitives.precision`).
    """
    return softmax_in_float32(jnp.einsum("nic,njc->nij", theta, phi))


def non_local(theta: jax.Array, phi: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``y_i = sum_j f[i, j] g_j`` with ``f = embedded_gaussian_affinity(theta, phi)``, on NHWC maps.

    ``theta``, ``phi``: ``(N, H, W, C')``; ``g``: ``(N, H, W, C_g)``. Returns ``(y, f)``
    with ``y`` of shape ``(N, H, W, C_g)`` and ``f`` of shape ``(N, H*W, H*W)``.
    """
    n, h, w, _ = g.shape

    def flat(a):
        return a.reshape(n, h * w, a.shape[-1])

    affinity = embedded_gaussian_affinity(flat(theta), flat(phi))
    y = jnp.einsum("nij,njc->nic", affinity.astype(jnp.result_type(theta, phi)), flat(g))
    return y.reshape(n, h, w, g.shape[-1]), affinity


class NonLocalAttention(nn.Module):
    """Embedded-Gaussian non-local block: ``x + W_z(softmax(theta phi^T) g)``, identity at initialisation.

    NHWC in, same shape out; C is read from the input. Sows the ``(N, H*W, H*W)`` affinity as
    ``intermediates/attention``.
    """

    reduction: int = 2
    min_channels: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        check_nhwc(x, type(self).__name__)
        channels = x.shape[-1]
        inner = reduced_channels(channels, self.reduction, self.min_channels)
        theta = nn.Conv(inner, (1, 1), dtype=self.dtype, name="theta")(x)
        phi = nn.Conv(inner, (1, 1), dtype=self.dtype, name="phi")(x)
        g = nn.Conv(inner, (1, 1), dtype=self.dtype, name="g")(x)
        y, affinity = non_local(theta, phi, g)
        sow_map(self, "attention", affinity)
        w_z = nn.Conv(
            channels,
            (1, 1),
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="w_z",
        )
        return x + w_z(y)
