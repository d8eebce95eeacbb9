"""What every loader returns: train and test *sources* that load whole batches, plus metadata.

A source is anything with ``len(source)`` and ``source.get_batch(indices)`` returning
``{"image": (B, H, W, C) uint8 or float32 in [0, 1], "label": (B,) int32}``. The input
pipeline (:mod:`attnjax.data.pipeline`) asks for batches by index, so a source decides
how to read: a gather from memory, one batched read from ArrayRecord, or files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from attnjax.validate import InputError


class Source(Protocol):
    def __len__(self) -> int: ...

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


class ArraySource:
    """A source over images and labels held in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim != 4 or len(images) != len(labels):
            raise InputError(
                f"images must be (N, H, W, C) with one label each; got images {images.shape} and labels {labels.shape}"
            )
        self.images, self.labels = images, labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices)
        return {"image": self.images[indices], "label": self.labels[indices]}


def load_into_memory(source: Source, description: str, chunk: int = 1024) -> ArraySource:
    """Read every example of ``source`` once, in order, into an :class:`ArraySource`."""
    if isinstance(source, ArraySource):
        return source
    images, labels = [], []
    for start in tqdm(range(0, len(source), chunk), desc=description, unit="chunk", leave=False, disable=None):
        batch = source.get_batch(np.arange(start, min(start + chunk, len(source))))
        images.append(batch["image"])
        labels.append(batch["label"])
    return ArraySource(np.concatenate(images), np.concatenate(labels))


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """float32 pixels in [0, 1]: uint8 is divided by 255, floats are taken as already scaled."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32, copy=False)


def channel_stats(source: Source, max_examples: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``source``'s pixels in [0, 1] units.

    Over every example when there are at most ``max_examples``, else over an evenly spaced
    subset of that many (deterministic, so two runs normalise alike).
    """
    n = len(source)
    indices = np.arange(n) if n <= max_examples else np.linspace(0, n - 1, max_examples).astype(np.int64)
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(indices), 2048):
        x = to_unit_range(source.get_batch(indices[start : start + 2048])["image"]).astype(np.float64)
        total = total + x.sum(axis=(0, 1, 2))
        total_sq = total_sq + (x**2).sum(axis=(0, 1, 2))
        count += x.shape[0] * x.shape[1] * x.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train and a test split with what the model and the pipeline need to know about them."""

    name: str
    train: Source
    test: Source
    class_names: Sequence[str]  # label k is class_names[k]
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]  # per channel, pixels in [0, 1]
    std: tuple[float, ...]
    default_augment: str  # what --augment auto means for this dataset

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict:
        """The facts about this dataset worth recording with a run."""
        return {
            "name": self.name,
            "train_examples": len(self.train),
            "test_examples": len(self.test),
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "mean": list(self.mean),
            "std": list(self.std),
        }
