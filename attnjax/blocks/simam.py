"""SimAM: a parameter-free attention from the minimal energy of each neuron.

Yang, Zhang, Li and Xie (2021), "SimAM: A Simple, Parameter-Free Attention Module for
Convolutional Neural Networks", ICML.

Per image and channel, over the H*W positions, with n = H*W - 1::

    mu = mean(x)                       spatial mean
    d = (x - mu)^2
    v = sum(d) / n
    E_inv = d / (4 (v + lambda)) + 0.5     lambda = 1e-4
    y = x * sigmoid(E_inv)

A neuron that stands out from the rest of its channel (large d) gets a larger weight.
Sows ``sigmoid(E_inv)`` as ``intermediates/attention``, the input's shape ``(N, H, W, C)``.

Deviation from the paper: for 1x1 maps (H*W = 1) the paper's n = 0 makes ``v`` 0/0 = NaN.
We divide by ``max(n, 1)`` instead: there ``d = 0`` exactly, so ``E_inv = 0.5`` and
``y = x * sigmoid(0.5)``, the value the formula takes for any finite ``v`` when ``d = 0``.
For H*W > 1 nothing changes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.blocks.primitives import sow_map
from attnjax.validate import InputError, check_nhwc

SPATIAL_AXES = (1, 2)  # H and W of an NHWC array


def simam_energy(x: jax.Array, e_lambda: float = 1e-4) -> jax.Array:
    """Inverse energy ``E_inv = d / (4 (v + lambda)) + 0.5`` of NHWC ``x``, per image and channel.

    ``d = (x - mean_HW(x))^2`` and ``v = sum_HW(d) / max(H*W - 1, 1)``.
    """
    n = max(x.shape[1] * x.shape[2] - 1, 1)
    d = jnp.square(x - jnp.mean(x, axis=SPATIAL_AXES, keepdims=True))
    v = jnp.sum(d, axis=SPATIAL_AXES, keepdims=True) / n
    return d / (4 * (v + e_lambda)) + 0.5


def simam(x: jax.Array, e_lambda: float = 1e-4) -> tuple[jax.Array, jax.Array]:
    """``a = sigmoid(simam_energy(x, e_lambda))``, ``y = x * a``. Returns ``(y, a)``."""
    attention = jax.nn.sigmoid(simam_energy(x, e_lambda))
    return x * attention, attention


class SimAMAttention(nn.Module):
    """SimAM: ``x * sigmoid(E_inv)`` from each neuron's spatial energy; no parameters.

    NHWC in, same shape out. ``dtype``, if given, is the dtype in which the weights are
    computed. Sows the weights ``sigmoid(E_inv)`` (input's shape) as ``intermediates/attention``.
    """

    e_lambda: float = 1e-4
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        check_nhwc(x, type(self).__name__)
        if not self.e_lambda > 0:
            raise InputError(
                f"{type(self).__name__}: e_lambda must be > 0 (it keeps E_inv finite on constant channels), "
                f"got {self.e_lambda}; the paper uses 1e-4."
            )
        # The weights are computed in ``dtype``; the product with x promotes, as in the other blocks.
        attention = jax.nn.sigmoid(simam_energy(x if self.dtype is None else x.astype(self.dtype), self.e_lambda))
        sow_map(self, "attention", attention)
        return x * attention
