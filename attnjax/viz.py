"""Attention maps of a trained model, drawn over real images: ``python -m attnjax.viz --workdir W``.

Reads ``W/config.json`` and ``W/variables.msgpack`` (written by ``python -m attnjax.train``),
runs the model on the first test images of its dataset (and, for RGB models, on photographs
that ship with scikit-image), and writes ``W/attention.png``: one row per image, the image
first, then one column per attention map the model's blocks sow, each with a colour bar.

How a sown map becomes a picture (no values are invented; each panel shows its map at the
block's own resolution):

- a spatial gate ``(N, h, w, C)`` (seed, softmax, simam, bam, cbam's spatial gate, gc,
  coord and triplet's one-axis gates): the mean over channels, drawn over the image;
- pairwise attention ``(N, [heads,] HW, HW)`` (nonlocal, mhsa): the attention each position
  receives, averaged over queries and heads, drawn over the image;
- channel attention ``(N, 1, 1, C[, K])`` (se, eca, cbam's channel gate, sk): the weights as
  a strip of C cells (K rows for sk's K branches), beside the image.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import train
from attnjax.data.augment import normalize
from attnjax.data.dataset import to_unit_range
from attnjax.data.images import resize_center_crop
from attnjax.validate import CommandLineParser, InputError

OUTPUT_FILE = "attention.png"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # colour photographs inside scikit-image's wheel


@dataclasses.dataclass
class Map:
    """One sown attention map: where it was sown, the raw array, and what is drawn."""

    path: str  # e.g. "block/spatial"
    raw: np.ndarray  # as sown, batch first
    shown: np.ndarray  # (N, rows, cols): the drawn values
    spatial: bool  # drawn over the image (True) or as a channel strip (False)


def sown_maps(model, variables: dict, images: jax.Array) -> list[Map]:
    """Every attention map that ``model``'s blocks sow on ``images``, in module order."""
    _, state = model.apply(
        variables, images, train=False, mutable=["intermediates"], capture_intermediates=_is_attention_block
    )
    flat = jax.tree_util.tree_flatten_with_path(state["intermediates"], is_leaf=lambda x: isinstance(x, tuple))[0]
    by_path = {tuple(k.key for k in path): value for path, value in flat}
    maps = []
    for path, value in by_path.items():
        if path[-1] == "__call__":
            continue
        block_output = by_path.get((*path[:-1], "__call__"))
        feature_hw = None if block_output is None else tuple(block_output[0].shape[1:3])
        raw = np.asarray(value[0], np.float32)  # bfloat16 and float16 runs sow maps in their dtype
        shown, spatial = displayable(raw, feature_hw, "/".join(path))
        maps.append(Map("/".join(path), raw, shown, spatial))
    return maps


def _is_attention_block(module, method_name: str) -> bool:
    # The block's output gives the feature map's size for pairwise (HW x HW) maps.
    return method_name == "__call__" and type(module).__module__.startswith("attnjax.blocks.")


def displayable(raw: np.ndarray, feature_hw: tuple[int, int] | None, name: str) -> tuple[np.ndarray, bool]:
    """``(N, rows, cols)`` values to draw for a sown map, and whether they are spatial (see the module doc)."""
    n = raw.shape[0]
    if feature_hw:
        h, w = feature_hw
        gate = raw.ndim == 4 and raw.shape[1:3] in {(h, w), (h, 1), (1, w)} - {(1, 1)}
    else:
        gate = raw.ndim == 4 and (raw.shape[1] > 1 or raw.shape[2] > 1)
    if gate:  # (N, h, w, C) over the whole map or along one axis
        return raw.mean(axis=-1), True
    if raw.ndim >= 3 and raw.shape[-1] == raw.shape[-2] and feature_hw and raw.shape[-1] == np.prod(feature_hw):
        received = raw.reshape(n, -1, raw.shape[-1]).mean(axis=1)  # over heads and queries
        return received.reshape(n, *feature_hw), True
    if raw.ndim >= 4 and raw.shape[1] == raw.shape[2] == 1:  # (N, 1, 1, C[, K]) channel weights
        weights = raw.reshape(n, raw.shape[3], -1)
        return np.swapaxes(weights, 1, 2), False
    raise InputError(f"cannot draw the attention map {name} of shape {raw.shape}")


def photos(size: int) -> np.ndarray:
    """scikit-image's colour photographs, centre-cropped and resized to ``size`` x ``size``, uint8."""
    try:
        import skimage.data
    except ImportError:
        raise InputError("the photographs come from scikit-image: pip install 'attnjax[viz]'") from None
    return np.stack([resize_center_crop(getattr(skimage.data, name)(), size) for name in PHOTOS])


def load_run(workdir: str):
    """The model, its trained variables, the run's record (config.json) and its dataset, from ``workdir``."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise InputError(f"{path} does not exist: --workdir must be a folder written by python -m attnjax.train")
    try:
        with open(path) as f:
            run = json.load(f)
        config, described = train.Config.from_dict(train.recorded_config(run)), run["dataset"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise InputError(
            f"{path} is not a readable run record ({type(error).__name__}: {error}); "
            "pass the --workdir of a run of python -m attnjax.train"
        ) from None
    model = train.create_model(config, described["num_classes"])  # the code that built the model it trained
    template = model.init(jax.random.key(0), jnp.zeros((1, *described["image_shape"]), jnp.float32), train=False)
    variables = train.checkpoint.load_variables(workdir, template)
    dataset = train.load_dataset(config, train.init_from.preprocessing(run))  # as it trained, without the weights
    return model, variables, run, dataset


def render(workdir: str, *, num_images: int = 6, with_photos: bool | None = None, out: str | None = None):
    """Draw the attention maps of the model trained in ``workdir``; returns ``(png path, figure, maps)``.

    ``with_photos`` (default: for RGB models) adds scikit-image's photographs after the test images.
    ``out`` (default ``workdir/attention.png``) may name a folder that does not exist yet: it is created.
    """
    figure_class = _figure_class()
    model, variables, run, dataset = load_run(workdir)
    out_given = bool(out)
    out = _output_path(workdir, out)  # before the model runs: a PNG that cannot be written fails at once
    shape = tuple(run["dataset"]["image_shape"])
    test = dataset.test.get_batch(np.arange(min(num_images, len(dataset.test))))
    images, titles = test["image"], [f"test {i}: {dataset.class_names[y]}" for i, y in enumerate(test["label"])]
    if with_photos is None:
        with_photos = shape[-1] == 3
    if with_photos:
        if shape[0] != shape[1] or shape[-1] != 3:
            raise InputError(f"photographs need a model for square RGB images; this one takes {shape}")
        extra = photos(shape[0])
        images = np.concatenate([to_unit_range(images), to_unit_range(extra)])
        titles += list(PHOTOS)
    inputs = normalize(images, run["dataset"]["mean"], run["dataset"]["std"])
    maps = sown_maps(model, variables, jnp.asarray(inputs))
    if not maps:
        raise InputError(f"the model in {workdir} has no attention block (block {run['config']['block']!r})")
    logits = model.apply(variables, jnp.asarray(inputs), train=False)
    predicted = [dataset.class_names[int(k)] for k in np.argmax(logits, -1)]

    fig = _draw(figure_class, to_unit_range(images), maps, titles, predicted, run)
    try:
        fig.savefig(out, dpi=100, bbox_inches="tight")
    except OSError as error:
        raise _unwritable(out, error, chosen=out_given) from None
    return out, fig, maps


def _output_path(workdir: str, out: str | None) -> str:
    """Where the PNG goes; an ``out`` in folders that do not exist yet gets them created."""
    if not out:
        out = os.path.join(workdir, OUTPUT_FILE)
        if os.path.isdir(workdir) and not os.access(workdir, os.W_OK):
            raise _unwritable(out, PermissionError("the workdir is read-only"), chosen=False)
        return out
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the folder {parent} for --out {out}: {error.strerror or error}") from None
    if not os.access(parent, os.W_OK):
        raise _unwritable(out, PermissionError(f"{parent} is read-only"), chosen=True)
    return out


def _unwritable(out: str, error: OSError, *, chosen: bool) -> InputError:
    reason = error.strerror or str(error) or type(error).__name__
    fix = "pass another --out" if chosen else "pass --out PATH to write it elsewhere"
    return InputError(f"cannot write {out} ({reason}): {fix}")


def _draw(figure_class, images: np.ndarray, maps: Sequence[Map], titles, predicted, run):
    rows, cols = len(images), 1 + len(maps)
    fig = figure_class(figsize=(2.0 * cols, 2.0 * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    h, w = images.shape[1:3]
    gray = images.shape[-1] == 1
    for r, image in enumerate(images):
        axes[r, 0].imshow(image[..., 0] if gray else image, cmap="gray" if gray else None, vmin=0, vmax=1)
        axes[r, 0].set_title(f"{titles[r]}\npredicted {predicted[r]}", fontsize=7)
    for c, m in enumerate(maps, start=1):
        vmin, vmax = float(m.shown.min()), float(m.shown.max())
        for r in range(rows):
            ax = axes[r, c]
            if m.spatial:
                ax.imshow(images[r, ..., 0] if gray else images[r], cmap="gray" if gray else None, vmin=0, vmax=1)
                # The map at the block's own resolution, stretched over the image (nearest, no smoothing).
                im = ax.imshow(
                    m.shown[r],
                    cmap="inferno",
                    alpha=0.6,
                    vmin=vmin,
                    vmax=vmax,
                    extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                    interpolation="nearest",
                )
            else:
                im = ax.imshow(m.shown[r], cmap="inferno", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
                ax.set_xlabel("channel", fontsize=6)
            if r == 0:
                ax.set_title(m.path, fontsize=7)
        fig.colorbar(im, ax=axes[-1, c], orientation="horizontal", shrink=0.9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    config = train.recorded_config(run)
    fig.suptitle(f"{config['model']} + {config['block']} on {config['dataset']}", fontsize=9)
    return fig


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("drawing needs matplotlib: pip install 'attnjax[viz]'") from None
    # A bare Figure (no pyplot): no global backend switch, so notebooks keep their inline plots.
    return Figure


def main(argv: Sequence[str] | None = None) -> None:
    parser = CommandLineParser(
        prog="python -m attnjax.viz", description="Draw a trained model's attention maps over real images."
    )
    parser.add_argument("--workdir", required=True, help="the folder of a run of python -m attnjax.train")
    parser.add_argument("--images", type=int, default=6, help="how many test images (the first ones)")
    photos_group = parser.add_mutually_exclusive_group()
    photos_group.add_argument(
        "--photos", dest="photos", action="store_true", default=None, help="add scikit-image's photographs"
    )
    photos_group.add_argument("--no-photos", dest="photos", action="store_false", help="test images only")
    parser.add_argument(
        "--out", default=None, help=f"the PNG to write (default: WORKDIR/{OUTPUT_FILE}); missing folders are created"
    )
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")
    try:
        out, _, maps = render(args.workdir, num_images=args.images, with_photos=args.photos, out=args.out)
    except InputError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {out}: {len(maps)} attention map(s): {', '.join(m.path for m in maps)}")


if __name__ == "__main__":
    main()
