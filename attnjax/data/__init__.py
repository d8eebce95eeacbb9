"""Datasets by name, and the input pipeline that feeds them to the devices.

    from attnjax import data
    ds = data.load("digits")                                     # embedded, no download
    ds = data.load("fashion_mnist", data_dir="~/tfds", manual_dir="~/fashion-mnist")
    ds = data.load("folder:~/photos", image_size=64)             # ~/photos/{train,test}/<class>/*.jpg

A name is ``digits``, ``folder:PATH``, or any image-classification dataset of
tensorflow-datasets (its keys, shape and classes come from the builder's info).
"""

from __future__ import annotations

from collections.abc import Callable

from attnjax.data import augment, digits, pipeline
from attnjax.data.dataset import ArraySource, Dataset
from attnjax.validate import InputError

FOLDER_PREFIX = "folder:"
_EMBEDDED: dict[str, Callable[[], Dataset]] = {"digits": digits.load}


def names() -> list[str]:
    """The datasets that ship with attnjax (TFDS names and ``folder:PATH`` work too)."""
    return sorted(_EMBEDDED)


def load(
    name: str, *, data_dir: str | None = None, manual_dir: str | None = None, image_size: int | None = None
) -> Dataset:
    """Load dataset ``name``: embedded, ``folder:PATH``, or a TFDS name (prepared on first use)."""
    if image_size is not None and image_size < 0:
        raise InputError(f"image size must be positive, got {image_size}")
    if name in _EMBEDDED:
        if image_size:
            raise InputError(f"{name} has a fixed size; --image-size applies to TFDS and folder datasets")
        return _EMBEDDED[name]()
    if name.startswith(FOLDER_PREFIX):
        from attnjax.data import folder

        return folder.load(name[len(FOLDER_PREFIX) :], image_size=image_size or None)
    from attnjax.data import tfds_source

    return tfds_source.load(name, data_dir=data_dir, manual_dir=manual_dir, image_size=image_size or None)


def resolve_augment(mode: str, dataset: Dataset) -> str:
    """``auto`` becomes the dataset's default; other modes are checked and kept."""
    if mode not in augment.CHOICES:
        raise InputError(f"unknown augmentation {mode!r}; valid: {', '.join(augment.CHOICES)}")
    return dataset.default_augment if mode == "auto" else mode


__all__ = ["ArraySource", "Dataset", "augment", "load", "names", "pipeline", "resolve_augment"]
