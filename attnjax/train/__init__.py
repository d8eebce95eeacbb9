"""The trainer: ``python -m attnjax.train``, and the names to train from Python.

Its rooms, each named for what it owns:

- ``config.py``: :class:`Config`, every option of a run and its default.
- ``recipe.py``: what a run builds from its config, once: the checks and valid values, the
  model (:func:`create_model`: also how ``viz`` and the study rebuild a run's model), the
  schedule, the optimizer, the compiled steps (:class:`Recipe`).
- ``step.py``: the pure steps: :class:`TrainState`, :func:`train_step`, :func:`eval_step`.
- ``position.py``: where a run stands, and the checkpoint's record of it (the resume format).
- ``loop.py``: :func:`train_and_evaluate` and :func:`evaluate`.
- ``hooks/``: what happens between steps: checkpointing, the NaN guard, TensorBoard, the
  profiler, progress.
- ``workdir.py``: the run's files and the checks of its folder.
- ``checkpoint.py``, ``preemption.py``: Orbax checkpoints; SIGTERM/SIGINT as a request to save and stop.
- ``parallel.py``, ``precision.py``, ``optim.py``: the step's wrappers over devices, its
  dtypes, and the optimizers composed from optax.
- ``cli.py``, ``exits.py``: the command line, and the exit statuses shared with ``python -m attnjax.compare``.

The library (``attnjax.blocks``, ``models``, ``layers``, ``ops``, ``data``) never imports it.
"""

from attnjax.train import checkpoint, init_from, optim, parallel, precision, preemption
from attnjax.train.checkpoint import CheckpointError, Checkpoints
from attnjax.train.config import TRAJECTORY_FIELDS, Config, recorded_config
from attnjax.train.hooks.nan_guard import TrainingDiverged
from attnjax.train.hooks.progress import format_duration, run_eta
from attnjax.train.loop import evaluate, train_and_evaluate
from attnjax.train.preemption import Interrupted, Preemption
from attnjax.train.recipe import (
    CHOICES,
    SCHEDULES,
    Recipe,
    check_config,
    create_model,
    create_optimizer,
    learning_rate_schedule,
    load_dataset,
    warmup_steps,
)
from attnjax.train.step import (
    TrainState,
    create_train_state,
    cross_entropy_loss,
    eval_step,
    split_microbatches,
    train_step,
)
from attnjax.train.workdir import CONFIG_FILE, METRICS_FILE, PROGRESS_FILE, TIMING_FIELDS, read_config

__all__ = [
    "CHOICES",
    "CONFIG_FILE",
    "METRICS_FILE",
    "PROGRESS_FILE",
    "SCHEDULES",
    "TIMING_FIELDS",
    "TRAJECTORY_FIELDS",
    "CheckpointError",
    "Checkpoints",
    "Config",
    "Interrupted",
    "Preemption",
    "Recipe",
    "TrainState",
    "TrainingDiverged",
    "check_config",
    "checkpoint",
    "create_model",
    "create_optimizer",
    "create_train_state",
    "cross_entropy_loss",
    "eval_step",
    "evaluate",
    "format_duration",
    "init_from",
    "learning_rate_schedule",
    "load_dataset",
    "optim",
    "parallel",
    "precision",
    "preemption",
    "read_config",
    "recorded_config",
    "run_eta",
    "split_microbatches",
    "train_and_evaluate",
    "train_step",
    "warmup_steps",
]
