"""Your own images: ``folder:PATH`` reads ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``.

PNG and JPEG files (any case of .png, .jpg, .jpeg); class names are the subfolder names of
``train``, sorted, and ``test`` may hold any subset of them. If any training image is in
colour, every image is read as RGB, otherwise as grayscale. Without ``image_size`` all
images must share one size; with it, each is resized (shorter side) and centre-cropped.
A folder whose decoded images fit in memory is read once at the start, so an unreadable or
wrongly sized file stops the run before training, with the file named.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attnjax.data.dataset import Dataset, channel_stats, load_into_memory
from attnjax.data.images import channels_of, decode_image, resize_center_crop
from attnjax.validate import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
IN_MEMORY_BYTES = 2 << 30


class FolderSource:
    """Image files with their class indices, decoded on demand."""

    def __init__(self, files: list[Path], labels: list[int], channels: int, image_size: int | None, expected_shape):
        self.files, self.labels = files, np.asarray(labels, np.int32)
        self.channels, self.image_size, self.expected_shape = channels, image_size, expected_shape

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> np.ndarray:
        path = str(self.files[i])
        image = decode_image(path, self.channels, path)
        if self.image_size:
            return resize_center_crop(image, self.image_size)
        if image.shape != self.expected_shape:
            raise InputError(
                f"image {path} is {image.shape[1]}x{image.shape[0]}, but the dataset's images are "
                f"{self.expected_shape[1]}x{self.expected_shape[0]}: pass --image-size N to resize all "
                "images to N x N, or fix that file"
            )
        return image

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices)
        return {"image": np.stack([self.read(int(i)) for i in indices]), "label": self.labels[indices]}


def _list(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for index, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(index)
    return files, labels


def load(path: str, *, image_size: int | None = None) -> Dataset:
    root = Path(path).expanduser()
    train_dir, test_dir = root / "train", root / "test"
    for split_dir in (train_dir, test_dir):
        if not split_dir.is_dir():
            raise InputError(
                f"folder dataset {root}: {split_dir} is missing. Lay out images as "
                f"{root}/train/<class>/*.png and {root}/test/<class>/*.png (or .jpg)"
            )
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise InputError(f"folder dataset {root}: {train_dir} has no class subfolders (train/<class>/*.png)")
    unknown = sorted({d.name for d in test_dir.iterdir() if d.is_dir()} - set(classes))
    if unknown:
        raise InputError(f"folder dataset {root}: test classes {unknown} have no training folder in {train_dir}")
    train_files, train_labels = _list(train_dir, classes)
    test_files, test_labels = _list(test_dir, classes)
    for split, files in (("train", train_files), ("test", test_files)):
        if not files:
            raise InputError(f"folder dataset {root}: no .png or .jpg images under {root / split}/<class>/")

    channels = 3 if any(channels_of(str(f)) == 3 for f in train_files) else 1
    if image_size:
        shape = (image_size, image_size, channels)
    else:
        first = decode_image(str(train_files[0]), channels, str(train_files[0]))
        shape = first.shape

    def source(files, labels, split):
        src = FolderSource(files, labels, channels, image_size, shape)
        fits = len(src) * int(np.prod(shape)) <= IN_MEMORY_BYTES
        return load_into_memory(src, f"reading {root.name} {split} images") if fits else src

    train = source(train_files, train_labels, "train")
    mean, std = channel_stats(train)
    return Dataset(
        name=f"folder:{root}",
        train=train,
        test=source(test_files, test_labels, "test"),
        image_shape=tuple(shape),
        mean=mean,
        std=std,
        default_augment="crop+flip",  # photographs: shifts and mirror images keep the class
        class_names=classes,
    )
