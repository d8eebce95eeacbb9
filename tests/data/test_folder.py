"""``folder:PATH`` datasets built from images that the tests write."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from image_folders import CLASSES, write_folder
from PIL import Image

from attnjax import data


def test_folder_dataset_reads_classes_images_and_labels(tmp_path):
    ds = data.load(f"folder:{write_folder(tmp_path / 'pets')}")
    assert ds.class_names == list(CLASSES) and ds.num_classes == 3
    assert ds.image_shape == (10, 12, 3)
    assert len(ds.train) == 18 and len(ds.test) == 9
    batch = ds.train.get_batch(np.arange(18))
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (18, 10, 12, 3)
    brightness = batch["image"].mean(axis=(1, 2, 3))
    np.testing.assert_allclose(brightness, 60 + 80 * batch["label"], atol=5)
    assert ds.default_augment == "crop+flip"


def test_folder_images_are_resized_on_request(tmp_path):
    ds = data.load(f"folder:{write_folder(tmp_path / 'pets', size=(40, 20), suffix='.jpg')}", image_size=16)
    assert ds.image_shape == (16, 16, 3)
    assert ds.test.get_batch(np.arange(3))["image"].shape == (3, 16, 16, 3)


def test_grayscale_folder_gives_one_channel(tmp_path):
    ds = data.load(f"folder:{write_folder(tmp_path / 'gray', mode='L')}")
    assert ds.image_shape == (10, 12, 1)


def test_unreadable_file_is_named(tmp_path):
    root = write_folder(tmp_path / "pets")
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=rf"cannot read image {bad}"):
        data.load(f"folder:{root}")


def test_wrongly_sized_file_is_named_with_the_fix(tmp_path):
    root = write_folder(tmp_path / "pets")
    odd = root / "test" / "fox" / "big.png"
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(odd)
    with pytest.raises(
        ValueError, match=rf"image {odd} is 30x30, but the dataset's images are 12x10: pass --image-size"
    ):
        data.load(f"folder:{root}")


@pytest.mark.parametrize(
    "layout, message",
    [("no_test", "test is missing"), ("unknown_test_class", r"test classes \['owl'\] have no training folder")],
)
def test_bad_layouts_are_explained(tmp_path, layout, message):
    root = write_folder(tmp_path / "pets")
    if layout == "no_test":
        for f in (root / "test").rglob("*.png"):
            f.unlink()
        for d in sorted((root / "test").iterdir()):
            d.rmdir()
        (root / "test").rmdir()
    else:
        (root / "test" / "owl").mkdir()
    with pytest.raises(ValueError, match=message):
        data.load(f"folder:{root}")


def test_cli_trains_on_a_folder(tmp_path):
    root = write_folder(tmp_path / "pets", per_class=(16, 4))
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "attnjax.train",
            "--dataset",
            f"folder:{root}",
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--image-size",
            "8",
            "--workdir",
            str(workdir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and records[-1]["test_examples"] == 12
    config = json.loads((workdir / "config.json").read_text())
    assert config["augment"] == "crop+flip" and config["dataset"]["image_shape"] == [8, 8, 3]
