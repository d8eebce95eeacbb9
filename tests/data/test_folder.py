"""``folder:PATH`` datasets built from images that the tests write."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from image_folders import CLASSES, write_folder
from PIL import Image

from attnjax import data
from attnjax.validate import InputError


def solid(path, brightness, size=(12, 10), frames=()):
    """An image of one brightness; ``frames`` are later animation frames of other brightnesses."""
    first, *rest = (Image.fromarray(np.full((size[1], size[0], 3), v, np.uint8)) for v in (brightness, *frames))
    first.save(path, **({"save_all": True, "append_images": rest, "duration": 50} if rest else {}))


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


def test_webp_and_gif_are_read_and_whatever_is_skipped_is_counted(tmp_path, capsys):
    root = write_folder(tmp_path / "pets")
    solid(root / "train" / "cat" / "x.webp", 60)
    solid(root / "train" / "dog" / "y.gif", 140, frames=(0, 255))  # animated: the first frame is read
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
    (root / "test" / "fox" / "scan.TIFF").write_bytes(b"\0")
    (root / "train" / "cat" / "more").mkdir()
    solid(root / "train" / "cat" / "more" / "0.png", 60)
    (root / "train" / "labels.csv").write_text("x,y")
    ds = data.load(f"folder:{root}")
    assert len(ds.train) == 20 and len(ds.test) == 9
    note = (
        f"attnjax: folder:{root}: read 20 train and 9 test images of 3 classes (27 .png, 1 .gif, 1 .webp); "
        "skipped 2 files of other formats (1 .tiff, 1 .txt), 1 hidden file or folder (train/cat/.DS_Store), "
        "1 nested folder (train/cat/more; only images directly in a class folder are read) and "
        "1 file outside class folders (train/labels.csv)"
    )
    assert capsys.readouterr().err.splitlines() == [note]
    batch = ds.train.get_batch(np.arange(20))
    gif = 13  # dog's files sorted: 0.png ... 5.png, y.gif, after cat's seven
    assert batch["label"][gif] == 1 and abs(batch["image"][gif].mean() - 140) < 2
    assert batch["label"][6] == 0 and abs(batch["image"][6].mean() - 60) < 2  # x.webp


def test_a_clean_folder_says_what_it_read(tmp_path, capsys):
    root = write_folder(tmp_path / "pets", suffix=".JPG")
    data.load(f"folder:{root}")
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("read 18 train and 9 test images of 3 classes (27 .jpg); nothing skipped")
    )


def test_labels_are_the_sorted_train_folders_in_both_splits(tmp_path):
    root = write_folder(tmp_path / "pets")
    shutil.rmtree(root / "test" / "cat")
    shutil.rmtree(root / "test" / "dog")
    ds = data.load(f"folder:{root}")
    assert ds.class_names == ["cat", "dog", "fox"]
    assert ds.test.get_batch(np.arange(3))["label"].tolist() == [2, 2, 2]


def test_a_single_class_is_refused(tmp_path):
    root = write_folder(tmp_path / "pets")
    for split in ("train", "test"):
        shutil.rmtree(root / split / "dog")
        shutil.rmtree(root / split / "fox")
    with pytest.raises(InputError, match=r"train has a single class folder \(cat\).*add a folder of images per class"):
        data.load(f"folder:{root}")


@pytest.mark.parametrize(
    "contents, holds", [((), "empty"), (("notes.txt", "more/"), "holds 1 .txt file and 1 nested folder")]
)
def test_an_empty_class_folder_is_refused_before_it_shifts_the_labels(tmp_path, contents, holds):
    root = write_folder(tmp_path / "pets")
    bat = root / "train" / "bat"  # sorts first: it would take label 0 and move cat, dog, fox to 1, 2, 3
    bat.mkdir()
    for name in contents:
        (bat / name).mkdir() if name.endswith("/") else (bat / name).write_text("x")
    message = rf"class folder train/bat \({holds}\) has no images .*label 0 of 4 .*put the images directly in it"
    with pytest.raises(InputError, match=message):
        data.load(f"folder:{root}")


def test_a_test_class_with_no_training_images_is_refused(tmp_path):
    root = write_folder(tmp_path / "pets")
    (root / "train" / "owl").mkdir()
    (root / "test" / "owl").mkdir()
    solid(root / "test" / "owl" / "0.png", 250)
    with pytest.raises(InputError, match=r"train/owl \(empty\) has no images .*or remove it \(and test/owl\)$"):
        data.load(f"folder:{root}")


def test_cli_refuses_a_single_class_in_one_line(tmp_path):
    root = write_folder(tmp_path / "pets")
    for split in ("train", "test"):
        shutil.rmtree(root / split / "dog")
        shutil.rmtree(root / split / "fox")
    proc = subprocess.run(
        [sys.executable, "-m", "attnjax.train", "--dataset", f"folder:{root}", "--workdir", str(tmp_path / "run")],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith(f"error: folder dataset {root}: {root / 'train'} has a single class folder (cat)")


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
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr
    assert f"attnjax: folder:{root}: read 48 train and 12 test images of 3 classes (60 .png); nothing skipped" in (
        proc.stderr
    )
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and records[-1]["test_examples"] == 12
    config = json.loads((workdir / "config.json").read_text())
    assert config["augment"] == "crop+flip" and config["dataset"]["image_shape"] == [8, 8, 3]
