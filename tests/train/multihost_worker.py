"""One process of the multi-host test (tests/test_multihost.py): 3 float64 train steps on the digits.

    python tests/multihost_worker.py --kind pmap --num-processes 2 --process-id 0 --coordinator 127.0.0.1:PORT --out F

XLA_FLAGS gives each process its fake CPU devices; JAX_ENABLE_X64=1 is needed (float64, see test_parallel.py).
Process 0 writes the final parameters and the losses to ``--out`` (.npz).
"""

import argparse
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import data, models
from attnjax.train import create_train_state, parallel, train_step

STEPS, BATCH = 3, 64


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=parallel.KINDS, required=True)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.num_processes > 1:
        parallel.initialize_distributed(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )
    assert jax.process_count() == args.num_processes and jax.config.jax_enable_x64

    # bam has batch norm: its statistics must also be the global batch's across processes.
    net = models.create("attention_net", num_classes=10, block=os.environ.get("BLOCK", "bam"), dtype=jnp.float64)
    state = create_train_state(jax.random.key(0), net, (8, 8, 1), learning_rate=1e-3)
    state = state.replace(params=jax.tree.map(lambda p: p.astype(jnp.float64), state.params))
    state = state.replace(opt_state=state.tx.init(state.params))

    initial = jax.device_get(state.params)
    devices = parallel.devices_for(args.kind)
    step = parallel.wrap_step(train_step, devices, args.kind, donate_state=True)
    state = parallel.replicate(state, devices)
    batches = data.pipeline.train_batches(
        data.load("digits"),
        BATCH,
        seed=0,
        epoch=1,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    losses = []
    for batch in itertools.islice(batches, STEPS):
        batch = {"image": batch["image"].astype(np.float64), "label": batch["label"]}
        state, metrics = step(state, parallel.put_batch(batch, devices, args.kind))
        losses.append(float(metrics["loss"]))
    if jax.process_index() == 0:
        leaves = jax.tree.leaves(jax.device_get((state.params, state.batch_stats)))
        moved = max(
            float(np.abs(a - b).max())
            for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(initial), strict=True)
        )
        np.savez(args.out, *leaves, losses=np.array(losses), moved=moved)
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
