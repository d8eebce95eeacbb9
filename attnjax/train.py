"""Training and evaluation: the pure step functions and the loop that drives them.

``train_step`` and ``eval_step`` are pure functions of ``(state, batch)``. They reduce
over devices only when given an ``axis_name``; :mod:`attnjax.parallel` applies ``pmap``
outside them, so the same step runs on one device or many.

Run it as ``python -m attnjax.train`` (see :mod:`attnjax.cli` for the options).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from attnjax import data, models, parallel
from attnjax.config import Config
from attnjax.validate import InputError, check_divisible

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TIMING_FIELDS = ("images_per_second", "epoch_seconds")  # the only fields that vary between identical runs


class TrainState(train_state.TrainState):
    """Flax's TrainState (params, optimizer state, step, ``apply_fn``) plus batch-norm statistics.

    ``batch_stats`` is ``{}`` for models without batch norm.
    """

    batch_stats: Any = flax.struct.field(default_factory=dict)

    def variables(self, params=None) -> dict:
        """The ``variables`` argument of ``apply_fn``, with ``params`` in place of the state's if given."""
        return {"params": self.params if params is None else params, "batch_stats": self.batch_stats}


class TrainingDiverged(FloatingPointError):
    """The training loss stopped being finite."""


def create_model(config: Config, num_classes: int) -> nn.Module:
    return models.create(config.model, num_classes=num_classes, block=config.block)


def create_train_state(
    rng: jax.Array, model: nn.Module, image_shape: tuple[int, ...], learning_rate: float
) -> TrainState:
    """Initialise parameters for images of ``image_shape`` (H, W, C) and an Adam optimizer."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=optax.adam(learning_rate),
    )


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(state: TrainState, batch: dict, axis_name: str | None = None) -> tuple[TrainState, dict]:
    """One Adam step on ``batch``; with ``axis_name``, gradients and metrics are averaged over it.

    Batch-norm statistics need no averaging here: ``layers.batch_norm`` already normalises
    over the whole axis, so every device holds the same running averages.
    """

    def loss_fn(params):
        logits, updates = state.apply_fn(state.variables(params), batch["image"], train=True, mutable=["batch_stats"])
        return cross_entropy_loss(logits, batch["label"]), (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    if axis_name is not None:
        # Each device holds an equal share of the global batch, so the mean of the
        # per-device means is the global-batch mean.
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def eval_step(state: TrainState, batch: dict, axis_name: str | None = None) -> dict:
    """Sums over the real (``mask`` = 1) examples of ``batch``: loss, correct predictions, count."""
    logits = state.apply_fn(state.variables(), batch["image"], train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    mask = batch["mask"]
    sums = {
        "loss": jnp.sum(losses * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "count": jnp.sum(mask),
    }
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)


def evaluate(p_eval_step, state, images: np.ndarray, labels: np.ndarray, batch_size: int, devices) -> dict:
    """Loss and accuracy over every example exactly once; accuracy = correct / examples."""
    batches = parallel.to_devices(data.eval_batches(images, labels, batch_size), devices)
    sums = jax.tree.map(lambda *xs: float(np.sum(xs)), *jax.device_get([p_eval_step(state, b) for b in batches]))
    count = int(round(sums["count"]))
    if count != len(labels):
        raise AssertionError(f"evaluation counted {count} examples, expected {len(labels)}")
    return {
        "loss": sums["loss"] / count,
        "accuracy": sums["correct"] / count,
        "correct": int(round(sums["correct"])),
        "count": count,
    }


def check_workdir_is_new(workdir: str) -> None:
    path = os.path.join(workdir, METRICS_FILE)
    if os.path.exists(path):
        raise InputError(
            f"{path} already exists from an earlier run; attnjax does not overwrite results. "
            "Pass a new --workdir (or move that run away)."
        )


def write_json_line(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train_and_evaluate(config: Config, workdir: str, devices=None) -> tuple[TrainState, list[dict]]:
    """Train ``config.model`` on ``config.dataset``, evaluating after every epoch.

    Writes ``config.json`` and one line per epoch to ``metrics.jsonl`` in ``workdir``.
    Returns the final state and the per-epoch metrics.
    """
    devices = list(devices or jax.local_devices())
    check_divisible(config.batch_size, len(devices))
    check_workdir_is_new(workdir)
    dataset = data.load(config.dataset)
    steps_per_epoch = data.num_train_steps(len(dataset.train_labels), config.batch_size)
    model = create_model(config, dataset.num_classes)

    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        json.dump({**config.to_dict(), "devices": len(devices), "jax": jax.__version__}, f, indent=2)
    metrics_path = os.path.join(workdir, METRICS_FILE)

    state = create_train_state(jax.random.key(config.seed), model, dataset.image_shape, config.learning_rate)
    state = parallel.replicate(state, devices)
    p_train_step = parallel.pmap_step(train_step, devices, donate_state=True)
    p_eval_step = parallel.pmap_step(eval_step, devices)

    history = []
    for epoch in range(1, config.epochs + 1):
        rng = np.random.default_rng([config.seed, epoch])
        batches = data.train_batches(dataset.train_images, dataset.train_labels, config.batch_size, rng)
        start = time.perf_counter()
        step_metrics = []
        with tqdm(
            total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", unit="step", leave=False, disable=None
        ) as bar:
            for batch in parallel.to_devices(batches, devices):
                state, metrics = p_train_step(state, batch)
                step_metrics.append(metrics)
                bar.update()
            step_metrics = jax.device_get(step_metrics)  # waits for the last step
        seconds = time.perf_counter() - start

        train = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
        if not math.isfinite(train["loss"]):
            raise TrainingDiverged(
                f"the training loss is {train['loss']} in epoch {epoch}: training diverged. "
                f"Lower --learning-rate (now {config.learning_rate}); the epochs before this one "
                f"are recorded in {metrics_path}."
            )
        test = evaluate(p_eval_step, state, dataset.test_images, dataset.test_labels, config.batch_size, devices)
        record = {
            "epoch": epoch,
            "train_loss": train["loss"],
            "train_accuracy": train["accuracy"],
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "test_correct": test["correct"],
            "test_examples": test["count"],
            "images_per_second": steps_per_epoch * config.batch_size / seconds,
            "epoch_seconds": seconds,
        }
        write_json_line(metrics_path, record)
        history.append(record)
        print(
            f"epoch {epoch:>3}/{config.epochs}  train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}  "
            f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}  "
            f"{record['images_per_second']:,.0f} img/s",
            flush=True,
        )
    if history:
        last = history[-1]
        print(
            f"final test accuracy: {last['test_accuracy']:.4f} ({last['test_correct']}/{last['test_examples']})",
            flush=True,
        )
    return state, history


if __name__ == "__main__":
    from attnjax.cli import main

    main()
