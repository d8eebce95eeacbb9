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
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from attnjax import (
    blocks,
    checkpoint,
    data,
    metrics_writer,
    models,
    ops,
    optim,
    parallel,
    precision,
    profiling,
    xla_options,
)
from attnjax.checkpoint import CheckpointError
from attnjax.config import Config
from attnjax.preemption import Interrupted, Preemption
from attnjax.validate import InputError, check_divisible

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
PROGRESS_FILE = "progress"  # the last step dispatched, rewritten in place every step: how much an interruption lost
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
    """The training loss or a gradient stopped being finite."""


def create_model(config: Config, num_classes: int) -> nn.Module:
    """``config``'s model with its ``--model-option``s, hosting ``config.block`` with its ``--block-option``s.

    Its layers and blocks compute in ``config.dtype`` (parameters stay float32).
    """
    dtype = precision.compute_dtype(config.dtype)
    block_options, model_options = parse_block_and_model_options(config)
    return models.create(
        config.model,
        num_classes=num_classes,
        block=config.block,
        block_options=block_options,
        dtype=dtype,
        axis_name=parallel.AXIS,  # batch norm synchronises over the axis the step is mapped over
        **model_options,
    )


def parse_block_and_model_options(config: Config) -> tuple[dict, dict]:
    """``--block-option`` and ``--model-option`` as typed dicts, checked against the block's and model's fields."""
    if config.block_option and config.block == models.NO_BLOCK:
        raise InputError("--block-option needs an attention block: --block none has no options")
    block_options = blocks.parse_options(config.block, config.block_option) if config.block_option else {}
    return block_options, models.parse_model_options(config.model, config.model_option)


SCHEDULES = optim.SCHEDULES


def learning_rate_schedule(name: str, peak: float, total_steps: int, warmup_steps: int = 0) -> optim.LearningRate:
    """``constant``: ``peak`` throughout (the tutorial); ``cosine``: from ``peak`` down to 0 at ``total_steps``.

    The first ``warmup_steps`` steps rise linearly from 0 to ``peak`` (see :func:`attnjax.optim.schedule`).
    """
    if name not in SCHEDULES:
        raise InputError(f"unknown learning-rate schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return optim.schedule(name, peak, total_steps, warmup_steps)


def warmup_steps(config: Config, steps_per_epoch: int) -> int:
    """``config.warmup_epochs`` in optimizer steps: rounded, and at least one when warm-up is asked for."""
    if config.warmup_epochs <= 0:
        return 0
    return max(round(config.warmup_epochs * steps_per_epoch), 1)


def create_optimizer(config: Config, learning_rate: optim.LearningRate) -> optax.GradientTransformation:
    """``config``'s optimizer (``--optimizer`` and its options) at ``learning_rate``, a float or a schedule."""
    return optim.optimizer(
        config.optimizer,
        learning_rate,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        nesterov=config.nesterov,
        clip_grad_norm=config.clip_grad_norm,
    )


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    image_shape: tuple[int, ...],
    learning_rate: optim.LearningRate,
    loss_scaling: bool = False,
    tx: optax.GradientTransformation | None = None,
) -> TrainState:
    """Initialise parameters for images of ``image_shape`` (H, W, C) and the optimizer ``tx``.

    ``tx`` defaults to Adam at ``learning_rate`` (a float or a schedule); a given ``tx`` carries
    its own learning rate and ``learning_rate`` is then unused. ``loss_scaling`` adds a dynamic
    loss scale, for float16 compute.
    """
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx if tx is not None else optim.optimizer("adam", learning_rate),
        loss_scale=precision.DynamicLossScale.create() if loss_scaling else None,
    )


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(
    state: TrainState, batch: dict, axis_name: str | None = None, *, dtype=None, microbatches: int = 1
) -> tuple[TrainState, dict]:
    """One optimizer step on ``batch``; with ``axis_name``, gradients and metrics are averaged over it.

    ``metrics`` holds the batch's ``loss`` and ``accuracy`` and ``finite``: False when the loss
    or a gradient is not finite (float16: when the loss is not; overflowing gradients there
    only skip the update).

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
    grads_finite = precision.all_finite(grads)
    if state.loss_scale is None:
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & grads_finite
    else:
        # float16: skip a step whose gradients overflowed (the same decision on every device,
        # as the gradients are already averaged) and adapt the scale. Overflowing gradients
        # are expected there; only a non-finite loss means divergence.
        new_state = precision.select_tree(grads_finite, new_state, state)
        new_state = new_state.replace(loss_scale=state.loss_scale.adjust(grads_finite))
        metrics["loss_scale"] = state.loss_scale.scale
        metrics["finite"] = jnp.isfinite(metrics["loss"])
    # ``finite`` is the NaN guard, computed here so that the loop reads one flag and never the state.
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
    p_eval_step,
    state,
    dataset: data.Dataset,
    batch_size: int,
    devices,
    split: str = "test",
    kind: str = "pmap",
    stop: Callable[[], bool] | None = None,
) -> dict | None:
    """Loss and accuracy over every example of ``split`` exactly once; accuracy = correct / examples.

    ``p_eval_step`` is :func:`eval_step` under the ``kind`` wrapper over ``devices``.
    ``stop`` is asked after every batch; when it answers True, evaluation ends early and
    returns ``None`` (a preempted run evaluates again when it resumes).
    """
    batches = data.pipeline.eval_batches(
        dataset, batch_size, split=split, process_index=jax.process_index(), process_count=jax.process_count()
    )
    sums = []
    for batch in parallel.to_devices(batches, devices, kind=kind):
        sums.append(p_eval_step(state, batch))
        if stop is not None and stop():
            return None
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


def check_config(config: Config) -> None:
    """Refuse a configuration that cannot train, before any work: the error names the option and what works."""

    def refuse(option: str, value, expected: str):
        raise InputError(f"--{option.replace('_', '-')} {value!r} is invalid: {expected}")

    for name in ("epochs", "batch_size", "grad_accum"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            refuse(name, value, "use a whole number of at least 1")
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        refuse("learning_rate", config.learning_rate, "use a finite number above 0, such as 1e-3 (the tutorial's)")
    if config.image_size < 0:
        refuse("image_size", config.image_size, "use 0 (keep the images' size) or a size in pixels")
    if config.log_every_steps < 1:
        refuse("log_every_steps", config.log_every_steps, "use a whole number of steps of at least 1")
    profiling.parse_steps(config.profile_steps)
    if config.tensorboard:
        metrics_writer.check_available()
    if config.checkpoint_every_steps < 0:
        refuse("checkpoint_every_steps", config.checkpoint_every_steps, "use 0 (off) or a number of steps")
    if not (math.isfinite(config.checkpoint_every_minutes) and config.checkpoint_every_minutes >= 0):
        refuse("checkpoint_every_minutes", config.checkpoint_every_minutes, "use 0 (off) or a number of minutes")
    for name in ("weight_decay", "clip_grad_norm"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            refuse(name, value, "use 0 (off) or a finite number above 0")
    if not (math.isfinite(config.momentum) and 0 <= config.momentum < 1):
        refuse("momentum", config.momentum, "use a number from 0 (none) up to, not including, 1, such as 0.9")
    if not (math.isfinite(config.warmup_epochs) and 0 <= config.warmup_epochs < config.epochs):
        refuse(
            "warmup_epochs", config.warmup_epochs, f"use 0 (off) or a number of epochs below --epochs {config.epochs}"
        )
    if config.weight_decay and config.optimizer in optim.OPTIMIZERS and config.optimizer not in optim.DECAYING:
        refuse(
            "weight_decay",
            config.weight_decay,
            f"--optimizer {config.optimizer} takes none: use --optimizer adamw (Adam with decoupled weight decay), "
            f"or one of {', '.join(optim.DECAYING)}",
        )
    if config.nesterov and (config.optimizer != "sgd" or not config.momentum):
        raise InputError(
            f"--nesterov is invalid with --optimizer {config.optimizer} and --momentum {config.momentum}: "
            "Nesterov momentum needs --optimizer sgd with --momentum above 0"
        )
    precision.compute_dtype(config.dtype)
    parallel.check_kind(config.parallel)
    names = {
        "model": models.names(),
        "block": models.block_names(),
        "lr_schedule": list(SCHEDULES),
        "optimizer": list(optim.OPTIMIZERS),
        "augment": list(data.augment.CHOICES),
        "xla_options": list(xla_options.MODES),
    }
    for name, valid in names.items():
        if getattr(config, name) not in valid:
            refuse(name, getattr(config, name), f"valid: {', '.join(valid)}")
    parse_block_and_model_options(config)


def _read_config(workdir: str) -> dict | None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)["config"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path} cannot be read ({error}); restore it, or pass a new --workdir") from None


def _metrics_lines(workdir: str) -> int:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def check_workdir(config: Config, workdir: str, resume: bool = True) -> None:
    """Refuse a workdir this run must not touch, before any work; create it if it is new.

    A workdir that holds a run is continued (``resume``) only with the same options that
    shape training (:data:`attnjax.config.TRAJECTORY_FIELDS`); ``resume=False`` refuses it.
    """
    names = (CONFIG_FILE, METRICS_FILE, checkpoint.CHECKPOINTS_DIR)
    holds = [name for name in names if os.path.exists(os.path.join(workdir, name))]
    if holds and not resume:
        raise InputError(
            f"{workdir} holds a run ({', '.join(holds)}) and --no-resume refuses to touch it: "
            "drop --no-resume to continue that run, or pass a new --workdir."
        )
    saved = _read_config(workdir)
    if saved is not None:
        diff = config.trajectory_diff(saved)
        if diff:
            raise InputError(
                f"{workdir} holds a run with other options, and continuing it with these would not reproduce it:\n  "
                + "\n  ".join(diff)
                + "\nRerun with the run's options to continue it, or pass a new --workdir."
            )
    has_checkpoints = os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINTS_DIR))
    if _metrics_lines(workdir) and not has_checkpoints:
        raise InputError(
            f"{os.path.join(workdir, METRICS_FILE)} already exists from an earlier run that left no checkpoint to "
            "continue from; attnjax does not overwrite results. Pass a new --workdir (or move that run away)."
        )
    if jax.process_index() == 0:
        probe = os.path.join(workdir, f".attnjax-write-test-{os.getpid()}")
        try:
            os.makedirs(workdir, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as error:
            raise InputError(
                f"--workdir {workdir} cannot be created or written ({error.strerror or error}): "
                "pass a folder you can write to."
            ) from None
    if jax.process_count() > 1:
        check_workdir_is_shared(workdir)


SHARED_MARKER = ".attnjax-shared-check"


def check_workdir_is_shared(workdir: str) -> None:
    """Several processes must see one workdir: every process reads the checkpoints when a run resumes.

    Process 0 writes a marker; every process says whether it sees it; all fail together if one does not.
    """
    from jax.experimental import multihost_utils

    marker = os.path.join(workdir, SHARED_MARKER)
    if jax.process_index() == 0:
        with open(marker, "w") as f:
            f.write("written by process 0")
    multihost_utils.sync_global_devices("attnjax:shared-marker-written")
    seen = multihost_utils.process_allgather(np.asarray(os.path.exists(marker), np.int32))
    multihost_utils.sync_global_devices("attnjax:shared-marker-read")
    if jax.process_index() == 0:
        os.remove(marker)
    missing = [int(p) for p in np.flatnonzero(np.asarray(seen) == 0)]
    if missing:
        raise InputError(
            f"--workdir {workdir} is not shared by all processes: process(es) {missing} cannot see what process 0 "
            "writes there. A multi-host run keeps its checkpoints where every host reads them: put the workdir on a "
            "file system all hosts mount at the same path (NFS/Filestore, or a bucket through Cloud Storage FUSE)."
        )


def write_json_line(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def versions() -> dict:
    found = {}
    for package in ("attnjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


class Progress:
    """The last step dispatched, kept in ``WORKDIR/progress`` (rewritten in place, no fsync: cheap every step).

    After a kill, the next run reads it to say how many steps the interruption cost.
    """

    def __init__(self, workdir: str, enabled: bool):
        self.path = os.path.join(workdir, PROGRESS_FILE)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644) if enabled else None

    def last_step(self) -> int | None:
        try:
            with open(self.path) as f:
                return int(f.read().strip() or "x")
        except (OSError, ValueError):
            return None

    def update(self, step: int) -> None:
        if self.fd is not None:
            os.pwrite(self.fd, f"{step:>20}\n".encode(), 0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def epoch_means(values: dict[str, list[float]]) -> dict[str, float]:
    """Per-step metrics averaged in float64: the same value whether the floats came from the devices or a checkpoint."""
    return {k: float(np.mean(np.asarray(v, np.float64))) for k, v in values.items()}


def run_eta(epoch_walls: list[float], remaining_epochs: int) -> float | None:
    """Seconds the run's ``remaining_epochs`` will take, from the wall times of the epochs this process ran.

    The first of them compiled the steps, so it counts only while it is the only one. ``None``
    when no epoch remains.
    """
    if remaining_epochs <= 0 or not epoch_walls:
        return None
    steady = epoch_walls[1:] or epoch_walls
    return remaining_epochs * sum(steady) / len(steady)


def format_duration(seconds: float) -> str:
    """``H:MM:SS``, as a run's ETA prints."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


GUARD_LAG = 2  # the NaN guard reads the flag of the step this many steps back: finished, so the read never waits
RECORDED_METRICS = ("loss", "accuracy")


def train_and_evaluate(
    config: Config,
    workdir: str,
    devices=None,
    *,
    resume: bool = True,
    preemption: Preemption | None = None,
    asynchronous_checkpoints: bool = True,
    dataset: data.Dataset | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[TrainState, list[dict]]:
    """Train ``config.model`` on ``config.dataset``, evaluating every epoch; continue a run found in ``workdir``.

    Writes ``config.json``, one line per epoch to ``metrics.jsonl``, the model's variables to
    ``variables.msgpack`` after every epoch, and full-state checkpoints (:mod:`attnjax.checkpoint`)
    at every epoch end, every ``config.checkpoint_every_steps`` steps and
    ``config.checkpoint_every_minutes`` minutes, and on SIGTERM/SIGINT (``preemption``), after
    which it raises :class:`Interrupted`. A workdir with a checkpoint continues from it and
    ends bit-identical to an uninterrupted run on the same number of devices.
    ``dataset`` is ``config.dataset`` already loaded (a study loads it once for all its runs);
    ``on_step(global_step)`` is called after each optimizer step is dispatched (a study's progress bar).
    Returns the final state and the per-epoch metrics.
    """
    check_config(config)
    devices = list(devices or parallel.devices_for(config.parallel))
    # pmap maps over each process's local devices; the global batch splits over all of them.
    num_devices = len(devices) * (jax.process_count() if config.parallel == "pmap" else 1)
    check_divisible(config.batch_size, num_devices)
    dtype = precision.compute_dtype(config.dtype)
    leader = jax.process_index() == 0  # only process 0 writes files and prints
    check_workdir(config, workdir, resume)
    say = print if leader else (lambda *args, **kwargs: None)

    if dataset is None:
        dataset = data.load(
            config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir, image_size=config.image_size or None
        )
    augment = data.resolve_augment(config.augment, dataset)
    update_batch = config.batch_size * config.grad_accum  # examples per optimizer update
    steps_per_epoch = data.pipeline.steps_per_epoch(len(dataset.train), update_batch)
    profile_steps = profiling.parse_steps(config.profile_steps)
    if profile_steps and profile_steps[0] > config.epochs * steps_per_epoch:
        raise InputError(
            f"--profile-steps {config.profile_steps} starts after the run's last step: it has "
            f"{config.epochs * steps_per_epoch} steps ({steps_per_epoch} per epoch); choose a START up to that"
        )
    model = create_model(config, dataset.num_classes)
    # ``schedule`` gives the learning rate of any step: optim.learning_rate_at(schedule, step).
    schedule = learning_rate_schedule(
        config.lr_schedule,
        config.learning_rate,
        config.epochs * steps_per_epoch,
        warmup_steps(config, steps_per_epoch),
    )
    state = create_train_state(
        jax.random.key(config.seed),
        model,
        dataset.image_shape,
        schedule,
        loss_scaling=precision.needs_loss_scaling(config.dtype),
        tx=create_optimizer(config, schedule),
    )

    metrics_path = os.path.join(workdir, METRICS_FILE)
    checkpoints = checkpoint.Checkpoints(workdir, asynchronous=asynchronous_checkpoints)
    try:
        restored = checkpoints.restore(state)
        if restored is None and _metrics_lines(workdir):
            raise InputError(
                f"{metrics_path} already exists from an earlier run whose checkpoints are gone; attnjax does not "
                "overwrite results. Pass a new --workdir (or move that run away)."
            )
    except BaseException:
        checkpoints.close()
        raise
    for note in checkpoints.set_aside:
        say(f"attnjax: {note}", file=sys.stderr, flush=True)
    progress = Progress(workdir, enabled=leader)
    if restored is None:
        epoch, batch, history, done, carried_seconds, best = 1, 0, [], {k: [] for k in RECORDED_METRICS}, 0.0, None
        reached = progress.last_step()
        if reached:
            say(
                f"attnjax: no checkpoint yet in {workdir}; the interrupted run had reached step {reached}: "
                "starting over"
            )
    else:
        state, record = restored
        epoch, batch, history = record["epoch"], record["batch"], record["history"]
        done, carried_seconds = record["epoch_metrics"], record["epoch_seconds"]
        best = record["best_test_accuracy"]
        reached, lost, moved = progress.last_step(), "", ""
        if reached is not None:
            lost = f"; the interrupted run had reached step {reached}: {max(reached - record['step'], 0)} steps lost"
        if record["devices"] != num_devices:
            moved = f"; written on {record['devices']} devices, continuing on {num_devices} (equal to rounding)"
        if epoch > config.epochs:
            say(f"attnjax: this run had already finished; its results are in {metrics_path}", flush=True)
        else:
            say(
                f"attnjax: resumed from {checkpoints.path(record['step'])} (step {record['step']}, epoch {epoch}, "
                f"batch {batch} of {steps_per_epoch}, saved {record['reason']}){lost}{moved}",
                flush=True,
            )
        if leader:  # the metrics of the finished epochs are the checkpoint's, whatever the file had gained since
            checkpoint.write_atomically(metrics_path, "".join(json.dumps(r) + "\n" for r in history))

    if leader:
        run = {
            "augment": augment,
            "devices": num_devices,
            "processes": jax.process_count(),
            "jax": jax.__version__,
            "dataset": dataset.describe(),
            "xla_options": xla_options.applied(config.xla_options),  # what XLA:CPU compiled with
            "formulations": ops.chosen(),  # which formulation each backend-dependent op traced
        }
        text = json.dumps({"config": config.to_dict(), **run}, indent=2)
        checkpoint.write_atomically(os.path.join(workdir, CONFIG_FILE), text)

    state = parallel.replicate(state, devices)
    step_fn = functools.partial(train_step, dtype=dtype, microbatches=config.grad_accum)
    options = xla_options.compiler_options(config.xla_options)  # jit only; pmap reads XLA_FLAGS (set by the CLI)
    p_train_step = parallel.wrap_step(step_fn, devices, config.parallel, donate_state=True, compiler_options=options)
    p_eval_step = parallel.wrap_step(
        functools.partial(eval_step, dtype=dtype), devices, config.parallel, compiler_options=options
    )
    global_step = (epoch - 1) * steps_per_epoch + batch
    last_good = restored[1]["step"] if restored else None
    preemption = preemption if preemption is not None else Preemption()
    tick = 0  # steps and evaluation batches run by this process: the preemption sync point's clock
    last_save = time.monotonic()
    run_versions = versions()

    def save(reason: str, test_accuracy=None, wait=False):
        nonlocal last_save, last_good
        record = {
            "epoch": epoch,
            "batch": batch,
            "reason": reason,
            "history": history,
            "epoch_metrics": done,
            "epoch_seconds": carried_seconds,
            "best_test_accuracy": best,
            "steps_per_epoch": steps_per_epoch,
            "config": config.to_dict(),
            "versions": run_versions,
            "devices": num_devices,
            "processes": jax.process_count(),
        }
        checkpoints.save(global_step, state, record, test_accuracy=test_accuracy, wait=wait)
        last_save, last_good = time.monotonic(), global_step

    def time_to_save() -> bool:
        minutes = config.checkpoint_every_minutes
        if config.checkpoint_every_steps and global_step % config.checkpoint_every_steps == 0:
            return True
        if not minutes:
            return False
        due = time.monotonic() - last_save >= minutes * 60
        if jax.process_count() == 1:
            return due
        if tick % 10:
            return False  # processes agree on time only every 10 steps: process 0's clock decides
        from jax.experimental import multihost_utils

        return bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))

    def stop_here(where: str):
        save("on " + preemption.signal_name, wait=True)
        raise Interrupted(
            f"{preemption.signal_name} {where}: saved {checkpoints.path(global_step)} (step {global_step}, epoch "
            f"{epoch}, batch {batch} of {steps_per_epoch}). Rerun the same command to continue."
        )

    def diverged(step: int):
        good = "none (no checkpoint yet)" if last_good is None else f"{checkpoints.path(last_good)} (step {last_good})"
        raise TrainingDiverged(
            f"training diverged at step {step} (epoch {epoch}): the loss or a gradient is not finite. "
            f"The last good checkpoint is {good}; nothing after it was saved. Lower --learning-rate "
            f"(now {config.learning_rate}) and pass a new --workdir; the epochs before this one are in {metrics_path}."
        )

    pending = []  # device metrics of the steps not yet in ``done``

    def collect():
        """Move ``pending`` into ``done`` (waiting for the last step); raise at a non-finite step."""
        first = global_step - len(pending) + 1
        for i, metrics in enumerate(jax.device_get(pending)):
            if not metrics["finite"]:
                diverged(first + i)
            for k in RECORDED_METRICS:
                done[k].append(float(metrics[k]))
        pending.clear()

    def evaluation_stop() -> bool:
        nonlocal tick
        tick += 1
        return preemption.requested(tick)

    # TensorBoard (process 0) and the profiler; a run that had already finished writes nothing new.
    writer = metrics_writer.create(workdir, config.tensorboard and leader and epoch <= config.epochs, global_step + 1)
    profiler = profiling.StepProfiler(workdir, profile_steps)
    window, window_start = [], (global_step, time.perf_counter())  # the steps since the last TensorBoard log
    epoch_walls = []  # wall seconds of each epoch this process ran, evaluation included: the run's ETA

    def log_steps():
        """TensorBoard: the window's mean train loss and accuracy, the step's learning rate, images/s."""
        nonlocal window, window_start
        values = jax.device_get(window)  # waits for the last step: the window's time is then its work's
        now = time.perf_counter()
        steps, seconds = global_step - window_start[0], now - window_start[1]
        writer.scalars(
            global_step,
            {
                "train/loss": np.mean([float(v["loss"]) for v in values]),
                "train/accuracy": np.mean([float(v["accuracy"]) for v in values]),
                # The rate this step's update applied: optax counts updates from 0.
                "train/learning_rate": optim.learning_rate_at(schedule, global_step - 1),
                "train/images_per_second": steps * update_batch / seconds,
            },
        )
        window, window_start = [], (global_step, now)

    try:
        with preemption:
            while epoch <= config.epochs:
                start = epoch_began = time.perf_counter()
                window, window_start = [], (global_step, start)
                if batch < steps_per_epoch:
                    batches = data.pipeline.train_batches(
                        dataset,
                        update_batch,
                        seed=config.seed,
                        epoch=epoch,
                        augment=augment,
                        process_index=jax.process_index(),
                        process_count=jax.process_count(),
                        start=batch,
                    )
                    with tqdm(
                        total=steps_per_epoch,
                        initial=batch,
                        desc=f"epoch {epoch}/{config.epochs}",
                        unit="step",
                        leave=False,
                        disable=None if leader else True,
                    ) as bar:
                        for device_batch in parallel.to_devices(batches, devices, kind=config.parallel):
                            profiler.before_step(global_step + 1)
                            state, metrics = p_train_step(state, device_batch)
                            pending.append(metrics)
                            global_step, batch, tick = global_step + 1, batch + 1, tick + 1
                            progress.update(global_step)
                            if on_step is not None:
                                on_step(global_step)
                            profiler.after_step(global_step, (state, metrics))
                            if writer.enabled:
                                window.append(metrics)
                                if global_step % config.log_every_steps == 0:
                                    log_steps()
                            bar.update()
                            if len(pending) > GUARD_LAG and not pending[-1 - GUARD_LAG]["finite"]:
                                diverged(global_step - GUARD_LAG)
                            if preemption.requested(tick):
                                carried_seconds += time.perf_counter() - start
                                collect()
                                stop_here(f"during epoch {epoch}")
                            # An epoch's last step is saved after its evaluation, with the results.
                            if batch < steps_per_epoch and time_to_save():
                                seconds = time.perf_counter() - start
                                carried_seconds, start = carried_seconds + seconds, time.perf_counter()
                                collect()
                                save("on schedule")
                collect()
                seconds = carried_seconds + time.perf_counter() - start
                test = evaluate(
                    p_eval_step, state, dataset, config.batch_size, devices, kind=config.parallel, stop=evaluation_stop
                )
                if test is None:
                    carried_seconds = seconds
                    stop_here(f"during the evaluation of epoch {epoch}")
                train = epoch_means(done)
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
                best = test["accuracy"] if best is None else max(best, test["accuracy"])
                epoch, batch, done, carried_seconds = epoch + 1, 0, {k: [] for k in RECORDED_METRICS}, 0.0
                save("at the end of an epoch", test_accuracy=test["accuracy"])
                if leader:
                    # Variables first: a metrics line then always has the model it describes beside it.
                    checkpoint.save_variables(workdir, state.variables())
                    write_json_line(metrics_path, record)
                writer.scalars(
                    global_step,
                    {
                        "test/loss": test["loss"],
                        "test/accuracy": test["accuracy"],
                        "epoch/train_loss": train["loss"],
                        "epoch/train_accuracy": train["accuracy"],
                        "epoch/images_per_second": record["images_per_second"],
                        "epoch/epoch": record["epoch"],
                    },
                )
                writer.flush()
                epoch_walls.append(time.perf_counter() - epoch_began)
                eta = run_eta(epoch_walls, config.epochs - record["epoch"])
                say(
                    f"epoch {record['epoch']:>3}/{config.epochs}  train loss {record['train_loss']:.4f} "
                    f"acc {record['train_accuracy']:.4f}  test loss {record['test_loss']:.4f} "
                    f"acc {record['test_accuracy']:.4f}  {record['images_per_second']:,.0f} img/s"
                    + (f"  run ETA {format_duration(eta)}" if eta is not None else ""),
                    flush=True,
                )
    except BaseException:
        writer.close()  # flushes what was logged, up to the failure
        progress.close()
        try:
            checkpoints.close()  # the last asynchronous save is kept even when training stops on an error
        except CheckpointError as error:
            say(f"attnjax: {error}", file=sys.stderr, flush=True)
        profiler.stop()  # a trace the failure cut short is still written
        raise
    profiler.stop()
    writer.close()
    progress.close()
    checkpoints.close()  # waits for the last asynchronous save; raises if it failed
    last = history[-1]  # check_config requires epochs >= 1, so there is at least one
    say(
        f"final test accuracy: {last['test_accuracy']:.4f} ({last['test_correct']}/{last['test_examples']})", flush=True
    )
    return state, history
