"""scikit-learn's ``load_digits``: 1,797 real 8x8 handwritten digits that ship inside its wheel.

The split is fixed and independent of the training seed, so every run is scored on the
same test images: a permutation from ``numpy.random.default_rng(0)``, its first 360
images (20%) for test and the other 1,437 for training. Pixels (0..16) are scaled to [0, 1].
"""

from __future__ import annotations

import numpy as np

from attnjax.data.dataset import ArraySource, Dataset, channel_stats

SPLIT_SEED = 0
NUM_TEST = 360


def load() -> Dataset:
    from sklearn.datasets import load_digits  # only this dataset needs scikit-learn

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[..., None]  # (1797, 8, 8, 1)
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    test, train = order[:NUM_TEST], order[NUM_TEST:]
    train_source = ArraySource(images[train], labels[train])
    mean, std = channel_stats(train_source)
    return Dataset(
        name="digits",
        train=train_source,
        test=ArraySource(images[test], labels[test]),
        image_shape=(8, 8, 1),
        mean=mean,
        std=std,
        default_augment="none",  # flipped or shifted digits are other digits, or none
        class_names=[str(d) for d in range(10)],
    )
