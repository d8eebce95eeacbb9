"""Image-classification datasets of tensorflow-datasets, read without TensorFlow.

Datasets are prepared once as ArrayRecord (``file_format="array_record"``; preparing runs
TFDS's own builder and needs TensorFlow) and then read through ``builder.as_data_source``,
which needs neither TensorFlow nor a network. The image and label keys, the image shape and
the number of classes come from the builder's ``info``.

With no network, a dataset that is not prepared yet is prepared from ``manual_dir`` when
that folder holds the builder's original files (the names TFDS registers for its
downloads); otherwise the load fails at once, naming the files it needs. "No network" is
decided per download host by a 3-second connection attempt, or set with ATTNJAX_OFFLINE=1.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import socket
import tarfile
import tempfile
import urllib.parse
import zipfile
import zlib
from pathlib import Path

import numpy as np

from attnjax.data.dataset import Dataset, channel_stats, load_into_memory
from attnjax.data.images import resize_center_crop
from attnjax.validate import InputError

IN_MEMORY_BYTES = 2 << 30  # splits whose decoded images fit are read once into memory
# No augmentation by default: digits and glyphs (a mirrored or shifted glyph may be another
# class or none), and Fashion-MNIST, whose test items are centred and aligned exactly like
# its training items, so augmentation only regularises: crop+flip cost 1.5 points after 4
# epochs (experiments/RESULTS.md).
NO_AUGMENT = {"mnist", "emnist", "kmnist", "binarized_mnist", "mnist_corrupted", "fashion_mnist"}
CROP_ONLY = {"svhn_cropped"}  # digits in natural photographs: shifts are fine, mirror images are not
TRAIN_SPLIT, TEST_SPLITS = "train", ("test", "validation")


# TensorFlow (imported by TFDS to prepare a dataset) logs C++ start-up notes to stderr, where they would follow
# a one-line refusal. Its "oneDNN custom operations are on" note ignores TF_CPP_MIN_LOG_LEVEL and goes only with
# oneDNN's TF ops, which preparing (decoding and writing images) does not need. A user's own setting wins.
TF_QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}


def _import_tfds():
    for variable, value in TF_QUIET.items():
        os.environ.setdefault(variable, value)
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise InputError(
            "TFDS datasets need tensorflow-datasets: pip install 'attnjax[tfds]' "
            "(and tensorflow-cpu to prepare a dataset: pip install 'attnjax[tfds-prepare]')"
        ) from None
    return tfds


class TfdsSource:
    """A split of a prepared TFDS dataset, read in batches through ``as_data_source``."""

    def __init__(self, data_source, image_key: str, label_key: str, image_size: int | None, resize=None):
        self.data_source = data_source
        self.image_key, self.label_key = image_key, label_key
        self.image_size = image_size
        self.resize = resize or (functools.partial(resize_center_crop, size=image_size) if image_size else None)

    def __len__(self) -> int:
        return len(self.data_source)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        records = self.data_source.__getitems__([int(i) for i in indices])
        images = [r[self.image_key] for r in records]
        if self.resize:
            images = [self.resize(image) for image in images]
        return {"image": np.stack(images), "label": np.asarray([r[self.label_key] for r in records], np.int32)}


OFFLINE_VARIABLE = "ATTNJAX_OFFLINE"  # set to 1 to never try the network (air-gapped machines)


def reachable(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host:port`` opens within 3 s (never, with ATTNJAX_OFFLINE=1)."""
    if os.environ.get(OFFLINE_VARIABLE, "") not in ("", "0"):
        return False
    return _connects(host, port)


@functools.cache
def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError:
        return False
    return True


def _registered_files(builder) -> dict[str, str]:
    """url -> file name of each download that ``builder`` registers (the names to put in manual_dir)."""
    return {
        url: getattr(info, "filename", None) or Path(urllib.parse.urlparse(url).path).name
        for url, info in (builder.url_infos or {}).items()
    }


def _missing_downloads(builder, manual_dir: str | None) -> list[tuple[str, str]]:
    """(file name, url) of each registered download found neither in ``manual_dir`` nor online."""
    missing = []
    for url, filename in _registered_files(builder).items():
        if manual_dir and (Path(manual_dir) / filename).exists():
            if not (Path(manual_dir) / filename).is_file():
                raise InputError(
                    f"{Path(manual_dir) / filename} is not a file: --manual-dir must hold the original file "
                    f"{filename} itself (from {url})"
                )
            continue
        parsed = urllib.parse.urlparse(url)
        if not reachable(parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)):
            missing.append((filename, url))
    return missing


def _prepare(tfds, builder, name: str, data_dir: str | None, manual_dir: str | None) -> None:
    where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets)"
    if manual_dir and not Path(manual_dir).is_dir():
        raise InputError(f"--manual-dir {manual_dir} is not a folder")
    missing = _missing_downloads(builder, manual_dir)
    if missing:
        files = ", ".join(filename for filename, _ in missing)
        raise InputError(
            f"{name} is not prepared in {where}, and there is no network to download it. It needs these "
            f"files: {files}. Either put the original files in a folder and pass it as --manual-dir "
            f"(from {missing[0][1]} and the like), or pass --data-dir pointing at a folder where {name} "
            "is already prepared (as array_record)."
        )
    with tempfile.TemporaryDirectory(prefix=f"attnjax-{name}-") as extract_dir:
        # TFDS names extractions of manual files by file name alone, so mnist would reuse fashion_mnist's
        # extracted train-images-idx3-ubyte in a shared data_dir: extract each preparation privately.
        config = tfds.download.DownloadConfig(manual_dir=manual_dir, extract_dir=extract_dir) if manual_dir else None
        _download_and_prepare(tfds, builder, name, config, data_dir=data_dir, manual_dir=manual_dir)


# Raised while reading a damaged archive or compressed file (one whose checksum TFDS does not register).
DAMAGED_FILE_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, tarfile.TarError, zipfile.BadZipFile)


def _download_and_prepare(tfds, builder, name: str, config, *, data_dir=None, manual_dir=None) -> None:
    try:
        builder.download_and_prepare(download_config=config, file_format="array_record")
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("tensorflow"):
            raise
        raise InputError(
            f"preparing {name} needs TensorFlow once: pip install 'attnjax[tfds-prepare]' (or tensorflow-cpu); "
            "or pass --data-dir pointing at a folder where it is already prepared."
        ) from None
    except AssertionError as error:  # TFDS's way of saying a manual download is missing
        raise InputError(f"preparing {name} failed: {error}") from None
    except Exception as error:
        user_error = _user_file_error(error, builder, name, data_dir, manual_dir)
        if user_error is None:
            raise
        raise user_error from None


def _user_file_error(error: Exception, builder, name: str, data_dir, manual_dir) -> InputError | None:
    """The one-line InputError for a preparation that failed on the user's files, or None for other failures."""
    if any(cls.__name__ == "NonMatchingChecksumError" for cls in type(error).__mro__):
        return _checksum_error(str(error), builder, name, manual_dir)
    root = data_dir or str(Path(builder.data_dir).parents[1])  # builder.data_dir is ROOT/name/version
    where = f"--manual-dir {manual_dir}" if manual_dir else os.path.join(root, "downloads")
    if isinstance(error, DAMAGED_FILE_ERRORS):
        summary = " ".join(str(error).split()) or type(error).__name__
        return InputError(
            f"preparing {name} failed reading its original files ({type(error).__name__}: {summary}): one of the "
            f"files in {where} is damaged or truncated; replace it with an intact copy"
        )
    if isinstance(error, OSError) and error.filename:
        path = Path(os.fspath(error.filename))
        reason = error.strerror or type(error).__name__
        if manual_dir and _inside(path, manual_dir):
            return InputError(
                f"preparing {name} cannot read {path} ({reason}): replace it with an intact, readable copy"
            )
        if _inside(path, root):
            return InputError(
                f"preparing {name} cannot write {path} ({reason}): pass a --data-dir that you can write to"
            )
    return None


def _inside(path: Path, folder) -> bool:
    try:
        return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))
    except (TypeError, ValueError):
        return False


def _checksum_error(message: str, builder, name: str, manual_dir: str | None) -> InputError:
    """A damaged original file, named by the path it has in ``manual_dir`` (or in TFDS's downloads)."""
    # TFDS: "Artifact URL, downloaded to PATH, has wrong checksum: * Expected: UrlInfo(size=...) * Got: ..."
    found = re.search(r"Artifact (\S+), downloaded to (.+?), has wrong checksum", message)
    url, path = (found.group(1), found.group(2)) if found else (None, None)
    filename = _registered_files(builder).get(url) if url else None
    if filename and manual_dir and (Path(manual_dir) / filename).is_file():
        path = str(Path(manual_dir) / filename)
    if path is None:
        first_line = message.splitlines()[0] if message else "wrong checksum"
        return InputError(f"preparing {name} failed: an original file is damaged ({first_line}); replace it")
    expected = getattr((builder.url_infos or {}).get(url), "size", None)
    try:
        size = os.path.getsize(path)
    except OSError:
        held = "it cannot be read"
    else:
        held = (
            f"it holds {size:,} bytes where {name} needs {int(expected):,}"
            if expected and size != int(expected)
            else f"its {size:,} bytes are not the ones {name} needs (another checksum)"
        )
    source = f" (from {url})" if url else ""
    if manual_dir and _inside(Path(path), manual_dir):
        return InputError(
            f"{path} in --manual-dir is damaged or truncated ({held}): replace it with an intact copy of "
            f"{Path(path).name}{source}"
        )
    return InputError(
        f"the download {path} for {name} is damaged or truncated ({held}): delete it so "
        f"that it is downloaded again, or put an intact copy of {filename or Path(path).name}{source} in a folder "
        "and pass it as --manual-dir"
    )


def load(
    name: str, *, data_dir: str | None, manual_dir: str | None, image_size: int | None, test_resize=None
) -> Dataset:
    """Load TFDS dataset ``name``, preparing it first if needed; ``test_resize`` as in :func:`.folder.load`."""
    tfds = _import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        raise InputError(
            f"unknown dataset {name!r}. Use 'digits', 'folder:PATH', or a TFDS image-classification "
            "dataset such as mnist, fashion_mnist, cifar10, cifar100, svhn_cropped or imagenette."
        ) from None
    info = builder.info
    image_key, label_key = _supervised_image_keys(tfds, info, name)
    if not builder.is_prepared():
        _prepare(tfds, builder, name, data_dir, manual_dir)
        info = builder.info
    file_format = getattr(info.file_format, "value", info.file_format)
    if file_format is not None and file_format != "array_record":
        raise InputError(
            f"{name} in {builder.data_dir} is prepared as {file_format}; attnjax reads array_record "
            "(no TensorFlow at training time). Pass a new --data-dir to prepare it again as array_record."
        )

    shape = tuple(info.features[image_key].shape)
    if None in shape[:2] and not image_size:
        raise InputError(f"{name}'s images vary in size {shape}: pass --image-size N to resize them to N x N")
    channels = shape[2] if shape[2] is not None else 3
    size = image_size or None
    image_shape = (size or shape[0], size or shape[1], channels)
    test_split = next((s for s in TEST_SPLITS if s in info.splits), None)
    if TRAIN_SPLIT not in info.splits or test_split is None:
        raise InputError(f"{name} has splits {list(info.splits)}; attnjax needs 'train' and 'test' (or 'validation')")

    def source(split):
        resize = test_resize if split != TRAIN_SPLIT else None
        src = TfdsSource(builder.as_data_source(split=split), image_key, label_key, size, resize)
        decoded = len(src) * int(np.prod(image_shape))
        return load_into_memory(src, f"reading {name} {split} into memory") if decoded <= IN_MEMORY_BYTES else src

    train = source(TRAIN_SPLIT)
    mean, std = channel_stats(train)
    label = info.features[label_key]
    return Dataset(
        name=name,
        train=train,
        test=source(test_split),
        image_shape=image_shape,
        mean=mean,
        std=std,
        default_augment="none" if name in NO_AUGMENT else "crop" if name in CROP_ONLY else "crop+flip",
        class_names=list(label.names),
    )


def _supervised_image_keys(tfds, info, name: str) -> tuple[str, str]:
    keys = info.supervised_keys
    if not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys):
        raise InputError(f"{name} has no (image, label) supervised keys: it is not an image-classification dataset")
    image_key, label_key = keys
    if not isinstance(info.features[image_key], tfds.features.Image):
        raise InputError(f"{name}'s input {image_key!r} is not an image: it is not an image-classification dataset")
    if not isinstance(info.features[label_key], tfds.features.ClassLabel):
        raise InputError(f"{name}'s target {label_key!r} is not a class label")
    return image_key, label_key
