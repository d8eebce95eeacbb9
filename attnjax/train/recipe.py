"""What a run builds from its :class:`Config`, once: the checks, the model, the schedule, the optimizer, the steps.

- :data:`CHOICES`: the one table of valid values, read by the CLI's help and by :func:`check_config`.
- :func:`check_config`: refuse a configuration that cannot train, before any work.
- :func:`create_model`: the model of a config. Whatever rebuilds a run's model (``python -m
  attnjax.viz``, a study's cost) goes through it, so it is the model that trained.
- :class:`Recipe`: a run's model, schedule, initial state and compiled steps, with its devices
  and batches; the loop never sees which parallel wrapper the steps are under.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import optax

from attnjax import blocks, data, models, ops, xla_options
from attnjax.data.pretrained_transforms import PretrainedConfig
from attnjax.train import init_from, optim, parallel, precision
from attnjax.train.config import Config
from attnjax.train.hooks.profiler import parse_steps
from attnjax.train.hooks.tensorboard import check_available as check_tensorboard
from attnjax.train.step import TrainState, create_train_state, eval_step, train_step
from attnjax.validate import InputError, check_divisible

SCHEDULES = optim.SCHEDULES

# The valid values of the options that take a name: the CLI's choices and check_config's refusals.
CHOICES: dict[str, Callable[[], list[str]]] = {
    "model": models.names,
    "block": models.block_names,
    "augment": lambda: list(data.augment.CHOICES),
    "lr_schedule": lambda: list(SCHEDULES),
    "optimizer": lambda: list(optim.OPTIMIZERS),
    "parallel": lambda: list(parallel.KINDS),
    "dtype": lambda: list(precision.DTYPES),
    "xla_options": lambda: list(xla_options.MODES),
}


def parse_block_and_model_options(config: Config) -> tuple[dict, dict]:
    """``--block-option`` and ``--model-option`` as typed dicts, checked against the block's and model's fields."""
    if config.block_option and config.block == models.NO_BLOCK:
        raise InputError("--block-option needs an attention block: --block none has no options")
    block_options = blocks.parse_options(config.block, config.block_option) if config.block_option else {}
    return block_options, models.parse_model_options(config.model, config.model_option)


def create_model(config: Config, num_classes: int) -> nn.Module:
    """``config``'s model with its ``--model-option``s, hosting ``config.block`` with its ``--block-option``s.

    Its layers and blocks compute in ``config.dtype`` (parameters stay float32).
    """
    block_options, model_options = parse_block_and_model_options(config)
    return models.create(
        config.model,
        num_classes=num_classes,
        block=config.block,
        block_options=block_options,
        dtype=precision.compute_dtype(config.dtype),
        axis_name=parallel.AXIS,  # batch norm synchronises over the axis the step is mapped over
        **model_options,
    )


def learning_rate_schedule(name: str, peak: float, total_steps: int, warmup_steps: int = 0) -> optim.LearningRate:
    """``constant``: ``peak`` throughout (the tutorial); ``cosine``: from ``peak`` down to 0 at ``total_steps``.

    The first ``warmup_steps`` steps rise linearly from 0 to ``peak`` (see :func:`attnjax.train.optim.schedule`).
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


def _refuse(option: str, value, expected: str):
    raise InputError(f"--{option.replace('_', '-')} {value!r} is invalid: {expected}")


def check_config(config: Config) -> None:
    """Refuse a configuration that cannot train, before any work: the error names the option and what works."""
    for name in ("epochs", "batch_size", "grad_accum"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            _refuse(name, value, "use a whole number of at least 1")
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        _refuse("learning_rate", config.learning_rate, "use a finite number above 0, such as 1e-3 (the tutorial's)")
    if config.image_size < 0:
        _refuse("image_size", config.image_size, "use 0 (keep the images' size) or a size in pixels")
    if config.log_every_steps < 1:
        _refuse("log_every_steps", config.log_every_steps, "use a whole number of steps of at least 1")
    parse_steps(config.profile_steps)
    if config.tensorboard:
        check_tensorboard()
    if config.checkpoint_every_steps < 0:
        _refuse("checkpoint_every_steps", config.checkpoint_every_steps, "use 0 (off) or a number of steps")
    if not (math.isfinite(config.checkpoint_every_minutes) and config.checkpoint_every_minutes >= 0):
        _refuse("checkpoint_every_minutes", config.checkpoint_every_minutes, "use 0 (off) or a number of minutes")
    _check_optimizer(config)
    precision.compute_dtype(config.dtype)
    parallel.check_kind(config.parallel)
    for name in ("model", "block", "lr_schedule", "optimizer", "augment", "xla_options"):
        valid = CHOICES[name]()
        if getattr(config, name) not in valid:
            _refuse(name, getattr(config, name), f"valid: {', '.join(valid)}")
    parse_block_and_model_options(config)
    init_from.check(config)


def load_dataset(config: Config, preprocessing: PretrainedConfig | None = None) -> data.Dataset:
    """``config``'s dataset, as the run trains on it; with ``--init-from``, as its weights expect it.

    ``preprocessing`` is the weights' (read from ``config.init_from`` when not given); whatever
    rebuilds a run's dataset (``viz``, ``evaluate --workdir``, a study) goes through here.
    """
    if config.init_from and preprocessing is None:
        preprocessing = init_from.read(config).config
    return data.load(
        config.dataset,
        data_dir=config.data_dir,
        manual_dir=config.manual_dir,
        image_size=config.image_size or None,
        pretrained=preprocessing if config.init_from else None,
    )


def _check_optimizer(config: Config) -> None:
    for name in ("weight_decay", "clip_grad_norm"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            _refuse(name, value, "use 0 (off) or a finite number above 0")
    if not (math.isfinite(config.momentum) and 0 <= config.momentum < 1):
        _refuse("momentum", config.momentum, "use a number from 0 (none) up to, not including, 1, such as 0.9")
    if not (math.isfinite(config.warmup_epochs) and 0 <= config.warmup_epochs < config.epochs):
        _refuse(
            "warmup_epochs", config.warmup_epochs, f"use 0 (off) or a number of epochs below --epochs {config.epochs}"
        )
    if config.weight_decay and config.optimizer in optim.OPTIMIZERS and config.optimizer not in optim.DECAYING:
        _refuse(
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


def resolve_devices(config: Config, devices: Sequence[jax.Device] | None = None) -> tuple[list, int]:
    """The devices this process steps on and the number the global batch splits over (checked to divide it)."""
    devices = list(devices or parallel.devices_for(config.parallel))
    # pmap maps over each process's local devices; the global batch splits over all of them.
    num_devices = len(devices) * (jax.process_count() if config.parallel == "pmap" else 1)
    check_divisible(config.batch_size, num_devices)
    return devices, num_devices


@dataclasses.dataclass
class Recipe:
    """A run built from its config: dataset, model, schedule, initial state, compiled steps, devices.

    Build it with :meth:`build`. ``state`` is the initial, unreplicated state: the template a
    checkpoint restores into.
    """

    config: Config
    dataset: data.Dataset
    devices: list
    num_devices: int
    augment: str
    update_batch: int  # examples per optimizer update
    steps_per_epoch: int
    profile_steps: tuple[int, int] | None
    model: nn.Module
    schedule: optim.LearningRate  # the learning rate of any step: optim.learning_rate_at(schedule, step)
    state: TrainState
    train_step: Callable = dataclasses.field(repr=False)  # (state, device batch) -> (state, metrics), donating
    eval_step: Callable = dataclasses.field(repr=False)  # (state, device batch) -> sums
    pretrained: PretrainedConfig | None = None  # with --init-from: the weights' preprocessing
    init_note: str = ""  # with --init-from: what a fresh start loaded (printed only then)
    init_record: dict | None = None

    @classmethod
    def build(
        cls, config: Config, devices: Sequence[jax.Device], num_devices: int, dataset: data.Dataset | None = None
    ) -> Recipe:
        """``dataset`` is ``config.dataset`` already loaded (:func:`load_dataset`), or ``None`` to load it."""
        loaded = init_from.read(config)
        if dataset is None:
            dataset = load_dataset(config, loaded.config if loaded else None)
        update_batch = config.batch_size * config.grad_accum
        steps_per_epoch = data.pipeline.steps_per_epoch(len(dataset.train), update_batch)
        profile_steps = parse_steps(config.profile_steps)
        if profile_steps and profile_steps[0] > config.epochs * steps_per_epoch:
            raise InputError(
                f"--profile-steps {config.profile_steps} starts after the run's last step: it has "
                f"{config.epochs * steps_per_epoch} steps ({steps_per_epoch} per epoch); choose a START up to that"
            )
        model = create_model(config, dataset.num_classes)
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
        init_note, init_record = "", None
        if loaded is not None:
            state, init_note, init_record = init_from.initialise(state, loaded, config.init_from)
        dtype = precision.compute_dtype(config.dtype)
        options = xla_options.compiler_options(config.xla_options)  # jit only; pmap reads XLA_FLAGS (set by the CLI)
        step = functools.partial(train_step, dtype=dtype, microbatches=config.grad_accum, seed=config.seed)
        return cls(
            config=config,
            dataset=dataset,
            devices=list(devices),
            num_devices=num_devices,
            augment=data.resolve_augment(config.augment, dataset),
            update_batch=update_batch,
            steps_per_epoch=steps_per_epoch,
            profile_steps=profile_steps,
            model=model,
            schedule=schedule,
            state=state,
            train_step=parallel.wrap_step(step, devices, config.parallel, donate_state=True, compiler_options=options),
            eval_step=parallel.wrap_step(
                functools.partial(eval_step, dtype=dtype), devices, config.parallel, compiler_options=options
            ),
            pretrained=loaded.config if loaded else None,
            init_note=init_note,
            init_record=init_record,
        )

    def replicate(self, state: TrainState) -> TrainState:
        return parallel.replicate(state, self.devices)

    def train_batches(self, epoch: int, start: int) -> Iterator[dict]:
        """Epoch ``epoch``'s training batches from batch ``start`` on, on the devices."""
        if start >= self.steps_per_epoch:
            return iter(())  # interrupted during the evaluation: the epoch's steps are done
        batches = data.pipeline.train_batches(
            self.dataset,
            self.update_batch,
            seed=self.config.seed,
            epoch=epoch,
            augment=self.augment,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            start=start,
        )
        return parallel.to_devices(batches, self.devices, kind=self.config.parallel)

    def run_description(self) -> dict[str, Any]:
        """What ``config.json`` records besides the config: where and with what the run computes."""
        return {
            "augment": self.augment,
            "devices": self.num_devices,
            "processes": jax.process_count(),
            "jax": jax.__version__,
            "dataset": self.dataset.describe(),
            "xla_options": xla_options.applied(self.config.xla_options),  # what XLA:CPU compiled with
            "formulations": ops.chosen(),  # which formulation each backend-dependent op traced
            **init_from.describe(self.init_record, self.pretrained),
        }
