"""``--init-from``: a run that starts from timm weights, on a folder dataset the test writes.

The weights are resnet18's, written with :func:`attnjax.models.pretrained.save` from a seeded
init whose batch-norm statistics are made non-trivial, with a config.json that asks for 32 x 32
images, crop 0.9 and bicubic resizing, so every field of the preprocessing is visible.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from image_folders import write_folder
from PIL import Image
from test_bad_input import run_cli, snapshot
from test_resume import SignalAt, assert_same_state, metrics

from attnjax import data, models
from attnjax.data.pretrained_transforms import EvalTransform
from attnjax.models import pretrained
from attnjax.train import Config, Interrupted, Recipe, init_from, train_and_evaluate
from attnjax.train.recipe import resolve_devices

SIZE = 32


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A resnet18 snapshot folder (model.safetensors and timm's config.json) with every variable non-trivial."""
    net = models.create("resnet18", num_classes=1000)
    variables = net.init(jax.random.key(7), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
    rng = np.random.default_rng(3)
    variables = jax.tree.map(lambda v: np.asarray(v) + rng.uniform(0.1, 0.5, np.shape(v)).astype(np.float32), variables)
    config = dataclasses.replace(
        pretrained.default_config("resnet18"),
        input_size=(3, SIZE, SIZE),
        crop_pct=0.9,
        interpolation="bicubic",
        default=False,
    )
    folder = tmp_path_factory.mktemp("weights")
    pretrained.save(folder, "resnet18", variables, config)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("photos"), size=(40, 36), per_class=(8, 4))


def config_for(weights, photos, **changes) -> Config:
    base = Config(
        model="resnet18",
        init_from=str(weights),
        dataset=f"folder:{photos}",
        epochs=2,
        batch_size=8,
        checkpoint_every_minutes=0.0,
    )
    return dataclasses.replace(base, **changes)


def flat(tree, prefix=()):
    out = {}
    for key, value in tree.items():
        out.update(flat(value, (*prefix, key)) if isinstance(value, dict) else {"/".join((*prefix, key)): value})
    return out


def test_the_loaded_layers_are_the_files_and_the_head_is_new(weights, photos):
    config = config_for(weights, photos)
    recipe = Recipe.build(config, *resolve_devices(config))
    scratch = dataclasses.replace(config, init_from=None)
    fresh = Recipe.build(scratch, *resolve_devices(scratch))
    file = flat(pretrained.load(weights, "resnet18").variables)
    got, new = flat(recipe.state.variables()), flat(fresh.state.variables())
    assert set(got) == set(new) and len(got) > 60
    for path, value in got.items():
        if path.startswith("params/fc/"):  # 3 classes here, 1000 in the file: as a fresh run initialises it
            assert value.shape[-1] == 3 and file[path].shape[-1] == 1000
            np.testing.assert_array_equal(value, new[path], err_msg=path)
        else:
            np.testing.assert_array_equal(value, file[path], err_msg=path)
            assert not np.array_equal(value, new[path]), path
    assert recipe.init_record["new"] == ["params/fc/kernel", "params/fc/bias"]
    assert "loaded 100 of 102 variables" in recipe.init_note and "1000 classes, this dataset 3" in recipe.init_note
    assert recipe.augment == "rrc+flip" and recipe.dataset.image_shape == (SIZE, SIZE, 3)
    assert recipe.dataset.mean == (0.485, 0.456, 0.406) and recipe.dataset.std == (0.229, 0.224, 0.225)


def test_the_test_split_is_the_weights_eval_transform(weights, photos):
    config = pretrained.load(weights, "resnet18").config
    dataset = data.load(f"folder:{photos}", pretrained=config)
    transform = EvalTransform.from_config(config)  # 40x36 -> shorter side floor(32 / 0.9) = 35, bicubic, crop 32
    files = sorted((photos / "test").glob("*/*.png"))
    expected = np.stack([transform.resize_crop(np.asarray(Image.open(f).convert("RGB"))) for f in files])
    np.testing.assert_array_equal(dataset.test.get_batch(np.arange(len(files)))["image"], expected)
    assert dataset.default_augment == "rrc+flip"


def test_grayscale_images_and_the_embedded_digits_are_refused_for_colour_weights(weights, tmp_path):
    config = pretrained.load(weights, "resnet18").config
    gray = write_folder(tmp_path / "gray", mode="L")
    with pytest.raises(ValueError, match="holds 1-channel images, and resnet18's weights take 3 channels"):
        data.load(f"folder:{gray}", pretrained=config)
    with pytest.raises(ValueError, match="digits is not a dataset for pretrained weights"):
        data.load("digits", pretrained=config)


@pytest.mark.slow
def test_an_init_from_run_trains_and_resumes_bit_exactly(weights, photos, tmp_path, capsys):
    # 24 training images in batches of 8: ticks 1-3 train epoch 1, 4-5 evaluate it, 6-8 train epoch 2.
    config = config_for(weights, photos)
    plain, interrupted = tmp_path / "plain", tmp_path / "interrupted"
    state, history = train_and_evaluate(config, str(plain))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    record = json.loads((plain / "config.json").read_text())
    assert record["config"]["init_from"] == str(weights) and record["pretrained"]["new"][0] == "params/fc/kernel"
    expected = dataclasses.replace(pretrained.load(weights, "resnet18").config, note="", label_names=None)
    assert init_from.preprocessing(record) == expected  # what viz and evaluate rebuild the dataset with
    with pytest.raises(Interrupted):
        train_and_evaluate(config, str(interrupted), preemption=SignalAt(7))
    assert "loaded 100 of 102 variables" in capsys.readouterr().out
    resumed, _ = train_and_evaluate(config, str(interrupted))
    out = capsys.readouterr().out
    assert "resumed from" in out and "loaded 100" not in out  # the checkpoint's variables, not the file's
    assert metrics(interrupted) == metrics(plain)
    assert_same_state(resumed, state)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--init-from", "{missing}"], "--init-from {missing}: weights {missing} do not exist"),
        (["--init-from", "{truncated}"], "--init-from {truncated}: cannot read"),
        (["--init-from", "{weights}", "--model", "seresnet18"], "holds timm's 'resnet18' weights"),
        (["--init-from", "{weights}", "--model", "cifar_resnet18"], "--model cifar_resnet18 is not one of timm's"),
        (["--init-from", "{weights}", "--block", "cbam", "--block-option", "reduction=8"], None),
        (["--init-from", "{weights}", "--dataset", "digits"], "digits is not a dataset for pretrained weights"),
    ],
)
def test_bad_weights_are_one_line_and_leave_the_workdir_untouched(weights, photos, tmp_path, capsys, options, message):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((weights / "model.safetensors").read_bytes()[:5000])
    paths = {"weights": weights, "missing": tmp_path / "gone.safetensors", "truncated": truncated}
    options = [o.format(**paths) for o in options]
    if message is None:  # another block: only its own variables are new, and the run may start
        config = config_for(weights, photos, block="cbam", block_option=("reduction=8",))
        recipe = Recipe.build(config, *resolve_devices(config))
        new = recipe.init_record["new"]
        assert len(new) > 2 and all("/block/" in path or "fc/" in path for path in new), new
        return
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    before = snapshot(workdir)
    argv = ["--model", "resnet18", "--dataset", f"folder:{photos}", "--epochs", "1", "--workdir", str(workdir)]
    code, err = run_cli([*argv, *options], capsys)
    assert code == 2 and message.format(**paths) in err
    assert len(err.strip().splitlines()) == 1, err
    assert snapshot(workdir) == before
