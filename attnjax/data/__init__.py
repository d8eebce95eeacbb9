"""Datasets by name, and the input pipeline that feeds them to the devices.

    from attnjax import data
    ds = data.load("digits")                                     # embedded, no download
    ds = data.load("fashion_mnist", data_dir="~/tfds", manual_dir="~/fashion-mnist")
    ds = data.load("folder:~/photos", image_size=64)             # ~/photos/{train,test}/<class>/*.jpg

A name is ``digits``, ``folder:PATH``, or any image-classification dataset of
tensorflow-datasets (its keys, shape and classes come from the builder's info).

With ``pretrained`` (a :class:`~attnjax.data.pretrained_transforms.PretrainedConfig`: the
preprocessing that came with pretrained weights) the dataset is what those weights expect:
images at ``image_size`` (default: the weights' own), the test split resized and centre-cropped
by the weights' crop fraction and interpolation (timm's eval transform), the weights' mean and
std, and ``rrc+flip`` (random-resized crop and flip) as its ``auto`` augmentation.
"""

from __future__ import annotations

import dataclasses
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
    name: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    image_size: int | None = None,
    pretrained=None,
) -> Dataset:
    """Load dataset ``name``: embedded, ``folder:PATH``, or a TFDS name (prepared on first use).

    ``pretrained``: the preprocessing of pretrained weights (see the module's docstring).
    """
    if image_size is not None and image_size < 0:
        raise InputError(f"image size must be positive, got {image_size}")
    if pretrained is not None:
        return _for_pretrained(name, data_dir, manual_dir, image_size, pretrained)
    if name in _EMBEDDED:
        if image_size:
            raise InputError(f"{name} has a fixed size; --image-size applies to TFDS and folder datasets")
        return _EMBEDDED[name]()
    if name.startswith(FOLDER_PREFIX):
        from attnjax.data import folder

        return folder.load(name[len(FOLDER_PREFIX) :], image_size=image_size or None)
    from attnjax.data import tfds_source

    return tfds_source.load(name, data_dir=data_dir, manual_dir=manual_dir, image_size=image_size or None)


def _for_pretrained(name: str, data_dir, manual_dir, image_size, pretrained) -> Dataset:
    from attnjax.data.pretrained_transforms import EvalTransform

    if name in _EMBEDDED:
        raise InputError(
            f"{name} is not a dataset for pretrained weights ({pretrained.architecture} takes "
            f"{pretrained.input_size[0]}-channel images of {pretrained.image_size} x {pretrained.image_size}): "
            "fine-tune on a folder:PATH or TFDS dataset of photographs"
        )
    size = image_size or pretrained.image_size
    test_resize = EvalTransform.from_config(pretrained, size).resize_crop
    if name.startswith(FOLDER_PREFIX):
        from attnjax.data import folder

        dataset = folder.load(name[len(FOLDER_PREFIX) :], image_size=size, test_resize=test_resize)
    else:
        from attnjax.data import tfds_source

        dataset = tfds_source.load(
            name, data_dir=data_dir, manual_dir=manual_dir, image_size=size, test_resize=test_resize
        )
    channels = dataset.image_shape[-1]
    if channels != len(pretrained.mean):
        raise InputError(
            f"{name} holds {channels}-channel images, and {pretrained.architecture}'s weights take "
            f"{len(pretrained.mean)} channels: fine-tune on colour images"
        )
    return dataclasses.replace(
        dataset, mean=tuple(pretrained.mean), std=tuple(pretrained.std), default_augment="rrc+flip"
    )


def resolve_augment(mode: str, dataset: Dataset) -> str:
    """``auto`` becomes the dataset's default; other modes are checked and kept."""
    if mode not in augment.CHOICES:
        raise InputError(f"unknown augmentation {mode!r}; valid: {', '.join(augment.CHOICES)}")
    return dataset.default_augment if mode == "auto" else mode


__all__ = ["ArraySource", "Dataset", "augment", "load", "names", "pipeline", "resolve_augment"]
