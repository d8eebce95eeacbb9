"""Data parallelism: ``jax.pmap`` over the local devices, or ``jax.jit`` with shardings over all devices.

The step functions in :mod:`attnjax.train` are plain functions of ``(state, batch)`` that
take an optional ``axis_name``; this module applies the parallel wrapper outside them:

- ``pmap`` (the default): the step runs per device on its slice of the batch and averages
  over the named axis ``AXIS``; every process maps over its local devices.
- ``jit``: the step sees the whole global batch, sharded over a ``Mesh`` of all devices
  (``NamedSharding``) with the state replicated; XLA inserts the reductions.

Both give the single-device result. Multi-host: every process feeds only its own share of
the batch (:func:`put_batch`), and :func:`initialize_distributed` starts JAX's runtime.

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
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attnjax.layers import BATCH_AXIS
from attnjax.validate import InputError, check_divisible

AXIS = BATCH_AXIS  # the pmap axis over which gradients, metrics and batch-norm statistics are averaged
KINDS = ("pmap", "jit")


def _sharding(devices: Sequence[jax.Device], spec: PartitionSpec) -> NamedSharding:
    return _cached_sharding(tuple(devices), spec)


@functools.lru_cache(maxsize=32)
def _cached_sharding(devices: tuple[jax.Device, ...], spec: PartitionSpec) -> NamedSharding:
    # Cached: every batch is placed with it, and a Mesh is not free to build.
    return NamedSharding(Mesh(np.asarray(devices), (AXIS,)), spec)


def replicate(tree, devices: Sequence[jax.Device]):
    """A copy of ``tree`` on every device, as the replicated state of both step wrappers expects.

    Always a fresh copy built from host memory, so that a step that donates the replicated
    state leaves the caller's ``tree`` intact (in JAX 0.10 ``device_put(..., may_alias=False)``
    still shares the caller's buffer on the first device), and so that it also works when
    ``devices`` span several processes (every process passes the same ``tree``).
    """
    sharding = _sharding(devices, PartitionSpec())

    def put(x):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def devices_for(kind: str) -> list[jax.Device]:
    """The devices a step wrapper runs on: the local ones for ``pmap``, all processes' for ``jit``."""
    check_kind(kind)
    return list(jax.local_devices() if kind == "pmap" else jax.devices())


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InputError(f"unknown parallel wrapper {kind!r}; valid: {', '.join(KINDS)}")


def wrap_step(
    step: Callable,
    devices: Sequence[jax.Device],
    kind: str = "pmap",
    donate_state: bool = False,
    compiler_options: dict | None = None,
):
    """``step`` under ``kind`` (:func:`pmap_step` or :func:`jit_step`) over ``devices``.

    ``compiler_options`` reach XLA only under ``jit``: ``jax.pmap`` takes none, so for it the
    same options must be in ``XLA_FLAGS`` before JAX starts (see :mod:`attnjax.xla_options`).
    """
    check_kind(kind)
    if kind == "pmap":
        return pmap_step(step, devices, donate_state)
    return jit_step(step, devices, donate_state, compiler_options)


def jit_step(
    step: Callable, devices: Sequence[jax.Device], donate_state: bool = False, compiler_options: dict | None = None
) -> Callable:
    """``jax.jit`` of ``step(state, batch)`` with the batch sharded over ``devices`` and the state replicated.

    The step sees the global batch, so it needs no ``axis_name``: XLA partitions the
    computation and inserts the cross-device reductions (batch norm included).
    """
    replicated = _sharding(devices, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(replicated, _sharding(devices, PartitionSpec(AXIS))),
        out_shardings=replicated,
        donate_argnums=(0,) if donate_state else (),
        compiler_options=compiler_options or None,
    )


def pmap_step(step: Callable, devices: Sequence[jax.Device], donate_state: bool = False) -> Callable:
    """``jax.pmap`` of ``step(state, batch, axis_name=AXIS)`` over ``devices``.

    ``state`` is replicated, ``batch`` is split over the devices (see :func:`shard`), and
    the outputs come back replicated, as from a single device. ``step`` must reduce its
    outputs over ``AXIS`` (``pmean``/``psum``) so that they are the same on every device.
    With ``donate_state`` the input state's buffers are reused for the output state, so
    the caller must not read the old state after the call.

    With several processes ``devices`` must be this process's local devices: pmap then maps
    over every process's devices (given ``devices=`` it would only reduce within one process).
    """
    if jax.process_count() > 1:
        if set(devices) != set(jax.local_devices()):
            raise InputError("with several processes, pmap runs on all local devices of every process")
        devices = None
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


def put_batch(batch: dict[str, np.ndarray], devices: Sequence[jax.Device], kind: str = "pmap") -> dict:
    """This process's share of a global batch, placed for the ``kind`` step over ``devices``."""
    if kind == "pmap":
        return put_on_devices(batch, devices)
    sharding = _sharding(devices, PartitionSpec(AXIS))
    local = len(sharding.addressable_devices)
    check_divisible(len(next(iter(batch.values()))), local)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def to_devices(
    batches: Iterable[dict[str, np.ndarray]], devices: Sequence[jax.Device], ahead: int = 2, kind: str = "pmap"
) -> Iterator:
    """Put each batch on ``devices`` (see :func:`put_batch`) ``ahead`` batches before it is used.

    ``device_put`` is asynchronous, so the copies overlap the steps already dispatched.
    """
    batches = iter(batches)
    queue = collections.deque(put_batch(b, devices, kind) for b in itertools.islice(batches, ahead))
    while queue:
        yield queue.popleft()
        queue.extend(put_batch(b, devices, kind) for b in itertools.islice(batches, 1))


COORDINATOR_VARIABLE = "ATTNJAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_VARIABLE = "ATTNJAX_NUM_PROCESSES"
PROCESS_ID_VARIABLE = "ATTNJAX_PROCESS_ID"


def initialize_distributed(
    enable: bool = False,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Start JAX's multi-process runtime when asked; returns whether it was started.

    Asked by ``enable`` (on TPU pods and SLURM/Open MPI clusters JAX finds the rest itself),
    or by a coordinator address (then the process count and id are needed too); each
    argument left out is read from ``ATTNJAX_COORDINATOR_ADDRESS``, ``ATTNJAX_NUM_PROCESSES``
    and ``ATTNJAX_PROCESS_ID``.
    """
    coordinator_address = coordinator_address or os.environ.get(COORDINATOR_VARIABLE) or None
    if num_processes is None and os.environ.get(NUM_PROCESSES_VARIABLE):
        num_processes = int(os.environ[NUM_PROCESSES_VARIABLE])
    if process_id is None and os.environ.get(PROCESS_ID_VARIABLE):
        process_id = int(os.environ[PROCESS_ID_VARIABLE])
    if not (enable or coordinator_address):
        if num_processes is not None or process_id is not None:
            raise InputError("--num-processes/--process-id need --coordinator-address HOST:PORT (or --distributed)")
        return False
    if coordinator_address and (num_processes is None or process_id is None):
        raise InputError(
            "--coordinator-address needs --num-processes N and --process-id I (0 <= I < N) on every process"
        )
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise InputError(f"--process-id {process_id} must be in 0..{num_processes - 1}")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return True
