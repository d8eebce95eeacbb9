"""``python -m attnjax.viz``: attention maps of a trained model, drawn from the workdir's files."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from image_folders import write_folder
from PIL import Image

from attnjax import blocks, data, models, viz
from attnjax.data.augment import normalize
from attnjax.train import CONFIG_FILE, Config, checkpoint, train_and_evaluate
from attnjax.validate import InputError


@pytest.fixture(scope="module")
def cbam_run(tmp_path_factory):
    """AttentionNet + CBAM (a channel and a spatial map) trained for 2 epochs on the embedded digits."""
    workdir = tmp_path_factory.mktemp("cbam-run")
    train_and_evaluate(Config(block="cbam", epochs=2), str(workdir), devices=jax.local_devices()[:1])
    return workdir


def restored(workdir):
    """The model and its saved variables, rebuilt here without attnjax.viz."""
    net = models.create("attention_net", num_classes=10, block="cbam")
    template = net.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)), train=False)
    return net, checkpoint.load_variables(str(workdir), template)


def test_saved_variables_are_the_trained_model(cbam_run):
    net, variables = restored(cbam_run)
    ds = data.load("digits")
    test = ds.test.get_batch(np.arange(len(ds.test)))
    logits = net.apply(variables, normalize(test["image"], ds.mean, ds.std), train=False)
    correct = int(np.sum(np.argmax(logits, -1) == test["label"]))
    last = [json.loads(line) for line in (cbam_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert correct == last["test_correct"]


def test_viz_draws_the_models_own_sown_maps(cbam_run, tmp_path):
    out, fig, maps = viz.render(str(cbam_run), num_images=4, out=str(tmp_path / "maps.png"))
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 100 and png.height > 100
        assert np.asarray(png.convert("L")).std() > 10  # not a blank canvas

    net, variables = restored(cbam_run)
    ds = data.load("digits")
    images = normalize(ds.test.get_batch(np.arange(4))["image"], ds.mean, ds.std)
    _, state = net.apply(variables, images, train=False, mutable=["intermediates"])
    sown = state["intermediates"]["block"]
    assert [m.path for m in maps] == ["block/channel", "block/spatial"]
    axes = np.asarray(fig.axes[:12]).reshape(4, 3)  # rows: images; columns: image, channel, spatial (then colour bars)
    for r in range(4):
        spatial = axes[r, 2].images[-1].get_array()
        np.testing.assert_allclose(spatial, np.asarray(sown["spatial"][0])[r, :, :, 0], rtol=1e-6)
        channel = axes[r, 1].images[-1].get_array()
        np.testing.assert_allclose(channel, np.asarray(sown["channel"][0])[r].reshape(1, -1), rtol=1e-6)
    assert all(len(ax.images) == 1 for ax in axes[:, 0])  # the input image alone in the first column


def test_pairwise_maps_show_the_attention_each_position_receives():
    rng = np.random.default_rng(0)
    heads = rng.dirichlet(np.ones(6), size=(2, 3, 6))  # (N, heads, queries, keys), rows sum to 1
    shown, spatial = viz.displayable(heads, (2, 3), "mhsa")
    assert spatial and shown.shape == (2, 2, 3)
    np.testing.assert_allclose(shown, heads.mean(axis=(1, 2)).reshape(2, 2, 3))
    np.testing.assert_allclose(shown.sum(axis=(1, 2)), 1.0)  # a distribution over the keys


def test_channel_weights_are_drawn_as_strips():
    sk = np.arange(2 * 5 * 2, dtype=float).reshape(2, 1, 1, 5, 2)  # (N, 1, 1, C, branches)
    shown, spatial = viz.displayable(sk, (4, 4), "sk")
    assert not spatial and shown.shape == (2, 2, 5)
    np.testing.assert_array_equal(shown[1, 0], sk[1, 0, 0, :, 0])
    with pytest.raises(InputError, match="cannot draw"):
        viz.displayable(np.zeros((2, 7)), (4, 4), "odd")


def test_rgb_models_get_the_photographs_too(tmp_path):
    workdir = tmp_path / "run"
    config = Config(
        dataset=f"folder:{write_folder(tmp_path / 'pets', size=(16, 16))}", block="coord", epochs=1, batch_size=8
    )
    train_and_evaluate(config, str(workdir), devices=jax.local_devices()[:1])
    out, fig, maps = viz.render(str(workdir), num_images=2)
    assert out == str(workdir / viz.OUTPUT_FILE)
    assert [m.path for m in maps] == ["block/height", "block/width"]
    # The block sees AttentionNet's 8x8 pooled maps; each one-axis gate is drawn stretched over the image.
    rows = 2 + len(viz.PHOTOS)
    assert [m.shown.shape for m in maps] == [(rows, 8, 1), (rows, 1, 8)] and all(m.spatial for m in maps)
    assert len(fig.axes) == rows * 3 + 2
    photos = viz.photos(16)
    assert photos.shape == (len(viz.PHOTOS), 16, 16, 3) and photos.dtype == np.uint8 and photos.std() > 10


def test_cli_writes_the_png_and_explains_a_bad_workdir(cbam_run, tmp_path):
    out = tmp_path / "cli.png"
    proc = subprocess.run(
        [sys.executable, "-m", "attnjax.viz", "--workdir", str(cbam_run), "--images", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0 and "block/spatial" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "attnjax.viz", "--workdir", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "config.json does not exist" in proc.stderr and "Traceback" not in proc.stderr


def viz_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "attnjax.viz", *map(str, args)], check=False, capture_output=True, text=True, timeout=300
    )


def refused_in_one_line(proc, *needles):
    """Exit status 2 and one ``error:`` line on stderr naming ``needles``, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.strip()]
    assert line.startswith("error: ") and all(needle in line for needle in needles), line


def test_cli_creates_the_missing_folders_of_out_and_refuses_one_under_a_file(cbam_run, tmp_path):
    out = tmp_path / "new" / "deeper" / "maps.png"
    proc = viz_cli("--workdir", cbam_run, "--images", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.stat().st_size > 0
    (tmp_path / "a-file").write_text("not a folder")
    under_a_file = tmp_path / "a-file" / "maps.png"
    refused_in_one_line(viz_cli("--workdir", cbam_run, "--out", under_a_file), str(tmp_path / "a-file"), "--out")


def test_cli_refuses_a_read_only_workdir_naming_the_png_and_out(cbam_run, tmp_path):
    workdir = tmp_path / "read-only-run"
    workdir.mkdir()
    for name in (CONFIG_FILE, checkpoint.VARIABLES_FILE):
        shutil.copy(cbam_run / name, workdir / name)
    png = workdir / viz.OUTPUT_FILE
    if os.geteuid() == 0:  # root writes through a chmod: make the default PNG unwritable for root too
        png.mkdir()
    os.chmod(workdir, 0o555)
    try:
        refused_in_one_line(viz_cli("--workdir", workdir, "--images", "1"), str(png), "--out")
        out, _, _ = viz.render(str(workdir), num_images=1, out=str(tmp_path / "elsewhere.png"))  # the fix named
        assert os.path.getsize(out) > 0
    finally:
        os.chmod(workdir, 0o755)


def drawn_equals_sown(workdir, config: Config, num_images: int = 3):
    """The maps viz draws are those that ``config``'s model (built here from its factory options) sows."""
    out, fig, maps = viz.render(str(workdir), num_images=num_images, with_photos=False)
    net = models.create(
        config.model,
        num_classes=10,
        block=config.block,
        block_options=blocks.parse_options(config.block, config.block_option) if config.block_option else {},
        **models.parse_model_options(config.model, config.model_option),
    )
    template = net.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)), train=False)
    variables = checkpoint.load_variables(str(workdir), template)
    ds = data.load("digits")
    images = normalize(ds.test.get_batch(np.arange(num_images))["image"], ds.mean, ds.std)
    _, state = net.apply(variables, images, train=False, mutable=["intermediates"])
    flat = jax.tree_util.tree_flatten_with_path(state["intermediates"], is_leaf=lambda x: isinstance(x, tuple))[0]
    sown = {"/".join(k.key for k in path): np.asarray(value[0]) for path, value in flat}
    assert maps and {m.path for m in maps} <= set(sown)
    for m in maps:
        np.testing.assert_allclose(m.raw, sown[m.path], rtol=1e-6, atol=1e-7, err_msg=m.path)
    return maps


def test_a_block_option_that_keeps_the_shapes_is_drawn_with_that_option(tmp_path):
    """ese's gate changes no parameter: a viz that ignored --block-option would draw another gate, silently."""
    config = Config(block="ese", block_option=("gate=sigmoid",), epochs=1)
    train_and_evaluate(config, str(tmp_path), devices=jax.local_devices()[:1])
    (gate,) = drawn_equals_sown(tmp_path, config)
    # The default gate (hard_sigmoid) on the same weights gives other values: the option is what was drawn.
    net = models.create("attention_net", num_classes=10, block="ese")
    variables = checkpoint.load_variables(
        str(tmp_path), net.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)), train=False)
    )
    ds = data.load("digits")
    images = normalize(ds.test.get_batch(np.arange(3))["image"], ds.mean, ds.std)
    _, state = net.apply(variables, images, train=False, mutable=["intermediates"])
    hard = np.asarray(jax.tree.leaves(state["intermediates"])[0])
    assert np.abs(hard - gate.raw).max() > 1e-3


@pytest.mark.subprocess
def test_viz_draws_a_run_trained_with_a_block_option_that_changes_the_shapes(tmp_path):
    """The issue's case: ``--block cbam --block-option reduction=8``, through both commands."""
    workdir = tmp_path / "run"
    train = [sys.executable, "-m", "attnjax.train", "--block", "cbam", "--block-option", "reduction=8"]
    proc = subprocess.run(
        [*train, "--epochs", "1", "--workdir", str(workdir)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, "-m", "attnjax.viz", "--workdir", str(workdir), "--images", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workdir / viz.OUTPUT_FILE).stat().st_size > 0 and "block/spatial" in proc.stdout
    drawn_equals_sown(workdir, Config(block="cbam", block_option=("reduction=8",)))


def test_viz_draws_a_run_trained_with_a_model_option(tmp_path):
    config = Config(
        model="cifar_resnet18", model_option=("stem=imagenet", "stage_sizes=1"), block="se", epochs=1, batch_size=64
    )
    train_and_evaluate(config, str(tmp_path), devices=jax.local_devices()[:1])
    maps = drawn_equals_sown(tmp_path, config)
    assert [m.path for m in maps] == ["layer1_0/block/attention"]
