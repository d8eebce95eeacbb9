"""Data parallelism over local devices with ``jax.pmap``.

The step functions in :mod:`attnjax.train` are plain functions of ``(state, batch)`` that
take an optional ``axis_name``; this module applies the parallel wrapper outside them.

The batch is mapped over the devices (leading axis ``(num_devices, per_device, ...)``);
the train state and the step's outputs are not (``in_axes=None``, ``out_axes=None``): they
are single, fully replicated arrays. That is exact because the steps average gradients
and metrics over the device axis, so every device computes the same state. It is also
faster than the classic stacked ``(num_devices, ...)`` state: in JAX >= 0.8 ``pmap`` is
``jit(shard_map)``, which squeezes and re-expands a stacked state on every call, copying
the parameters and optimizer state (measured: 15-25% of an AttentionNet step on CPU).
"""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attnjax.validate import check_divisible

AXIS = "batch"  # the pmap axis over which gradients and metrics are averaged


def _sharding(devices: Sequence[jax.Device], spec: PartitionSpec) -> NamedSharding:
    return NamedSharding(Mesh(np.asarray(devices), (AXIS,)), spec)


def replicate(tree, devices: Sequence[jax.Device]):
    """A copy of ``tree`` on every device, as the unmapped state of :func:`pmap_step` expects.

    Always a copy, so that a step that donates the replicated state leaves the caller's
    ``tree`` intact. (``device_put(..., may_alias=False)`` is not enough: in JAX 0.10 a
    multi-device replicated result still shares the caller's buffer on the first device.)
    """
    sharding = _sharding(devices, PartitionSpec())
    return jax.tree.map(lambda x: jax.device_put(jnp.array(x, copy=True), sharding), tree)


def pmap_step(step: Callable, devices: Sequence[jax.Device], donate_state: bool = False) -> Callable:
    """``jax.pmap`` of ``step(state, batch, axis_name=AXIS)`` over ``devices``.

    ``state`` is replicated, ``batch`` is split over the devices (see :func:`shard`), and
    the outputs come back replicated, as from a single device. ``step`` must reduce its
    outputs over ``AXIS`` (``pmean``/``psum``) so that they are the same on every device.
    With ``donate_state`` the input state's buffers are reused for the output state, so
    the caller must not read the old state after the call.
    """
    return jax.pmap(
        functools.partial(step, axis_name=AXIS),
        axis_name=AXIS,
        devices=devices,
        in_axes=(None, 0),
        out_axes=None,
        donate_argnums=(0,) if donate_state else (),
    )


def shard(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
    """Split the leading (global batch) axis into ``(num_devices, per_device, ...)``."""
    size = len(next(iter(batch.values())))
    check_divisible(size, num_devices)
    return {k: v.reshape(num_devices, size // num_devices, *v.shape[1:]) for k, v in batch.items()}


def put_on_devices(batch: dict[str, np.ndarray], devices: Sequence[jax.Device]) -> dict[str, jax.Array]:
    """Split a global batch over ``devices``: device i holds rows ``[i*b, (i+1)*b)``, as pmap expects."""
    return jax.device_put(shard(batch, len(devices)), _sharding(devices, PartitionSpec(AXIS)))


def to_devices(batches: Iterable[dict[str, np.ndarray]], devices: Sequence[jax.Device], ahead: int = 2) -> Iterator:
    """Put each global batch on ``devices`` ``ahead`` batches before it is used.

    ``device_put`` is asynchronous, so the copies overlap the steps already dispatched.
    """
    batches = iter(batches)
    queue = collections.deque(put_on_devices(b, devices) for b in itertools.islice(batches, ahead))
    while queue:
        yield queue.popleft()
        queue.extend(put_on_devices(b, devices) for b in itertools.islice(batches, 1))
