"""Why attnjax's pmap keeps the train state unmapped: step time of three ways to run one step.

- ``pmap stacked``: the classic Flax pattern, state replicated as (num_devices, ...) arrays
  (``flax.jax_utils.replicate``), ``in_axes=0``/``out_axes=0``;
- ``pmap unmapped``: attnjax's ``parallel.pmap_step``, state as one fully replicated array,
  ``in_axes=(None, 0)``/``out_axes=None``;
- ``jit``: plain ``jax.jit(train_step)`` on one device, the floor.

All three donate the state and alternate step by step; medians of the timed steps.

    python experiments/bench_pmap_state.py                       # 1 device
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python experiments/bench_pmap_state.py
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import jax_utils

from attnjax import models, xla_options
from attnjax.train import create_train_state, parallel, train_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    xla_options.configure_xla_flags()  # as the CLI does, before JAX starts: pmap's only route to the options

    devices = jax.local_devices()
    shape = (args.size, args.size, 3)
    state = create_train_state(
        jax.random.key(0), models.create("attention_net", num_classes=10, block="seed"), shape, 1e-3
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(0, 1, (args.batch_size, *shape)).astype(np.float32),
        "label": rng.integers(0, 10, args.batch_size).astype(np.int32),
    }
    sharded = parallel.put_on_devices(batch, devices)
    stacked = jax.pmap(
        functools.partial(train_step, axis_name=parallel.AXIS),
        axis_name=parallel.AXIS,
        devices=devices,
        donate_argnums=0,
    )
    runs = {
        "pmap stacked": (stacked, jax_utils.replicate(jax.tree.map(jnp.array, state), devices), sharded),
        "pmap unmapped": (
            parallel.pmap_step(train_step, devices, donate_state=True),
            parallel.replicate(state, devices),
            sharded,
        ),
        "jit (1 device)": (
            jax.jit(train_step, donate_argnums=0, compiler_options=xla_options.compiler_options() or None),
            jax.tree.map(jnp.array, state),
            jax.device_put(batch),
        ),
    }
    current = {name: run[1] for name, run in runs.items()}
    times = {name: [] for name in runs}
    for i in range(args.warmup + args.steps):
        for name, (step, _, data) in runs.items():
            start = time.perf_counter()
            current[name], metrics = step(current[name], data)
            jax.block_until_ready(metrics)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    floor = statistics.median(times["jit (1 device)"])
    print(
        f"jax {jax.__version__}, {len(devices)} {devices[0].platform} device(s), AttentionNet + seed, "
        f"{args.size}x{args.size}x3, global batch {args.batch_size}"
    )
    for name, t in times.items():
        print(f"{name:>15}: {statistics.median(t) * 1e3:7.1f} ms/step  ({statistics.median(t) / floor:.2f}x jit)")


if __name__ == "__main__":
    main()
