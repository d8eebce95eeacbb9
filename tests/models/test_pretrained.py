"""attnjax.models.pretrained against real timm checkpoints: files, snapshot folders and the hub cache, offline.

The checkpoints are timm 1.0.29's own resnet18/seresnet18 with random weights (and random running statistics,
so that the batch norms' statistics matter), written with safetensors.torch, torch.save and timm's save_for_hf
into tmp_path; the hub is the real huggingface_hub over a cache laid out here, with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import datetime
import json

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from timm_reference import import_timm

from attnjax import models
from attnjax.models import pretrained
from attnjax.validate import InputError

pytestmark = pytest.mark.torch

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def timm():
    return import_timm()


@pytest.fixture(scope="module")
def resnet18(timm):
    torch.manual_seed(0)
    return randomized(timm.create_model("resnet18"), 1)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(2, 3, 40, 40)).astype(np.float32)


def timm_logits(model, images):
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def attnjax_logits(name, loaded, images):
    net = models.create(name, num_classes=loaded.config.num_classes)
    return np.asarray(net.apply(loaded.variables, images.transpose(0, 2, 3, 1)))


def assert_same_logits(name, loaded, model, images):
    ours, theirs = attnjax_logits(name, loaded, images), timm_logits(model, images)
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max(), rtol=0)


def state(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_importing_needs_neither_torch_nor_timm():
    import subprocess
    import sys

    code = (
        "import sys, attnjax.models.pretrained, attnjax.evaluate; print('torch' in sys.modules, 'timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_safetensors_logits_are_timms(resnet18, images, tmp_path):
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(resnet18.state_dict(), str(path))
    loaded = pretrained.load(path, "resnet18")
    assert loaded.new == () and loaded.source == str(path)
    assert loaded.config.default and "default" in loaded.config.note
    assert_same_logits("resnet18", loaded, resnet18, images)


def test_seresnet18_pth_logits_are_timms(timm, images, tmp_path):
    torch.manual_seed(2)
    model = randomized(timm.create_model("seresnet18", num_classes=10), 3)
    path = tmp_path / "seresnet18.pth"
    torch.save(model.state_dict(), path)
    loaded = pretrained.load(path, "seresnet18")
    assert loaded.config.num_classes == 10
    assert_same_logits("seresnet18", loaded, model, images)


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd, other: {"state_dict": sd, "optimizer": {}, "epoch": 3}, id="state_dict"),
        pytest.param(lambda sd, other: {"model": sd}, id="model"),
        pytest.param(lambda sd, other: {"state_dict": other, "state_dict_ema": sd}, id="ema-first"),
        pytest.param(lambda sd, other: {"model": other, "model_ema": sd}, id="model_ema"),
        pytest.param(lambda sd, other: {f"module.{k}": v for k, v in sd.items()}, id="ddp-prefix"),
        pytest.param(lambda sd, other: {"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}}, id="compiled"),
        pytest.param(
            lambda sd, other: {"state_dict": sd, "arch": "resnet18", "args": argparse.Namespace(model="resnet18")},
            id="timm-train-checkpoint",
        ),
    ],
)
def test_timm_checkpoint_wrappers_are_unwrapped(wrap, resnet18, images, tmp_path):
    other = {key: torch.zeros_like(value) for key, value in resnet18.state_dict().items()}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(wrap(state(resnet18), other), path)
    assert_same_logits("resnet18", pretrained.load(path, "resnet18"), resnet18, images)


@pytest.mark.parametrize(
    "dtype, suffix", [(torch.float16, "safetensors"), (torch.bfloat16, "safetensors"), (torch.bfloat16, "pth")]
)
def test_half_precision_weights_read_as_float32(dtype, suffix, resnet18, images, tmp_path):
    path = tmp_path / f"half.{suffix}"
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in resnet18.state_dict().items()}
    if suffix == "pth":
        torch.save(half, path)
    else:
        safetensors.torch.save_file(half, str(path))
    loaded = pretrained.load(path, "resnet18")
    assert loaded.variables["params"]["conv1"]["kernel"].dtype == np.float32
    np.testing.assert_array_equal(
        loaded.variables["params"]["conv1"]["kernel"],
        half["conv1.weight"].float().numpy().transpose(2, 3, 1, 0),
    )


def test_snapshot_folder_written_by_timm_carries_its_config(timm, images, tmp_path):
    torch.manual_seed(4)
    model = randomized(timm.create_model("resnet18", num_classes=5), 5)
    model.pretrained_cfg = {**model.pretrained_cfg, "crop_pct": 0.95, "interpolation": "bicubic"}
    timm.models.save_for_hf(model, tmp_path / "snap", safe_serialization=True)
    loaded = pretrained.load(tmp_path / "snap", "resnet18")
    assert_same_logits("resnet18", loaded, model, images)
    cfg = model.pretrained_cfg
    config = loaded.config
    assert not config.default and "config.json" in config.note
    assert (config.num_classes, config.crop_pct, config.interpolation) == (5, 0.95, "bicubic")
    assert config.input_size == tuple(cfg["input_size"])
    assert config.mean == tuple(cfg["mean"]) and config.std == tuple(cfg["std"])


def test_pytorch_bin_folder_and_config_beside_a_file(resnet18, images, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(resnet18.state_dict(), folder / "pytorch_model.bin")
    config = {"architecture": "resnet18", "num_classes": 1000, "pretrained_cfg": {"input_size": [3, 160, 160]}}
    (folder / "config.json").write_text(json.dumps(config))
    for source in (folder, folder / "pytorch_model.bin"):
        loaded = pretrained.load(source, "resnet18")
        assert loaded.config.input_size == (3, 160, 160) and not loaded.config.default
        assert_same_logits("resnet18", loaded, resnet18, images)


def test_default_config_is_timms_resnet_cfg(timm):
    from timm.models.resnet import _cfg

    cfg, ours = _cfg(), pretrained.default_config("resnet18")
    assert ours.default
    assert ours.input_size == cfg["input_size"] and ours.crop_pct == cfg["crop_pct"]
    assert ours.interpolation == cfg["interpolation"] and ours.num_classes == cfg["num_classes"]
    assert ours.mean == cfg["mean"] and ours.std == cfg["std"]


def hub_cache(root, repo: str, files: dict) -> None:
    """A Hugging Face hub cache as huggingface_hub lays it out: blobs, a snapshot of links, refs/main."""
    base = root / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (base / "blobs").mkdir()
    for name, write in files.items():
        blob = base / "blobs" / f"blob-{name}"
        write(blob)
        (snapshot / name).symlink_to(blob)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(COMMIT)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_offline_from_the_cache(resnet18, images, offline_hub):
    config = {"architecture": "resnet18", "num_classes": 1000, "pretrained_cfg": {"crop_pct": 0.95}}
    hub_cache(
        offline_hub,
        "timm/resnet18.test_in1k",
        {
            "model.safetensors": lambda p: safetensors.torch.save_file(resnet18.state_dict(), str(p)),
            "config.json": lambda p: p.write_text(json.dumps(config)),
        },
    )
    for source in ("timm/resnet18.test_in1k", "hf-hub:timm/resnet18.test_in1k"):
        loaded = pretrained.load(source, "resnet18")
        assert loaded.config.crop_pct == 0.95 and not loaded.config.default
        assert COMMIT in loaded.source
        assert_same_logits("resnet18", loaded, resnet18, images)


def test_hub_id_with_pytorch_bin_only(resnet18, images, offline_hub):
    hub_cache(offline_hub, "timm/resnet18.bin_only", {"pytorch_model.bin": lambda p: torch.save(state(resnet18), p)})
    loaded = pretrained.load("timm/resnet18.bin_only", "resnet18")
    assert loaded.config.default
    assert_same_logits("resnet18", loaded, resnet18, images)


def test_unknown_hub_id_offline_says_how_to_fix(offline_hub):
    with pytest.raises(InputError) as error:
        pretrained.load("timm/resnet18.not_downloaded", "resnet18")
    message = str(error.value)
    assert "\n" not in message and "resnet18.not_downloaded" in message
    assert "HF_HUB_OFFLINE" in message and "local weights file" in message


def test_a_new_classifier_is_left_to_the_caller(resnet18, images, tmp_path):
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(resnet18.state_dict(), str(path))
    loaded = pretrained.load(path, "resnet18", num_classes=7)
    assert loaded.new == ("params/fc/kernel", "params/fc/bias") and "fc" not in loaded.variables["params"]
    assert loaded.config.num_classes == 7
    net = models.create("resnet18", num_classes=7)
    fresh = jax.tree.map(np.asarray, net.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
    merged = pretrained.merge(fresh, loaded.variables)
    np.testing.assert_array_equal(merged["params"]["fc"]["kernel"], fresh["params"]["fc"]["kernel"])
    np.testing.assert_array_equal(merged["params"]["conv1"]["kernel"], loaded.variables["params"]["conv1"]["kernel"])
    np.testing.assert_array_equal(
        merged["batch_stats"]["layer4_1"]["bn2"]["var"], loaded.variables["batch_stats"]["layer4_1"]["bn2"]["var"]
    )
    # the features are timm's: timm's logits through our fresh classifier
    with torch.no_grad():
        features = resnet18.forward_head(resnet18.forward_features(torch.from_numpy(images)), pre_logits=True).numpy()
    expected = features @ fresh["params"]["fc"]["kernel"] + fresh["params"]["fc"]["bias"]
    ours = np.asarray(net.apply(merged, images.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(ours, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)
    same = pretrained.load(path, "resnet18", num_classes=1000)
    assert same.new == () and "fc" in same.variables["params"]


def test_merge_refuses_another_models_variables(resnet18, tmp_path):
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(resnet18.state_dict(), str(path))
    loaded = pretrained.load(path, "resnet18")
    net = models.create("resnet18", num_classes=10)
    fresh = net.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(InputError, match=r"params/fc/kernel has shape \(512, 1000\)"):
        pretrained.merge(fresh, loaded.variables)


def test_save_is_loaded_by_timm(timm, resnet18, images, tmp_path):
    path = tmp_path / "in.safetensors"
    safetensors.torch.save_file(resnet18.state_dict(), str(path))
    loaded = pretrained.load(path, "resnet18")
    config = pretrained.PretrainedConfig("resnet18", crop_pct=0.9, interpolation="bicubic", input_size=(3, 192, 192))
    weights = pretrained.save(tmp_path / "out", "resnet18", loaded.variables, config)
    assert weights == tmp_path / "out" / "model.safetensors"
    model = timm.create_model("resnet18").eval()
    timm.models.load_checkpoint(model, str(weights))
    np.testing.assert_array_equal(timm_logits(model, images), timm_logits(resnet18, images))
    cfg, architecture, _ = timm.models._hub.load_model_config_from_path(tmp_path / "out")
    assert architecture == "resnet18"
    assert (cfg["crop_pct"], cfg["interpolation"], tuple(cfg["input_size"])) == (0.9, "bicubic", (3, 192, 192))
    again = pretrained.load(tmp_path / "out", "resnet18")
    assert again.config == dataclasses_replace(config, note=again.config.note)
    pretrained.save(tmp_path / "file.safetensors", "resnet18", loaded.variables)
    assert pretrained.load(tmp_path / "file.safetensors", "resnet18").config.crop_pct == 0.875


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


# ---- refusals: one line each, nothing returned -----------------------------------------------------------------


def _truncated(path, sd):
    safetensors.torch.save_file(sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_pth(path, sd):
    torch.save(sd, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _without(key):
    def write(path, sd):
        safetensors.torch.save_file({k: v for k, v in sd.items() if k != key}, str(path))

    return write


def _extra(path, sd):
    safetensors.torch.save_file({**sd, "head.weight": torch.zeros(3)}, str(path))


def _reshaped(path, sd):
    sd = dict(sd)
    sd["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    safetensors.torch.save_file(sd, str(path))


def _other_model(path, sd):
    import_timm()
    torch.manual_seed(0)
    safetensors.torch.save_file(import_timm().create_model("seresnet18").state_dict(), str(path))


def _resnet34_config(path, sd):
    safetensors.torch.save_file(sd, str(path))
    (path.parent / "config.json").write_text(json.dumps({"architecture": "resnet34", "pretrained_cfg": {}}))


BAD_FILES = {
    "missing": ("gone.safetensors", None, r"gone.safetensors do not exist"),
    "truncated-safetensors": ("cut.safetensors", _truncated, r"cannot read .*cut.safetensors as safetensors"),
    "garbage-safetensors": ("junk.safetensors", lambda p, sd: p.write_bytes(b"not a tensor file" * 10), "safetensors"),
    "garbage-pth": ("junk.pth", lambda p, sd: p.write_bytes(b"\x00garbage" * 50), "as a PyTorch checkpoint"),
    "truncated-pth": ("cut.pth", _truncated_pth, "as a PyTorch checkpoint"),
    "code-in-pickle": (
        "obj.pth",
        lambda p, sd: torch.save({"state_dict": sd, "day": datetime.date(2026, 1, 1)}, p),
        "Python objects",
    ),
    "not-a-dict": ("list.pth", lambda p, sd: torch.save(list(sd.values()), p), "holds a list, not a state dict"),
    "another-model": ("se.safetensors", _other_model, r"'layer1.0.se.fc1.(weight|bias)' is not in it"),
    "missing-key": (
        "nokey.safetensors",
        _without("layer3.1.bn2.running_var"),
        r"'layer3.1.bn2.running_var' is missing",
    ),
    "extra-key": ("extra.safetensors", _extra, r"'head.weight' is not in it"),
    "shape": ("shape.safetensors", _reshaped, r"'layer2.0.conv1.weight' has shape \(128, 64, 1, 1\)"),
    "config-of-another-model": ("r34/w.safetensors", _resnet34_config, r"'resnet34' weights .* pass the model"),
    "empty-folder": ("empty", lambda p, sd: p.mkdir(), "holds no model.safetensors or pytorch_model.bin"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_one_line(case, resnet18, tmp_path):
    filename, write, pattern = BAD_FILES[case]
    path = tmp_path / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    if write is not None:
        write(path, state(resnet18))
    with pytest.raises(InputError, match=pattern) as error:
        pretrained.load(path, "resnet18")
    assert "\n" not in str(error.value)


def test_unknown_network_is_refused(tmp_path):
    with pytest.raises(InputError, match="'cifar_resnet18' has no timm weights"):
        pretrained.load(tmp_path / "x.safetensors", "cifar_resnet18")


def test_malformed_config_is_one_line(resnet18, tmp_path):
    safetensors.torch.save_file(resnet18.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"pretrained_cfg": {"crop_pct": 2}}')
    with pytest.raises(InputError, match="crop_pct 2.0") as error:
        pretrained.load(tmp_path, "resnet18")
    assert "\n" not in str(error.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read .*config.json"):
        pretrained.load(tmp_path, "resnet18")
