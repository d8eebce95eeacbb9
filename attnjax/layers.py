"""Layers shared by the blocks and the models."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

# The mapped axis whose devices share batch-norm statistics unless told otherwise. attnjax's
# trainer maps its step over an axis of this name (attnjax.parallel.AXIS is this constant);
# the block library defines it so that it needs nothing from the trainer.
BATCH_AXIS = "batch"


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
    axis_name: str | None = BATCH_AXIS,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    dtype: Any = None,
    scale_init=nn.initializers.ones,
    name: str | None = None,
) -> nn.BatchNorm:
    """``nn.BatchNorm`` for NHWC maps: batch statistics when ``train``, running averages otherwise.

    ``axis_name`` is Flax's: in training inside a ``pmap``/``shard_map`` over that axis the
    batch statistics are averaged over its devices (synchronised batch norm), so N devices
    normalise exactly as one device would over the global batch and the running averages stay
    identical on every device. The default is :data:`BATCH_AXIS`, the axis attnjax's trainer
    maps over (:mod:`attnjax.parallel`), used only where it is bound: outside such a map (one
    device, ``jit``, evaluation) it is plain batch norm. ``None`` never synchronises. Call it
    inside a compact method: ``x = batch_norm(train)(x)``.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        scale_init=scale_init,
        axis_name=axis_name if train and axis_name and axis_is_bound(axis_name) else None,
        # Two-pass variance: Flax's default E[x^2] - E[x]^2 cancels badly in float32 when the
        # mean is large against the spread (seen as 1e-3 errors on small batches).
        use_fast_variance=False,
        name=name,
    )
