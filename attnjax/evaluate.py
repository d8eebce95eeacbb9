"""``python -m attnjax.evaluate``: top-1/top-5 accuracy and loss of timm weights on a folder of images.

    python -m attnjax.evaluate --model resnet18 --weights timm/resnet18.a1_in1k --dataset folder:PATH
    python -m attnjax.evaluate --model resnet18 --weights run/model.safetensors --dataset folder:PATH --split train

The weights are anything :func:`attnjax.models.pretrained.load` reads (a ``.safetensors``/``.pth``/``.bin``
file, a hub-snapshot folder, a hub id). The images are those of the folder dataset's ``test`` split (or
``--split train``), listed as :mod:`attnjax.data.folder` lists them, decoded at their own size as RGB and
preprocessed with the weights' eval transform (:mod:`attnjax.data.pretrained_transforms`: the shorter side
resized to ``image_size / crop_pct`` with the config's interpolation, the centre ``image_size`` cropped, the
config's mean/std); ``--image-size`` overrides the config's size.

Labels are the indices of the sorted class folder names (``train``'s, as in training): class k of the folder
is the model's output k. A model trained on ImageNet's 1000 classes therefore scores its real accuracy only
on folders named so that they sort in ImageNet's order (the synsets ``n01440764``, ``n01443537``, ... sort
that way); on other folders, evaluate a model fine-tuned on them. A folder with more classes than the model
has outputs is refused. As in training, the folder needs ``train/<class>/`` beside ``test/<class>/``, with
at least one image in each class folder of ``train`` (:func:`attnjax.data.folder.scan` lists both): the
class list, hence the labels, is ``train``'s.

    python -m attnjax.evaluate --workdir runs/digits-attention_net-se

evaluates instead the variables a training run saved last (``variables.msgpack``, after every epoch) on the
run's own dataset with the run's own preprocessing (:func:`evaluate_workdir`): its top-1 and loss are the
trainer's last test accuracy and loss.

Prints one line on stdout (``top-1 ... top-5 ... loss ...``); a bad option, file or folder is one line on
stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import dataclasses
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from attnjax.validate import CommandLineParser, InputError

FOLDER_PREFIX = "folder:"
EXIT_BAD_INPUT = 2
TOP_K = (1, 5)


@dataclasses.dataclass(frozen=True)
class Result:
    """Accuracies and the mean cross-entropy over ``count`` images."""

    top1: float
    top5: float
    loss: float
    count: int
    num_classes: int

    def line(self) -> str:
        return (
            f"top-1 {self.top1:.4f} top-5 {self.top5:.4f} loss {self.loss:.4f} "
            f"({self.count} images, {self.num_classes} classes)"
        )


def folder_split(dataset: str, split: str = "test"):
    """The files and labels of a ``folder:PATH`` dataset's ``split`` and its classes (see the module)."""
    from attnjax.data import folder

    if not dataset.startswith(FOLDER_PREFIX):
        raise InputError(
            f"--dataset {dataset!r}: evaluation reads a folder of images at their own size, folder:PATH "
            "(PATH/train/<class>/*.jpg and PATH/test/<class>/*.jpg)"
        )
    if split not in folder.SPLITS:
        raise InputError(f"--split {split!r}: one of {', '.join(folder.SPLITS)}")
    listing = folder.scan(dataset[len(FOLDER_PREFIX) :])
    print(listing.note(), file=sys.stderr, flush=True)
    return listing.files[split], np.asarray(listing.labels[split], np.int32), listing.classes


def scores(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: top-1 hit, top-5 hit (top-k of all classes where there are fewer), cross-entropy."""
    logits = np.asarray(logits, np.float64)
    k = min(max(TOP_K), logits.shape[1])
    ranked = np.argsort(-logits, axis=1, kind="stable")
    top1 = ranked[:, 0] == labels
    top5 = (ranked[:, :k] == labels[:, None]).any(axis=1)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return top1, top5, -log_probs[np.arange(len(labels)), labels]


def evaluate(
    model: str,
    weights: str,
    dataset: str,
    *,
    image_size: int | None = None,
    batch_size: int = 64,
    split: str = "test",
    progress: bool = True,
) -> Result:
    """Evaluate timm weights of network ``model`` on a folder dataset (see the module)."""
    import jax

    from attnjax import models
    from attnjax.data.images import decode_image
    from attnjax.data.pretrained_transforms import EvalTransform
    from attnjax.models import pretrained

    if batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    if image_size is not None and image_size < 1:
        raise InputError(f"--image-size must be positive, got {image_size}")
    loaded = pretrained.load(weights, model)
    files, labels, classes = folder_split(dataset, split)
    num_classes = loaded.config.num_classes
    if len(classes) > num_classes:
        raise InputError(
            f"{dataset} has {len(classes)} classes and {model}'s weights {num_classes} outputs: evaluate weights "
            "fine-tuned on these classes (labels are the sorted class folder names)"
        )
    if not files:
        raise InputError(f"{dataset} has no {split} images")
    if loaded.config.default:
        print(f"attnjax: {loaded.config.note}", file=sys.stderr, flush=True)
    transform = EvalTransform.from_config(loaded.config, image_size)
    net = models.create(model, num_classes=num_classes)
    variables = jax.device_put(loaded.variables)
    apply = jax.jit(lambda v, x: net.apply(v, x, train=False))

    def read(path):
        return transform(decode_image(str(path), 3, str(path)))

    with ThreadPoolExecutor(max_workers=4) as pool:
        batches = (
            (np.stack(list(pool.map(read, files[start : start + batch_size]))), labels[start : start + batch_size])
            for start in range(0, len(files), batch_size)
        )
        return run_batches(
            apply, variables, batches, len(files), batch_size, len(classes), f"evaluate {model}", progress
        )


def run_batches(apply, variables, batches, count: int, batch_size: int, num_classes: int, desc: str, progress: bool):
    """Score ``(images, labels)`` batches with ``apply(variables, images)``; each padded to ``batch_size``."""
    from tqdm.auto import tqdm

    hits1, hits5, losses = [], [], []
    total = -(-count // batch_size)
    for images, labels in tqdm(batches, total=total, desc=desc, unit="batch", disable=None if progress else True):
        n = len(labels)
        if n < batch_size:  # one shape for every batch: one compilation
            images = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]), images.dtype)])
        logits = np.asarray(apply(variables, images))[:n]
        top1, top5, loss = scores(logits, np.asarray(labels))
        hits1.append(top1)
        hits5.append(top5)
        losses.append(loss)
    return Result(
        top1=float(np.concatenate(hits1).mean()),
        top5=float(np.concatenate(hits5).mean()),
        loss=float(np.concatenate(losses).mean()),
        count=count,
        num_classes=num_classes,
    )


def evaluate_workdir(workdir: str, *, batch_size: int = 64, split: str = "test", progress: bool = True) -> Result:
    """Evaluate the variables a run of ``python -m attnjax.train`` saved last in ``workdir`` (``variables.msgpack``,
    written after every epoch) on that run's dataset, with that run's preprocessing (its image size and its
    recorded mean/std), as :func:`attnjax.viz.load_run` restores them."""
    import jax

    from attnjax.data.augment import normalize
    from attnjax.viz import load_run

    if batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    if split not in ("train", "test"):
        raise InputError(f"--split {split!r}: one of train, test")
    model, variables, run, dataset = load_run(workdir)
    source = getattr(dataset, split)
    mean, std = run["dataset"]["mean"], run["dataset"]["std"]
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))

    def batches():
        for start in range(0, len(source), batch_size):
            batch = source.get_batch(np.arange(start, min(start + batch_size, len(source))))
            yield np.asarray(normalize(batch["image"], mean, std), np.float32), batch["label"]

    return run_batches(
        apply,
        variables,
        batches(),
        len(source),
        batch_size,
        int(run["dataset"]["num_classes"]),
        f"evaluate {workdir}",
        progress,
    )


def build_parser() -> CommandLineParser:
    parser = CommandLineParser(
        prog="python -m attnjax.evaluate",
        description="Top-1/top-5 accuracy and loss of timm weights on a folder of images, with the weights' "
        "own eval transform (resize, centre crop, mean/std).",
    )
    parser.add_argument("--model", help="timm's network name, e.g. resnet18, seresnet50")
    parser.add_argument("--weights", help="a .safetensors/.pth/.bin file, a hub-snapshot folder, or a hub id")
    parser.add_argument("--dataset", help="folder:PATH (PATH/test/<class>/*.jpg, labels by sorted name)")
    parser.add_argument(
        "--workdir", help="instead of --model/--weights/--dataset: a training run's last variables on its own dataset"
    )
    parser.add_argument("--split", default="test", help="the folder's split to evaluate: test (default) or train")
    parser.add_argument("--image-size", type=int, default=None, help="the crop size (default: the weights' config)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workdir is not None:
        given = [f"--{k.replace('_', '-')}" for k in ("model", "weights", "dataset", "image_size") if getattr(args, k)]
        if given:
            parser.error(f"--workdir evaluates the run's own model on its own dataset: drop {', '.join(given)}")
    else:
        missing = [f"--{k}" for k in ("model", "weights", "dataset") if not getattr(args, k)]
        if missing:
            parser.error(f"the arguments {', '.join(missing)} are required (or --workdir W)")
    try:
        if args.workdir is not None:
            result = evaluate_workdir(
                args.workdir, batch_size=args.batch_size, split=args.split, progress=not args.no_progress
            )
        else:
            result = evaluate(
                args.model,
                args.weights,
                args.dataset,
                image_size=args.image_size,
                batch_size=args.batch_size,
                split=args.split,
                progress=not args.no_progress,
            )
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("aborted by Ctrl-C", file=sys.stderr, flush=True)
        sys.exit(130)
    what = f"{args.workdir}" if args.workdir is not None else f"{args.model} on {args.dataset}"
    print(f"{what} ({args.split}): {result.line()}", flush=True)


if __name__ == "__main__":
    main()
