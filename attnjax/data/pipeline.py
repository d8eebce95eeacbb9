"""The input pipeline: grain over batch indices, with each source loading whole batches.

grain shuffles, shards and batches *indices*; each batch of indices is then loaded by the
split's source in one call (a gather from memory, or one batched ArrayRecord read),
augmented and normalised as a batch. Per-example Python work would cost more CPU than
the model's step on small images; per-batch work costs almost nothing
(experiments/RESULTS.md). grain's read threads prepare batches ahead of the training loop.

Training: every epoch draws one permutation of the whole training set from the seed and
the epoch; process p of P takes every P-th example of it. The global batch k (the union of
the processes' batches k) is therefore the same for any number of processes.

Evaluation: process p takes test examples p, p + P, ...; the last batch is zero-padded
with ``mask`` = 0, and processes with fewer examples add fully masked batches, so every
process runs the same number of steps and every example is counted exactly once.
"""

from __future__ import annotations

import functools
import math
import os

import grain
import numpy as np

from attnjax.data import augment as augmentation
from attnjax.data.dataset import Dataset
from attnjax.validate import InputError

# One or two read threads keep up with the step on small images; more help when batches
# are decoded from files or ArrayRecord.
NUM_THREADS = min(4, os.cpu_count() or 1)
PREFETCH_BATCHES = 8


def seed_for(*keys: int) -> int:
    """A 32-bit seed derived from ``keys`` (seed, epoch, stream, ...) without collisions between streams."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full global batches per epoch (the remainder is dropped; reshuffling reaches it next epoch)."""
    if batch_size > num_examples:
        raise InputError(
            f"batch size {batch_size} (the examples of one update: --batch-size times --grad-accum) is larger "
            f"than the {num_examples} training examples: lower --batch-size or --grad-accum so that "
            f"--batch-size x --grad-accum is {num_examples} or less"
        )
    return num_examples // batch_size


def process_batch_size(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise InputError(f"batch size {batch_size} does not split over {process_count} processes")
    return batch_size // process_count


def _augment_and_normalize(batch, rng, *, mode, mean, std):
    images = batch["image"] if mode == "none" else augmentation.augment(batch["image"], rng, mode)
    return {"image": augmentation.normalize(images, mean, std), "label": batch["label"]}


def train_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    augment: str = "none",
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = NUM_THREADS,
    start: int = 0,
) -> grain.IterDataset:
    """One epoch of this process's share of the global training batches, as numpy dicts.

    Each element is ``{"image": (batch_size / process_count, H, W, C) float32, "label": int32}``.
    ``start`` skips the epoch's first batches without loading them: batch k is the same
    whatever ``start`` is (its augmentation is seeded by its index), so a run resumed
    mid-epoch sees exactly the batches it would have seen.
    """
    n = len(dataset.train)
    steps = steps_per_epoch(n, batch_size)
    per_process = process_batch_size(batch_size, process_count)
    ds = grain.MapDataset.range(n).shuffle(seed=seed_for(seed, epoch, 0))
    ds = ds[process_index::process_count].batch(per_process, drop_remainder=True)[:steps]
    ds = ds.map(dataset.train.get_batch)
    ds = ds.random_map(
        functools.partial(_augment_and_normalize, mode=augment, mean=dataset.mean, std=dataset.std),
        seed=seed_for(seed, epoch, 1, process_index),
    )
    return _iterate(ds[start:], num_threads)


def num_eval_batches(num_examples: int, batch_size: int, process_count: int = 1) -> int:
    """Evaluation steps, the same on every process."""
    per_process = process_batch_size(batch_size, process_count)
    return math.ceil(math.ceil(num_examples / process_count) / per_process)


def _eval_batch(k, *, source, indices, per_process, image_shape, mean, std):
    chosen = indices[k * per_process : (k + 1) * per_process]
    real = len(chosen)
    if real:
        batch = source.get_batch(chosen)
        image, label = augmentation.normalize(batch["image"], mean, std), batch["label"]
    else:  # a fully masked batch, for a process that has run out of examples
        image, label = np.zeros((0, *image_shape), np.float32), np.zeros(0, np.int32)
    pad = per_process - real
    return {
        "image": np.pad(image, [(0, pad), (0, 0), (0, 0), (0, 0)]),
        "label": np.pad(label, (0, pad)),
        "mask": np.pad(np.ones(real, np.float32), (0, pad)),
    }


def eval_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    split: str = "test",
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = NUM_THREADS,
) -> grain.IterDataset:
    """This process's share of ``split``, every example once, in fixed-size masked batches."""
    source = getattr(dataset, split)
    per_process = process_batch_size(batch_size, process_count)
    indices = np.arange(len(source))[process_index::process_count]
    ds = grain.MapDataset.range(num_eval_batches(len(source), batch_size, process_count))
    ds = ds.map(
        functools.partial(
            _eval_batch,
            source=source,
            indices=indices,
            per_process=per_process,
            image_shape=dataset.image_shape,
            mean=dataset.mean,
            std=dataset.std,
        )
    )
    return _iterate(ds, num_threads)


def _iterate(ds: grain.MapDataset, num_threads: int) -> grain.IterDataset:
    return ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=PREFETCH_BATCHES if num_threads else 0)
    )
