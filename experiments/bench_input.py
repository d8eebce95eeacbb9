"""Input-pipeline throughput against the train step's consumption, side by side in one run.

Three figures for one dataset and global batch, in images/s:

- ``pipeline``: the training pipeline alone (attnjax.data.pipeline.train_batches, with the
  dataset's default augmentation, normalisation, and the transfer to the devices), no model;
- ``step``: the train step alone, fed one batch already on the devices (what the model
  can consume at most);
- ``fed``: the train step fed by the pipeline, as ``python -m attnjax.train`` runs it.

The pipeline and the step alternate in rounds, so that machine noise hits both alike; each
figure is the median over rounds. ``pipeline / step`` is the headroom (goal: >= 5x, so that
the devices never wait); ``fed / step`` shows what the pipeline costs a real epoch (1.0 = nothing).

    python experiments/bench_input.py                                   # the embedded digits
    python experiments/bench_input.py --dataset fashion_mnist --data-dir D --manual-dir ../shared/data/fashion-mnist
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import jax
import numpy as np

from attnjax import data, models
from attnjax.train import create_train_state, parallel, train_step


def images_per_second(batches, count: int, batch_size: int, consume) -> float:
    """Rate at which ``consume`` gets through ``count`` batches (after the first, which may warm up)."""
    batches = iter(batches)
    consume(next(batches))
    start = time.perf_counter()
    for batch in itertools.islice(batches, count):
        consume(batch)
    return count * batch_size / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--manual-dir", default=None)
    parser.add_argument("--model", default="attention_net")
    parser.add_argument("--block", default="seed")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--augment", default="auto", choices=data.augment.CHOICES)
    parser.add_argument("--batches", type=int, default=8, help="batches timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    dataset = data.load(args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir, image_size=None)
    augment = data.resolve_augment(args.augment, dataset)
    devices = jax.local_devices()
    bs = args.batch_size
    steps = data.pipeline.steps_per_epoch(len(dataset.train), bs)
    if args.batches + 1 > steps:
        parser.error(f"--batches {args.batches} needs more than the {steps} batches of one epoch")

    model = models.create(args.model, num_classes=dataset.num_classes, block=args.block)
    state = parallel.replicate(create_train_state(jax.random.key(0), model, dataset.image_shape, 1e-3), devices)
    p_train_step = parallel.pmap_step(train_step, devices, donate_state=True)
    epochs = itertools.count(1)

    def pipeline_batches():
        epoch_batches = data.pipeline.train_batches(dataset, bs, seed=0, epoch=next(epochs), augment=augment)
        return parallel.to_devices(epoch_batches, devices)

    def step(batch):
        nonlocal state
        state, metrics = p_train_step(state, batch)
        jax.block_until_ready(metrics)

    fixed = next(iter(pipeline_batches()))
    step(fixed)  # compile
    rates = {"pipeline": [], "step": [], "fed": []}
    for _ in range(args.rounds):
        rates["pipeline"].append(images_per_second(pipeline_batches(), args.batches, bs, jax.block_until_ready))
        rates["step"].append(images_per_second(itertools.repeat(fixed), args.batches, bs, step))
        rates["fed"].append(images_per_second(pipeline_batches(), args.batches, bs, step))
    median = {k: statistics.median(v) for k, v in rates.items()}

    print(
        f"{args.dataset} {dataset.image_shape}, batch {bs}, augment {augment}, {args.model}/{args.block}, "
        f"{len(devices)} device(s) {devices[0].platform}, {args.rounds} rounds x {args.batches} batches"
    )
    for name, value in median.items():
        spread = f"{min(rates[name]):,.0f}-{max(rates[name]):,.0f}"
        print(f"  {name:<8} {value:>10,.0f} img/s  (range {spread})")
    print(f"  pipeline / step = {median['pipeline'] / median['step']:.1f}x  (goal >= 5x)")
    print(f"  fed / step      = {median['fed'] / median['step']:.3f}  (1.0: the pipeline costs the step nothing)")
    print(f"  jax {jax.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
