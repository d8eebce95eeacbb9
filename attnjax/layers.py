"""Layers shared by the blocks and the models."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from attnjax.parallel import AXIS


def axis_is_bound(name: str) -> bool:
    """Whether ``name`` is a mapped axis here (inside ``pmap``/``shard_map`` over it)."""
    try:
        jax.lax.axis_size(name)
    except NameError:
        return False
    return True


def batch_norm(
    train: bool,
    *,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    dtype: Any = None,
    scale_init=nn.initializers.ones,
    name: str | None = None,
) -> nn.BatchNorm:
    """``nn.BatchNorm`` for NHWC maps: batch statistics when ``train``, running averages otherwise.

    In training under attnjax's ``pmap`` (:mod:`attnjax.parallel`) the batch statistics are
    averaged over the device axis (synchronised batch norm), so N devices normalise
    exactly as one device would over the global batch, and the running averages stay
    identical on every device. Elsewhere (one device, ``jit``) it is plain batch norm.
    Call it inside a compact method: ``x = batch_norm(train)(x)``.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        scale_init=scale_init,
        axis_name=AXIS if train and axis_is_bound(AXIS) else None,
        # Two-pass variance: Flax's default E[x^2] - E[x]^2 cancels badly in float32 when the
        # mean is large against the spread (seen as 1e-3 errors on small batches).
        use_fast_variance=False,
        name=name,
    )
