"""Overhead of attnjax's parallel wrappers against a plain single-device ``jax.jit`` of the same step.

Three ways to run ``train_step`` on the same device(s) and batch, alternating step by step
so that machine noise hits all alike; medians after warm-up:

- ``plain jit``: ``jax.jit(train_step, donate_argnums=0)`` on one device, no shardings;
- ``pmap``: ``parallel.wrap_step(..., "pmap")`` as the CLI runs it (``--parallel pmap``);
- ``jit+mesh``: ``parallel.wrap_step(..., "jit")`` (``--parallel jit``: Mesh, NamedSharding).

    python experiments/bench_parallel.py                          # 1 device: the overhead (goal <= 5%)
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python experiments/bench_parallel.py
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import numpy as np

from attnjax import models, xla_options
from attnjax.train import create_train_state, parallel, precision, train_step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="attention_net")
    parser.add_argument("--block", default="seed")
    parser.add_argument("--size", type=int, default=8, help="input H = W")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=list(precision.DTYPES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    xla_options.configure_xla_flags()  # as the CLI does, before JAX starts: pmap's only route to the options
    options = xla_options.compiler_options() or None

    shape = (args.size, args.size, args.channels)
    dtype = precision.compute_dtype(args.dtype)
    net = models.create(args.model, num_classes=10, block=args.block, dtype=dtype)
    state = create_train_state(jax.random.key(0), net, shape, 1e-3)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(0, 1, (args.batch_size, *shape)).astype(np.float32),
        "label": rng.integers(0, 10, args.batch_size).astype(np.int32),
    }
    step = functools.partial(train_step, dtype=dtype)
    devices = jax.devices()

    runners = {}
    plain_state = jax.device_put(jax.tree.map(np.asarray, jax.device_get(state)), devices[0])
    runners["plain jit"] = [
        jax.jit(step, donate_argnums=0, compiler_options=options),
        plain_state,
        jax.device_put(batch, devices[0]),
    ]
    for kind in parallel.KINDS:
        label = "pmap" if kind == "pmap" else "jit+mesh"
        wrapped = parallel.wrap_step(step, devices, kind, donate_state=True, compiler_options=options)
        runners[label] = [wrapped, parallel.replicate(state, devices), parallel.put_batch(batch, devices, kind)]

    times = {name: [] for name in runners}
    for i in range(args.warmup + args.steps):
        for name, runner in runners.items():
            fn, current, data = runner
            start = time.perf_counter()
            current, metrics = fn(current, data)
            jax.block_until_ready(metrics)
            runner[1] = current
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    base = statistics.median(times["plain jit"])
    print(
        f"jax {jax.__version__}, {len(devices)} {devices[0].platform} device(s), {args.model} + {args.block}, "
        f"{args.size}x{args.size}x{args.channels}, global batch {args.batch_size}, {args.dtype}, "
        f"median of {args.steps} alternating steps"
    )
    for name, values in times.items():
        median = statistics.median(values)
        images_per_second = args.batch_size / median
        print(
            f"  {name:>10}: {1e3 * median:8.2f} ms/step  {images_per_second:9,.0f} img/s {median / base:.3f}x plain jit"
        )


if __name__ == "__main__":
    main()
