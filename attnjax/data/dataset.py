"""The in-memory dataset type that every loader returns."""

from __future__ import annotations

import dataclasses

import numpy as np

from attnjax.validate import InputError


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Train and test splits as NHWC float32 images and int32 labels, held in host memory."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    def __post_init__(self):
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.ndim != 4 or len(images) != len(labels):
                raise InputError(
                    f"dataset {self.name!r}: {split} images must be (N, H, W, C) with one label "
                    f"each; got images {images.shape} and labels {labels.shape}"
                )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one image."""
        return tuple(self.train_images.shape[1:])
