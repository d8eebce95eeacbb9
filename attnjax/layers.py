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

    Running variance: like every Flax ``BatchNorm``, the running average takes in the *biased*
    batch variance (divided by n, the number of values per channel in the batch: N*H*W, or N
    where the map is 1 x 1); PyTorch's ``BatchNorm2d`` takes in the unbiased one (divided by
    n - 1), n/(n-1) times larger. Normalised outputs agree, in training (both normalise with the
    biased variance) and in evaluation (given the same stored statistics), but running variances
    trained in the two frameworks differ by up to n/(n-1): 2x for a channel branch over a batch
    of 2. Convert them with :func:`torch_running_var` and :func:`flax_running_var`.
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


def torch_running_var(flax_var, count: int, *, steps: int | None = None, momentum: float = 0.9, initial=1.0):
    """The running variance PyTorch's ``BatchNorm`` would hold where Flax's holds ``flax_var``.

    Flax averages the biased batch variances ``b_k`` (divided by ``count``, the values per channel
    in each batch: N*H*W), PyTorch the unbiased ``b_k * count / (count - 1)``; both mix them in
    with the same momentum (Flax's ``momentum`` 0.9 is PyTorch's 0.1) from the same start. After
    ``steps`` training steps on batches of ``count`` values per channel, from ``initial`` (1, a
    fresh batch norm's, in both)::

        flax  = m^t initial + (1 - m) sum_k m^(t-k) b_k
        torch = m^t initial + count / (count - 1) * (flax - m^t initial)

    That is exact with ``steps`` (PyTorch's ``num_batches_tracked``). ``steps=None`` is the
    long-run limit, where the start has faded: ``flax * count / (count - 1)``. Elementwise; works
    on NumPy and JAX arrays. :func:`flax_running_var` is the inverse.
    """
    start = 0.0 if steps is None else momentum**steps * initial
    return start + count / (count - 1) * (flax_var - start)


def flax_running_var(torch_var, count: int, *, steps: int | None = None, momentum: float = 0.9, initial=1.0):
    """The running variance Flax's ``BatchNorm`` would hold where PyTorch's holds ``torch_var``.

    The inverse of :func:`torch_running_var` (same arguments): ``start + (count - 1) / count *
    (torch_var - start)``, ``start = momentum**steps * initial`` (0 when ``steps`` is None).
    """
    start = 0.0 if steps is None else momentum**steps * initial
    return start + (count - 1) / count * (torch_var - start)


def layer_norm(
    *,
    epsilon: float = 1e-5,
    dtype: Any = None,
    reduction_axes: int | tuple[int, ...] = -1,
    feature_axes: int | tuple[int, ...] = -1,
    name: str | None = None,
) -> nn.LayerNorm:
    """``nn.LayerNorm`` with the two-pass variance: every block's LayerNorm, robust in float32.

    Normalises over ``reduction_axes`` (the channels by default) with a learned scale and bias
    on ``feature_axes``. The variance is ``mean((t - mean(t))^2)``, not Flax's default
    ``E[t^2] - E[t]^2``: the latter cancels in float32 when the mean is large against the spread
    (its error grows as eps * (mean / spread)^2, 1e-3 at a ratio of 70 and O(1) at 2,000, where
    the two-pass error grows as eps * mean / spread, as PyTorch's does). ``epsilon`` defaults to
    PyTorch's 1e-5 (Flax's is 1e-6). Call it inside a compact method: ``t = layer_norm()(t)``.
    """
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        reduction_axes=reduction_axes,
        feature_axes=feature_axes,
        use_fast_variance=False,
        name=name,
    )
