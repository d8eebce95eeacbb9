"""``python -m attnjax.evaluate`` and attnjax.data.pretrained_transforms against timm/torch on a generated folder.

The weights are real timm's resnet18 (random, 8 classes) with a config.json of unusual preprocessing (size 32,
crop 0.8, bicubic, non-ImageNet mean/std); the folder holds 6 classes of PNGs of several sizes, so the eval
transform's resize, crop and normalisation are all exercised. The reference computes the logits with timm's
model in torch on the same preprocessed images and the accuracies and loss with torch.topk/cross_entropy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from timm_reference import import_timm

from attnjax import evaluate as evaluate_command
from attnjax.data.images import decode_image
from attnjax.data.pretrained_transforms import EvalTransform
from attnjax.models import pretrained
from attnjax.validate import InputError

pytestmark = pytest.mark.torch

CLASSES = [f"class{k}" for k in range(6)]
SIZES = [(40, 52), (64, 48), (45, 45)]  # (width, height): portrait, landscape, square
CONFIG = {
    "architecture": "resnet18",
    "num_classes": 8,
    "pretrained_cfg": {
        "input_size": [3, 32, 32],
        "crop_pct": 0.8,
        "interpolation": "bicubic",
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.25, 0.3],
    },
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    timm = import_timm()
    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    for split, count in (("train", 1), ("test", 2)):
        for k, name in enumerate(CLASSES):
            folder = root / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = SIZES[(k + i) % len(SIZES)]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=8).eval()
    weights = root / "weights"
    weights.mkdir()
    safetensors.torch.save_file(model.state_dict(), str(weights / "model.safetensors"))
    (weights / "config.json").write_text(json.dumps(CONFIG))
    return root, model, weights


def reference(model, transform, root: Path, split="test"):
    """timm's logits on the same preprocessed images, scored with torch."""
    files, labels = [], []
    for k, name in enumerate(CLASSES):
        for path in sorted((root / "data" / split / name).iterdir()):
            files.append(path)
            labels.append(k)
    images = np.stack([transform(decode_image(str(p), 3, str(p))) for p in files])
    with torch.no_grad():
        logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    labels = torch.tensor(labels)
    top5 = logits.topk(5, dim=1).indices
    return {
        "top1": (top5[:, 0] == labels).double().mean().item(),
        "top5": (top5 == labels[:, None]).any(dim=1).double().mean().item(),
        "loss": torch.nn.functional.cross_entropy(logits.double(), labels).item(),
        "count": len(files),
    }


def test_eval_transform_is_the_configs():
    config = pretrained.config_from_json(CONFIG, "resnet18", "test config")
    transform = EvalTransform.from_config(config)
    assert (transform.image_size, transform.scale_size, transform.interpolation) == (32, 40, "bicubic")
    image = np.full((52, 40, 3), (255, 51, 0), np.uint8)  # constant: every resampling keeps it
    out = transform(image)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    expected = (np.array([1.0, 0.2, 0.0], np.float32) - np.float32([0.5, 0.4, 0.3])) / np.float32([0.2, 0.25, 0.3])
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-6)
    # torchvision's arithmetic: shorter side 40 -> floor(32 / 0.8) = 40, longer 52 -> int(40 * 52 / 40);
    # a 100 x 50 image: shorter 50 -> 40, longer int(40 * 100 / 50) = 80, crop offsets round((80 - 32) / 2)
    ramp = np.broadcast_to(np.arange(100, dtype=np.uint8)[None, :, None] * 2, (50, 100, 3)).copy()
    crop = EvalTransform(image_size=32, crop_pct=0.8, interpolation="nearest").resize_crop(ramp)
    resized = np.asarray(Image.fromarray(ramp).resize((80, 40), Image.NEAREST))
    np.testing.assert_array_equal(crop, resized[4:36, 24:56])


def test_evaluate_matches_timm_and_torch(setup):
    root, model, weights = setup
    loaded = pretrained.load(weights, "resnet18")
    expected = reference(model, EvalTransform.from_config(loaded.config), root)
    result = evaluate_command.evaluate(
        "resnet18", str(weights), f"folder:{root / 'data'}", batch_size=5, progress=False
    )
    assert result.count == expected["count"] == 12 and result.num_classes == len(CLASSES)
    assert result.top1 == pytest.approx(expected["top1"], abs=1e-12)
    assert result.top5 == pytest.approx(expected["top5"], abs=1e-12)
    assert result.loss == pytest.approx(expected["loss"], rel=1e-4)
    assert 0 < result.top5 < 1  # 8 outputs, 6 classes: top-5 is not trivially 1
    bigger = evaluate_command.evaluate(
        "resnet18", str(weights), f"folder:{root / 'data'}", image_size=48, split="train", progress=False
    )
    expected = reference(model, EvalTransform.from_config(loaded.config, 48), root, "train")
    assert (bigger.top1, bigger.top5) == pytest.approx((expected["top1"], expected["top5"]), abs=1e-12)
    assert bigger.loss == pytest.approx(expected["loss"], rel=1e-4)


def test_evaluate_refusals(setup, tmp_path):
    root, _, weights = setup
    data = f"folder:{root / 'data'}"
    with pytest.raises(InputError, match="folder:PATH"):
        evaluate_command.evaluate("resnet18", str(weights), "mnist", progress=False)
    with pytest.raises(InputError, match="--split 'val'"):
        evaluate_command.evaluate("resnet18", str(weights), data, split="val", progress=False)
    few = tmp_path / "few"
    few.mkdir()
    torch.manual_seed(1)
    safetensors.torch.save_file(
        import_timm().create_model("resnet18", num_classes=4).state_dict(), str(few / "w.safetensors")
    )
    with pytest.raises(InputError, match="6 classes and resnet18's weights 4 outputs"):
        evaluate_command.evaluate("resnet18", str(few / "w.safetensors"), data, progress=False)


def command(*args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "attnjax.evaluate", *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.subprocess
def test_command_line(setup, tmp_path):
    root, model, weights = setup
    repo = Path(__file__).resolve().parents[1]
    data = f"folder:{root / 'data'}"
    done = command("--model", "resnet18", "--weights", str(weights), "--dataset", data, "--batch-size", "4", cwd=repo)
    assert done.returncode == 0, done.stderr
    loaded = pretrained.load(weights, "resnet18")
    expected = reference(model, EvalTransform.from_config(loaded.config), root)
    line = done.stdout.strip()
    assert line.startswith(f"resnet18 on {data} (test): top-1 {expected['top1']:.4f} top-5 {expected['top5']:.4f}")
    assert line.endswith("(12 images, 6 classes)") and "\n" not in line
    assert "Traceback" not in done.stderr

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    for weights_arg in (str(bad), str(tmp_path / "missing.pth")):
        failed = command("--model", "resnet18", "--weights", weights_arg, "--dataset", data, cwd=repo)
        assert failed.returncode == 2
        assert failed.stdout == "" and "Traceback" not in failed.stderr
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and weights_arg in lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """AttentionNet + SE trained for one epoch on the embedded digits (the trainer's own evaluation recorded)."""
    import jax

    from attnjax.train import Config, train_and_evaluate

    workdir = tmp_path_factory.mktemp("run")
    train_and_evaluate(Config(block="se", epochs=1), str(workdir), devices=jax.local_devices()[:1])
    return workdir


def test_workdir_is_evaluated_as_the_trainer_did(trained_run):
    result = evaluate_command.evaluate_workdir(str(trained_run), batch_size=48, progress=False)
    last = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert result.count == last["test_examples"]
    assert round(result.top1 * result.count) == last["test_correct"]
    assert result.loss == pytest.approx(last["test_loss"], rel=1e-4)
    assert result.top1 == pytest.approx(last["test_accuracy"], abs=1e-12)
    assert result.top1 <= result.top5 <= 1 and result.num_classes == 10


def test_workdir_refusals(tmp_path):
    with pytest.raises(InputError, match="config.json does not exist"):
        evaluate_command.evaluate_workdir(str(tmp_path), progress=False)
    repo = Path(__file__).resolve().parents[1]
    both = command("--workdir", str(tmp_path), "--model", "resnet18", cwd=repo)
    assert both.returncode == 2 and "drop --model" in both.stderr and "Traceback" not in both.stderr
    neither = command("--model", "resnet18", cwd=repo)
    assert neither.returncode == 2 and "--weights, --dataset are required" in neither.stderr
