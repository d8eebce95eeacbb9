"""The real TFDS builders, prepared offline from the original files, read through the pipeline."""

import gzip
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from attnjax import data
from attnjax.data import tfds_source
from attnjax.validate import InputError


def read_idx(path):
    """The original idx files, read independently of TFDS."""
    with gzip.open(path) as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


@pytest.mark.parametrize("name, folder", [("fashion_mnist", "fashion-mnist"), ("mnist", "mnist")])
def test_prepared_dataset_matches_the_original_files(tfds_data_dir, shared_data, name, folder):
    ds = data.load(name, data_dir=str(tfds_data_dir))
    assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
    assert len(ds.train) == 60_000 and len(ds.test) == 10_000
    assert len(ds.class_names) == 10
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(shared_data / folder / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(shared_data / folder / f"{prefix}-labels-idx1-ubyte.gz")
        source = getattr(ds, split)
        batch = source.get_batch(np.arange(len(source)))
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (len(labels), 28, 28, 1)
        assert batch["label"].dtype == np.int32
        # TFDS stores the examples in another order: compare as multisets, and pair images with labels.
        np.testing.assert_array_equal(np.bincount(batch["label"], minlength=10), np.bincount(labels, minlength=10))
        label_of = {img.tobytes(): int(lab) for img, lab in zip(images, labels, strict=True)}
        for i in range(0, len(labels), 97):
            assert label_of[batch["image"][i, ..., 0].tobytes()] == batch["label"][i]


def test_pipeline_batches_from_tfds_have_the_right_shapes_and_dtypes(tfds_data_dir):
    ds = data.load("fashion_mnist", data_dir=str(tfds_data_dir))
    batch = next(iter(data.pipeline.train_batches(ds, 64, seed=0, epoch=1, augment="crop+flip")))
    assert batch["image"].shape == (64, 28, 28, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
    assert set(np.unique(batch["label"])) <= set(range(10))
    # Normalised with the training set's statistics: about zero mean and unit spread.
    assert abs(float(batch["image"].mean())) < 0.5 and 0.5 < float(batch["image"].std()) < 1.5


def test_every_test_example_is_evaluated_once(tfds_data_dir):
    ds = data.load("mnist", data_dir=str(tfds_data_dir))
    labels, masks = [], []
    for batch in data.pipeline.eval_batches(ds, 384):  # 10,000 is not a multiple of 384
        labels.append(batch["label"])
        masks.append(batch["mask"])
    labels, masks = np.concatenate(labels), np.concatenate(masks)
    assert masks.sum() == 10_000 and len(masks) == 384 * 27
    expected = ds.test.get_batch(np.arange(10_000))["label"]
    np.testing.assert_array_equal(labels[masks > 0], expected)


def test_unprepared_dataset_without_network_fails_in_seconds_naming_the_files(tmp_path):
    env = {**os.environ, tfds_source.OFFLINE_VARIABLE: "1"}
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "attnjax.train",
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path / "d"),
            "--workdir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert "cifar10 is not prepared" in proc.stderr and "cifar-10-binary.tar.gz" in proc.stderr
    assert "--manual-dir" in proc.stderr and "--data-dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 60  # start-up and imports included; the check itself takes no time


def test_manual_dir_missing_some_files_names_them(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv(tfds_source.OFFLINE_VARIABLE, "1")
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (partial / f).symlink_to(shared_data / "mnist" / f)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz.*--manual-dir") as error:
        data.load("mnist", data_dir=str(tmp_path / "d"), manual_dir=str(partial))
    assert "train-images" not in str(error.value)


def copy_of_mnist(shared_data, folder):
    """A writable copy of MNIST's four original files."""
    folder.mkdir()
    for original in (shared_data / "mnist").glob("*.gz"):
        shutil.copyfile(original, folder / original.name)
    return folder


def test_a_truncated_original_file_is_named_with_the_fix(tmp_path, shared_data, monkeypatch):
    """TFDS's NonMatchingChecksumError (90 lines of traceback) becomes one line naming the file in manual_dir."""
    monkeypatch.setenv(tfds_source.OFFLINE_VARIABLE, "1")
    manual = copy_of_mnist(shared_data, tmp_path / "manual")
    damaged = manual / "train-images-idx3-ubyte.gz"
    with open(damaged, "r+b") as f:
        f.truncate(100_000)
    start = time.monotonic()
    with pytest.raises(InputError) as error:
        data.load("mnist", data_dir=str(tmp_path / "d"), manual_dir=str(manual))
    message = str(error.value)
    assert "\n" not in message and str(damaged) in message and "100,000 bytes" in message
    assert "9,912,422" in message and "replace it with an intact copy" in message
    assert "t10k" not in message and "labels" not in message  # the intact files are not blamed
    assert time.monotonic() - start < 60  # checksums are checked before any conversion


@pytest.mark.subprocess
def test_the_command_line_ends_a_truncated_original_file_with_its_one_line_and_no_tensorflow_log(tmp_path, shared_data):
    manual = copy_of_mnist(shared_data, tmp_path / "manual")
    with open(manual / "train-images-idx3-ubyte.gz", "r+b") as f:
        f.truncate(100_000)
    env = {key: value for key, value in os.environ.items() if key not in tfds_source.TF_QUIET}
    env[tfds_source.OFFLINE_VARIABLE] = "1"
    command = ["--dataset", "mnist", "--data-dir", str(tmp_path / "d"), "--manual-dir", str(manual)]
    proc = subprocess.run(
        [sys.executable, "-m", "attnjax.train", *command, "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "damaged or truncated" in last, proc.stderr
    assert "Traceback" not in proc.stderr and "oneDNN" not in proc.stderr and "absl" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_a_folder_in_place_of_an_original_file_is_refused(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv(tfds_source.OFFLINE_VARIABLE, "1")
    manual = copy_of_mnist(shared_data, tmp_path / "manual")
    (manual / "t10k-labels-idx1-ubyte.gz").unlink()
    (manual / "t10k-labels-idx1-ubyte.gz").mkdir()
    with pytest.raises(InputError, match=r"t10k-labels-idx1-ubyte.gz is not a file"):
        data.load("mnist", data_dir=str(tmp_path / "d"), manual_dir=str(manual))


def test_not_an_image_classification_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'no_such_dataset_xyz'.*folder:PATH"):
        data.load("no_such_dataset_xyz", data_dir=str(tmp_path))


def test_network_probe_answers_quickly_on_loopback(monkeypatch):
    monkeypatch.delenv(tfds_source.OFFLINE_VARIABLE, raising=False)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert tfds_source.reachable("127.0.0.1", server.getsockname()[1])
    start = time.monotonic()
    assert not tfds_source.reachable("127.0.0.1", closed_port)
    assert time.monotonic() - start < 3.5
    monkeypatch.setenv(tfds_source.OFFLINE_VARIABLE, "1")
    assert not tfds_source.reachable("127.0.0.1", closed_port + 1)
