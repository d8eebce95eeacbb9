"""Your own images: ``folder:PATH`` reads ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``.

Formats read: PNG, JPEG, WebP and GIF (any case of .png, .jpg, .jpeg, .webp, .gif); of an
animated GIF or WebP, the first frame. Class names are the subfolder names of ``train``;
label k is the k-th name in sorted order (as torchvision's ``ImageFolder``), the same in
both splits, and ``test`` may hold any subset of them. If any training image is in colour,
every image is read as RGB, otherwise as grayscale. Without ``image_size`` all images must
share one size; with it, each is resized (shorter side) and centre-cropped.

What is not read is never dropped silently: :func:`load` prints one line to stderr with the
images read per split and format, and the entries it passed over, counted: files of other
formats (by extension), hidden files and folders (names starting with ``.``), folders
nested inside a class folder (their images are not read), and files directly in
``train/`` or ``test/``. A layout that would train a misleading model is refused with an
:class:`~attnjax.validate.InputError` that names the folder and the fix: a single class
(it scores 1.0 by always answering it), a class folder in ``train`` with no image (it
would take a label that no example has), and a class in ``test`` that ``train`` lacks.
A folder whose decoded images fit in memory is read once at the start, so an unreadable or
wrongly sized file stops the run before training, with the file named.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from attnjax.data.dataset import Dataset, channel_stats, load_into_memory
from attnjax.data.images import channels_of, decode_image, resize_center_crop
from attnjax.validate import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
IN_MEMORY_BYTES = 2 << 30
SPLITS = ("train", "test")
NAMED = 3  # paths named in a note before "and N more"
NO_EXTENSION = "(no extension)"


class FolderSource:
    """Image files with their class indices, decoded on demand."""

    def __init__(
        self, files: list[Path], labels: list[int], channels: int, image_size: int | None, expected_shape, resize=None
    ):
        self.files, self.labels = files, np.asarray(labels, np.int32)
        self.channels, self.image_size, self.expected_shape = channels, image_size, expected_shape
        self.resize = resize or (functools.partial(resize_center_crop, size=image_size) if image_size else None)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> np.ndarray:
        path = str(self.files[i])
        image = decode_image(path, self.channels, path)
        if self.resize:
            return self.resize(image)
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


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word if n == 1 else (words or word + 's')}"


def _and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _names(paths: list[str]) -> str:
    shown = ", ".join(paths[:NAMED])
    return shown if len(paths) <= NAMED else f"{shown} and {len(paths) - NAMED} more"


def _by_suffix(counts: Counter) -> str:
    return ", ".join(f"{n} {suffix}" for suffix, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _suffix(path: Path) -> str:
    return path.suffix.lower() or NO_EXTENSION


@dataclasses.dataclass
class Listing:
    """What :func:`scan` found under a folder dataset's root: the images it reads and what it passed over."""

    root: Path
    classes: list[str]  # train's class folders, sorted: label k is classes[k] in both splits
    files: dict[str, list[Path]]  # split -> its image files, class by class
    labels: dict[str, list[int]]
    formats: Counter  # suffix -> images read, both splits
    other_formats: Counter  # suffix -> files not read
    hidden: list[str]  # paths relative to root, of hidden files and folders
    nested: list[str]  # folders inside a class folder
    loose: list[str]  # files directly in train/ or test/

    def note(self) -> str:
        """One line: the images read per split and format, and every kind of entry skipped, counted."""
        train, test = len(self.files["train"]), len(self.files["test"])
        read = (
            f"attnjax: folder:{self.root}: read {train} train and {test} test images of "
            f"{len(self.classes)} classes ({_by_suffix(self.formats)})"
        )
        skipped = []
        if self.other_formats:
            total = sum(self.other_formats.values())
            skipped.append(f"{_plural(total, 'file')} of other formats ({_by_suffix(self.other_formats)})")
        if self.hidden:
            hidden = _plural(len(self.hidden), "hidden file or folder", "hidden files or folders")
            skipped.append(f"{hidden} ({_names(self.hidden)})")
        if self.nested:
            skipped.append(
                f"{_plural(len(self.nested), 'nested folder')} ({_names(self.nested)}; "
                "only images directly in a class folder are read)"
            )
        if self.loose:
            skipped.append(f"{_plural(len(self.loose), 'file')} outside class folders ({_names(self.loose)})")
        return f"{read}; " + ("skipped " + _and(skipped) if skipped else "nothing skipped")


def _kind(entry: Path) -> str:
    if entry.name.startswith("."):
        return "hidden"
    if entry.is_dir():
        return "folder"
    return "image" if entry.suffix.lower() in IMAGE_SUFFIXES else "other"


def _holds(folder: Path) -> str:
    """What a class folder without images holds instead, for the error that refuses it."""
    other, nested, hidden = Counter(), 0, 0
    for entry in folder.iterdir():
        kind = _kind(entry)
        if kind == "other":
            other[_suffix(entry)] += 1
        nested += kind == "folder"
        hidden += kind == "hidden"
    parts = [_plural(n, f"{suffix} file") for suffix, n in sorted(other.items())]
    if nested:
        parts.append(_plural(nested, "nested folder"))
    if hidden:
        parts.append(_plural(hidden, "hidden file or folder", "hidden files or folders"))
    return "holds " + _and(parts) if parts else "empty"


def scan(path: str | Path) -> Listing:
    """List a folder dataset's images and labels, count what it skips, and refuse a misleading layout."""
    root = Path(path).expanduser()
    dirs = {split: root / split for split in SPLITS}
    for split_dir in dirs.values():
        if not split_dir.is_dir():
            raise InputError(
                f"folder dataset {root}: {split_dir} is missing. Lay out images as "
                f"{root}/train/<class>/*.png and {root}/test/<class>/*.png (or .jpg, .jpeg, .webp, .gif)"
            )
    listing = Listing(root, [], {}, {}, Counter(), Counter(), [], [], [])

    def rel(entry: Path) -> str:
        return entry.relative_to(root).as_posix()

    class_dirs = {}
    for split, split_dir in dirs.items():
        class_dirs[split] = []
        for entry in sorted(split_dir.iterdir()):
            kind = _kind(entry)
            if kind == "hidden":
                listing.hidden.append(rel(entry))
            elif kind == "folder":
                class_dirs[split].append(entry.name)
            else:
                listing.loose.append(rel(entry))
    classes = listing.classes = class_dirs["train"]
    if not classes:
        loose = [p for p in listing.loose if p.startswith("train/")]
        held = f"; it holds {_plural(len(loose), 'file')} directly: move each into train/<class>/" if loose else ""
        raise InputError(f"folder dataset {root}: {dirs['train']} has no class subfolders (train/<class>/*.png){held}")
    unknown = sorted(set(class_dirs["test"]) - set(classes))
    if unknown:
        raise InputError(
            f"folder dataset {root}: test classes {unknown} have no training folder in {dirs['train']}, so no "
            "model trained on it could answer them: add train/<class>/ with its images, or remove test/<class>/"
        )
    for split, split_dir in dirs.items():
        files, labels = [], []
        listing.files[split], listing.labels[split] = files, labels
        for label, name in enumerate(classes):
            folder = split_dir / name
            if not folder.is_dir():
                continue
            for entry in sorted(folder.iterdir()):
                kind = _kind(entry)
                if kind == "image":
                    files.append(entry)
                    labels.append(label)
                    listing.formats[entry.suffix.lower()] += 1
                elif kind == "hidden":
                    listing.hidden.append(rel(entry))
                elif kind == "folder":
                    listing.nested.append(rel(entry))
                else:
                    listing.other_formats[_suffix(entry)] += 1
    formats = ", ".join(IMAGE_SUFFIXES)
    if not listing.files["train"]:
        raise InputError(f"folder dataset {root}: no images ({formats}) under {dirs['train']}/<class>/")
    if len(classes) == 1:
        raise InputError(
            f"folder dataset {root}: {dirs['train']} has a single class folder ({classes[0]}), and a classifier "
            f"of one class scores 1.0 by always answering it: add a folder of images per class, as train/<class>/ "
            "and test/<class>/"
        )
    seen = set(listing.labels["train"])
    empty = [(k, name) for k, name in enumerate(classes) if k not in seen]
    if empty:
        one = len(empty) == 1
        where = _and([f"train/{name} ({_holds(dirs['train'] / name)})" for _, name in empty])
        in_test = [f"test/{name}" for _, name in empty if (dirs["test"] / name).is_dir()]
        also = f" (and {_and(in_test)})" if in_test else ""
        it, has, label = ("it", "has", "label") if one else ("them", "have", "labels")
        raise InputError(
            f"folder dataset {root}: class {'folder' if one else 'folders'} {where} {has} no images ({formats}), "
            f"yet would take {label} {_and([str(k) for k, _ in empty])} of {len(classes)} (classes are the sorted "
            f"folder names) with no example to learn from: put the images directly in {it}, or remove {it}{also}"
        )
    if not listing.files["test"]:
        raise InputError(f"folder dataset {root}: no images ({formats}) under {dirs['test']}/<class>/")
    return listing


def load(path: str, *, image_size: int | None = None, test_resize=None) -> Dataset:
    """Read a folder dataset (see the module's docstring); prints one line to stderr on what it read and skipped.

    ``test_resize`` (a uint8 image to a uint8 ``image_size`` x ``image_size`` image, such as a pretrained eval
    transform's resize and crop) replaces the shorter-side resize and centre crop for the test split.
    """
    listing = scan(path)
    root, classes = listing.root, listing.classes
    print(listing.note(), file=sys.stderr, flush=True)
    train_files = listing.files["train"]

    channels = 3 if any(channels_of(str(f)) == 3 for f in train_files) else 1
    if image_size:
        shape = (image_size, image_size, channels)
    else:
        first = decode_image(str(train_files[0]), channels, str(train_files[0]))
        shape = first.shape

    def source(split):
        resize = test_resize if split == "test" else None
        src = FolderSource(listing.files[split], listing.labels[split], channels, image_size, shape, resize)
        fits = len(src) * int(np.prod(shape)) <= IN_MEMORY_BYTES
        return load_into_memory(src, f"reading {root.name} {split} images") if fits else src

    train = source("train")
    mean, std = channel_stats(train)
    return Dataset(
        name=f"folder:{root}",
        train=train,
        test=source("test"),
        image_shape=tuple(shape),
        mean=mean,
        std=std,
        default_augment="crop+flip",  # photographs: shifts and mirror images keep the class
        class_names=classes,
    )
