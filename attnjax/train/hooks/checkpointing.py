"""Checkpointing: where a run resumes from, and when it saves (on schedule, on preemption, at every epoch end).

:func:`restore_position` finds the newest intact checkpoint and gives the state and the
:class:`~attnjax.train.position.Position` to continue from (or a fresh start), saying what
happened. :class:`Checkpointing` is the hook that saves: every ``--checkpoint-every-steps``
steps and ``--checkpoint-every-minutes`` minutes (a :class:`Cadence`), and on SIGTERM/SIGINT
(``Preemption``), after which it raises :class:`Interrupted`. An epoch's last step is saved
after its evaluation, with the test accuracy that ranks the best checkpoint.
"""

from __future__ import annotations

import functools
import sys

import jax

from attnjax import models
from attnjax.train.checkpoint import CheckpointError, Checkpoints
from attnjax.train.config import REGISTRY_KEY, other_options_message, recorded_config
from attnjax.train.hooks import Cadence, Hook
from attnjax.train.position import Position, record_inconsistency
from attnjax.train.preemption import Interrupted, Preemption
from attnjax.validate import InputError


def restore_position(recipe, checkpoints: Checkpoints, progress, workdir) -> tuple[object, Position]:
    """The (unreplicated) state and position to continue from: the newest intact checkpoint's, or a fresh start.

    ``progress`` is the run's :class:`~attnjax.train.workdir.Progress`, which says how many steps
    an interruption lost; ``workdir`` is its :class:`~attnjax.train.workdir.Workdir`. A resumed
    run's ``metrics.jsonl`` is rewritten from the checkpoint's history.
    """
    try:
        restored = checkpoints.restore(recipe.state, check_record=functools.partial(check_run, recipe, workdir.path))
        if restored is None and workdir.has_metrics():
            raise InputError(
                f"{workdir.metrics_path} already exists from an earlier run whose checkpoints are gone; attnjax does "
                "not overwrite results. Pass a new --workdir (or move that run away)."
            )
    except BaseException:
        checkpoints.close()
        raise
    for note in checkpoints.set_aside:
        workdir.say(f"attnjax: {note}", file=sys.stderr, flush=True)
    reached = progress.last_step()
    if restored is None:
        if reached:
            workdir.say(
                f"attnjax: no checkpoint yet in {workdir.path}; the interrupted run had reached step {reached}: "
                "starting over"
            )
        if recipe.init_note:  # a resumed run's variables are its checkpoint's: the note is for a fresh start
            workdir.say(recipe.init_note, flush=True)
        return recipe.state, Position(recipe.steps_per_epoch)
    state, record = restored
    position = Position.from_record(record, recipe.steps_per_epoch)
    lost, moved = "", ""
    if reached is not None:
        lost = f"; the interrupted run had reached step {reached}: {max(reached - record['step'], 0)} steps lost"
    if record["devices"] != recipe.num_devices:
        moved = f"; written on {record['devices']} devices, continuing on {recipe.num_devices} (equal to rounding)"
    compiled = recorded_config(record).get(
        "xla_options", "tuned"
    )  # a record from before the option: XLA_OPTIONS' default
    if compiled != recipe.config.xla_options and jax.default_backend() == "cpu":
        moved += (
            f"; written with --xla-options {compiled}, continuing with {recipe.config.xla_options}: the trajectory "
            "changes from here (equal to rounding, not bit for bit)"
        )
    if position.epoch > recipe.config.epochs:
        workdir.say(f"attnjax: this run had already finished; its results are in {workdir.metrics_path}", flush=True)
    else:
        workdir.say(
            f"attnjax: resumed from {checkpoints.path(record['step'])} (step {record['step']}, epoch "
            f"{position.epoch}, batch {position.batch} of {recipe.steps_per_epoch}, saved {record['reason']})"
            f"{lost}{moved}",
            flush=True,
        )
    workdir.write_history(position.history)
    return state, position


# What a resume compares between the run's dataset (as its checkpoint recorded it) and this command's.
DATASET_FACTS = ("train_examples", "test_examples", "num_classes", "image_shape", "mean", "std")


def check_run(recipe, workdir: str, record: dict) -> str | None:
    """Check a checkpoint's record against itself and against this command (``recipe``).

    Returns why the record is damaged (its arithmetic does not hold), or ``None``; raises
    :class:`InputError` when the record is sound but this command would not continue that run:
    other options (the record holds the run's config, so this holds even without ``config.json``),
    or a dataset that changed since (another size, classes, normalisation or steps per epoch).
    """
    problem = record_inconsistency(record)
    if problem is not None:
        return problem
    diff = recipe.config.trajectory_diff(recorded_config(record))
    if diff:
        raise InputError(other_options_message(workdir, diff))
    saved = record.get("dataset") or {}  # a record from before datasets were recorded has steps per epoch only
    now = recipe.dataset.describe()
    changes = [
        f"{k}: the run's {saved[k]!r}, now {now[k]!r}" for k in DATASET_FACTS if k in saved and saved[k] != now[k]
    ]
    if record["steps_per_epoch"] != recipe.steps_per_epoch:
        changes.append(f"steps per epoch: the run's {record['steps_per_epoch']}, now {recipe.steps_per_epoch}")
    if changes:
        raise InputError(
            f"the dataset {recipe.config.dataset} has changed since the run in {workdir} began ("
            + "; ".join(changes)
            + "), so continuing it would not reproduce it. Restore the dataset as it was, or pass a new --workdir."
        )
    return None


class Checkpointing(Hook):
    """Saves the full state with the position's record; owns the run's :class:`Checkpoints` and closes them.

    ``run`` is what every record holds besides the position (config, versions, devices,
    processes). ``before_save(position)`` runs before every save: it collects the pending
    per-step metrics into the position (the NaN guard's :meth:`collect`).
    """

    def __init__(self, checkpoints: Checkpoints, preemption: Preemption, config, run: dict, before_save, say):
        self.checkpoints, self.preemption, self.run = checkpoints, preemption, run
        self.before_save, self.say = before_save, say
        self.cadence = Cadence(config.checkpoint_every_steps, config.checkpoint_every_minutes)

    def after_step(self, position: Position, state, metrics) -> None:
        if self.preemption.requested(position.tick):
            position.bank_seconds()
            self.before_save(position)
            self.stop_here(position, state, f"during epoch {position.epoch}")
        # An epoch's last step is saved after its evaluation, with the results.
        if position.batch < position.steps_per_epoch and self.cadence.due(position.step, position.tick):
            position.bank_seconds()
            self.before_save(position)
            self.save(position, state, "on schedule")

    def evaluation_stop(self, position: Position) -> bool:
        """Asked after every evaluation batch: whether a signal asks to stop (the batch counts as a tick)."""
        position.tick += 1
        return self.preemption.requested(position.tick)

    def save(self, position: Position, state, reason: str, test_accuracy=None, wait=False) -> None:
        record = position.to_record(reason, **self.run)
        self.checkpoints.save(position.step, state, record, test_accuracy=test_accuracy, wait=wait)
        self.cadence.reset()
        position.last_good = position.step

    def save_epoch(self, position: Position, state, test_accuracy: float) -> None:
        """Save an epoch's end; the caller writes its metrics line after this returns.

        Without an earlier checkpoint (``last_good``: every earlier save has committed, as each
        save waits for the one before) this save waits for its commit: otherwise a crash between
        the metrics line and the commit would leave results with no checkpoint to continue from.
        Later epochs need not wait: a rerun continues from the earlier checkpoint and rewrites
        ``metrics.jsonl`` from its history.
        """
        first = position.last_good is None
        self.save(position, state, "at the end of an epoch", test_accuracy=test_accuracy, wait=first)

    def stop_here(self, position: Position, state, where: str):
        """Save now, waiting for the commit, and raise :class:`Interrupted`."""
        self.save(position, state, "on " + self.preemption.signal_name, wait=True)
        raise Interrupted(
            f"{self.preemption.signal_name} {where}: saved {self.checkpoints.path(position.step)} (step "
            f"{position.step}, epoch {position.epoch}, batch {position.batch} of {position.steps_per_epoch}). "
            "Rerun the same command to continue."
        )

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.checkpoints.close()  # waits for the last asynchronous save; raises if it failed
            return
        try:
            self.checkpoints.close()  # the last asynchronous save is kept even when training stops on an error
        except CheckpointError as error:
            self.say(f"attnjax: {error}", file=sys.stderr, flush=True)


def run_fields(config, num_devices: int, versions: dict, dataset: dict) -> dict:
    """What every checkpoint's record holds besides the position; ``dataset``: the dataset's ``describe()``."""
    return {
        "config": config.to_dict(),
        REGISTRY_KEY: models.REGISTRY_VERSION,
        "versions": versions,
        "devices": num_devices,
        "processes": jax.process_count(),
        "dataset": dataset,
    }
