"""Batches from in-memory arrays: shuffled full batches for training, padded masked ones for eval."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from attnjax.validate import InputError

Batch = dict[str, np.ndarray]


def num_train_steps(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the remainder is dropped; reshuffling reaches it next epoch)."""
    if batch_size > num_examples:
        raise InputError(
            f"batch size {batch_size} is larger than the {num_examples} training examples: "
            f"use --batch-size {num_examples} or less"
        )
    return num_examples // batch_size


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
    """One epoch of full batches in an order drawn from ``rng``."""
    order = rng.permutation(len(labels))
    for step in range(num_train_steps(len(labels), batch_size)):
        idx = order[step * batch_size : (step + 1) * batch_size]
        yield {"image": images[idx], "label": labels[idx]}


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Iterator[Batch]:
    """Every example exactly once, in order; the last batch is zero-padded to ``batch_size``.

    ``mask`` is 1 for real examples and 0 for padding, so sums over ``mask`` count each
    example once and the step's shapes (and compiled program) never change.
    """
    for start in range(0, len(labels), batch_size):
        image, label = images[start : start + batch_size], labels[start : start + batch_size]
        pad = batch_size - len(label)
        yield {
            "image": np.pad(image, [(0, pad)] + [(0, 0)] * (image.ndim - 1)),
            "label": np.pad(label, (0, pad)),
            "mask": np.pad(np.ones(len(label), np.float32), (0, pad)),
        }
