"""Training and evaluation: the pure step functions and the loop that drives them.

``train_step`` and ``eval_step`` are pure functions of ``(state, batch)``. They reduce
over devices only when given an ``axis_name``; :mod:`attnjax.parallel` applies ``pmap``
outside them, so the same step runs on one device or many.

Run it as ``python -m attnjax.train`` (see :mod:`attnjax.cli` for the options).
"""

from __future__ import annotations

import functools
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

from attnjax import checkpoint, data, models, parallel, precision
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
    loss_scale: precision.DynamicLossScale | None = None  # float16 training only

    def variables(self, params=None) -> dict:
        """The ``variables`` argument of ``apply_fn``, with ``params`` in place of the state's if given."""
        return {"params": self.params if params is None else params, "batch_stats": self.batch_stats}


class TrainingDiverged(FloatingPointError):
    """The training loss stopped being finite."""


def create_model(config: Config, num_classes: int) -> nn.Module:
    """``config``'s model; its layers compute in ``config.dtype`` (parameters stay float32)."""
    dtype = precision.compute_dtype(config.dtype)
    return models.create(config.model, num_classes=num_classes, block=config.block, dtype=dtype)


SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(name: str, peak: float, total_steps: int) -> optax.Schedule | float:
    """``constant``: ``peak`` throughout (the tutorial); ``cosine``: from ``peak`` down to 0 at ``total_steps``."""
    if name == "constant":
        return peak
    if name == "cosine":
        return optax.cosine_decay_schedule(init_value=peak, decay_steps=max(total_steps, 1))
    raise InputError(f"unknown learning-rate schedule {name!r}; valid: {', '.join(SCHEDULES)}")


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    image_shape: tuple[int, ...],
    learning_rate: float | optax.Schedule,
    loss_scaling: bool = False,
) -> TrainState:
    """Initialise parameters for images of ``image_shape`` (H, W, C) and an Adam optimizer.

    ``loss_scaling`` adds a dynamic loss scale, for float16 compute.
    """
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=optax.adam(learning_rate),
        loss_scale=precision.DynamicLossScale.create() if loss_scaling else None,
    )


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(
    state: TrainState, batch: dict, axis_name: str | None = None, *, dtype=None, microbatches: int = 1
) -> tuple[TrainState, dict]:
    """One Adam step on ``batch``; with ``axis_name``, gradients and metrics are averaged over it.

    ``dtype`` is the compute dtype (``None``: the parameters' own; parameters and optimizer
    state keep theirs, see :mod:`attnjax.precision`). With ``microbatches`` = N the batch is processed as N equal
    microbatches whose gradients are averaged before the one update: the same step as on the
    whole batch, with a Nth of the activation memory (batch-norm statistics are then per
    microbatch). Batch-norm statistics need no averaging over ``axis_name``:
    ``layers.batch_norm`` already normalises over the whole axis.
    """
    scale = 1.0 if state.loss_scale is None else state.loss_scale.scale

    def loss_fn(params, batch_stats, micro):
        variables = {"params": precision.cast_floats(params, dtype), "batch_stats": batch_stats}
        logits, updates = state.apply_fn(variables, micro["image"].astype(dtype), train=True, mutable=["batch_stats"])
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # the loss in >= float32
        loss = cross_entropy_loss(logits, micro["label"])
        accuracy = jnp.mean(jnp.argmax(logits, -1) == micro["label"])
        return loss * scale, (loss, accuracy, updates.get("batch_stats", batch_stats))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        (_, (loss, accuracy, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch)
    else:

        def accumulate(carry, micro):
            grads_sum, batch_stats = carry
            (_, (loss, accuracy, batch_stats)), grads = grad_fn(state.params, batch_stats, micro)
            return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), (loss, accuracy)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, batch_stats), (losses, accuracies) = jax.lax.scan(
            accumulate, (zeros, state.batch_stats), split_microbatches(batch, microbatches)
        )
        grads = jax.tree.map(lambda g: g / microbatches, grads)
        loss, accuracy = losses.mean(), accuracies.mean()

    if state.loss_scale is not None:
        grads = jax.tree.map(lambda g: g / scale, grads)
    metrics = {"loss": loss, "accuracy": accuracy}
    if axis_name is not None:
        # Each device holds an equal share of the global batch, so the mean of the
        # per-device means is the global-batch mean.
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if state.loss_scale is not None:
        # float16: skip a step whose gradients overflowed (the same decision on every device,
        # as the gradients are already averaged) and adapt the scale.
        finite = precision.all_finite(grads)
        new_state = precision.select_tree(finite, new_state, state)
        new_state = new_state.replace(loss_scale=state.loss_scale.adjust(finite))
        metrics["loss_scale"] = state.loss_scale.scale
    return new_state, metrics


def split_microbatches(batch: dict, n: int) -> dict:
    """``(B, ...)`` leaves as ``(n, B / n, ...)``; microbatch m holds rows m, m + n, m + 2n, ...

    Interleaved rows keep every microbatch spread over all devices when the batch axis is sharded.
    """
    size = len(batch["label"])
    if size % n:
        raise InputError(f"a batch of {size} does not split into {n} microbatches")
    return jax.tree.map(lambda x: x.reshape(size // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def eval_step(state: TrainState, batch: dict, axis_name: str | None = None, *, dtype=None) -> dict:
    """Sums over the real (``mask`` = 1) examples of ``batch``: loss, correct predictions, count."""
    variables = {"params": precision.cast_floats(state.params, dtype), "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, precision.cast_floats(batch["image"], dtype), train=False)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    mask = batch["mask"]
    sums = {
        "loss": jnp.sum(losses * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "count": jnp.sum(mask),
    }
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)


def evaluate(
    p_eval_step, state, dataset: data.Dataset, batch_size: int, devices, split: str = "test", kind: str = "pmap"
) -> dict:
    """Loss and accuracy over every example of ``split`` exactly once; accuracy = correct / examples.

    ``p_eval_step`` is :func:`eval_step` under the ``kind`` wrapper over ``devices``.
    """
    batches = data.pipeline.eval_batches(
        dataset, batch_size, split=split, process_index=jax.process_index(), process_count=jax.process_count()
    )
    sums = [p_eval_step(state, batch) for batch in parallel.to_devices(batches, devices, kind=kind)]
    sums = jax.tree.map(lambda *xs: float(np.sum(xs)), *jax.device_get(sums))
    count, expected = int(round(sums["count"])), len(getattr(dataset, split))
    if count != expected:
        raise AssertionError(f"evaluation counted {count} examples, expected {expected}")
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

    Writes ``config.json``, one line per epoch to ``metrics.jsonl``, and after every epoch
    the model's variables to ``variables.msgpack`` (:mod:`attnjax.checkpoint`) in ``workdir``.
    Returns the final state and the per-epoch metrics.
    """
    devices = list(devices or parallel.devices_for(config.parallel))
    # pmap maps over each process's local devices; the global batch splits over all of them.
    num_devices = len(devices) * (jax.process_count() if config.parallel == "pmap" else 1)
    check_divisible(config.batch_size, num_devices)
    if config.grad_accum < 1:
        raise InputError(f"--grad-accum must be at least 1, not {config.grad_accum}")
    dtype = precision.compute_dtype(config.dtype)
    leader = jax.process_index() == 0  # only process 0 writes files and prints
    if leader:
        check_workdir_is_new(workdir)
    dataset = data.load(
        config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir, image_size=config.image_size or None
    )
    augment = data.resolve_augment(config.augment, dataset)
    update_batch = config.batch_size * config.grad_accum  # examples per optimizer update
    steps_per_epoch = data.pipeline.steps_per_epoch(len(dataset.train), update_batch)
    model = create_model(config, dataset.num_classes)

    metrics_path = os.path.join(workdir, METRICS_FILE)
    if leader:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            run = {
                "augment": augment,
                "devices": num_devices,
                "processes": jax.process_count(),
                "jax": jax.__version__,
                "dataset": dataset.describe(),
            }
            json.dump({"config": config.to_dict(), **run}, f, indent=2)

    schedule = learning_rate_schedule(config.lr_schedule, config.learning_rate, config.epochs * steps_per_epoch)
    state = create_train_state(
        jax.random.key(config.seed),
        model,
        dataset.image_shape,
        schedule,
        loss_scaling=precision.needs_loss_scaling(config.dtype),
    )
    state = parallel.replicate(state, devices)
    step = functools.partial(train_step, dtype=dtype, microbatches=config.grad_accum)
    p_train_step = parallel.wrap_step(step, devices, config.parallel, donate_state=True)
    p_eval_step = parallel.wrap_step(functools.partial(eval_step, dtype=dtype), devices, config.parallel)

    history = []
    for epoch in range(1, config.epochs + 1):
        batches = data.pipeline.train_batches(
            dataset,
            update_batch,
            seed=config.seed,
            epoch=epoch,
            augment=augment,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        start = time.perf_counter()
        step_metrics = []
        with tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{config.epochs}",
            unit="step",
            leave=False,
            disable=None if leader else True,
        ) as bar:
            for batch in parallel.to_devices(batches, devices, kind=config.parallel):
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
        test = evaluate(p_eval_step, state, dataset, config.batch_size, devices, kind=config.parallel)
        record = {
            "epoch": epoch,
            "train_loss": train["loss"],
            "train_accuracy": train["accuracy"],
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "test_correct": test["correct"],
            "test_examples": test["count"],
            "images_per_second": steps_per_epoch * update_batch / seconds,
            "epoch_seconds": seconds,
        }
        history.append(record)
        if not leader:
            continue
        # Variables first: a metrics line then always has the model it describes beside it.
        checkpoint.save_variables(workdir, state.variables())
        write_json_line(metrics_path, record)
        print(
            f"epoch {epoch:>3}/{config.epochs}  train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}  "
            f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}  "
            f"{record['images_per_second']:,.0f} img/s",
            flush=True,
        )
    if history and leader:
        last = history[-1]
        print(
            f"final test accuracy: {last['test_accuracy']:.4f} ({last['test_correct']}/{last['test_examples']})",
            flush=True,
        )
    return state, history


if __name__ == "__main__":
    from attnjax.cli import main

    main()
