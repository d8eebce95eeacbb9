"""Datasets by name, and the batches the train loop feeds to the devices.

from attnjax import data
ds = data.load("digits")          # ImageDataset with NHWC float32 images
"""

from __future__ import annotations

from collections.abc import Callable

from attnjax.data import digits
from attnjax.data.batches import eval_batches, num_train_steps, train_batches
from attnjax.data.dataset import ImageDataset
from attnjax.validate import InputError

_REGISTRY: dict[str, Callable[[], ImageDataset]] = {
    "digits": digits.load,
}


def names() -> list[str]:
    """The dataset names that :func:`load` accepts, sorted."""
    return sorted(_REGISTRY)


def load(name: str) -> ImageDataset:
    """Load dataset ``name`` into host memory."""
    try:
        loader = _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown dataset {name!r}; valid names: {', '.join(names())}") from None
    return loader()


__all__ = ["ImageDataset", "eval_batches", "load", "names", "num_train_steps", "train_batches"]
