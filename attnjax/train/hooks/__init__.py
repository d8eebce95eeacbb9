"""What the training loop does between steps, as hooks: objects with one shape, each owning its state.

The loop calls, on every hook in order, ``before_epoch(position)`` when an epoch's training
batches begin, ``before_step(position)`` before dispatching a step, ``after_step(position,
state, metrics)`` after dispatching it, and ``after_epoch(position, record)`` once an epoch's
results are written. Each hook is a context manager: leaving it (at the end of the run, or on
an error) closes what it holds. :class:`Cadence` decides when a periodic action is due.

- :mod:`~attnjax.train.hooks.checkpointing`: checkpoints on schedule, on preemption and at epoch ends;
- :mod:`~attnjax.train.hooks.nan_guard`: stop at a non-finite loss or gradient;
- :mod:`~attnjax.train.hooks.tensorboard`: TensorBoard scalars (``--tensorboard``);
- :mod:`~attnjax.train.hooks.profiler`: a ``jax.profiler`` trace of chosen steps (``--profile-steps``);
- :mod:`~attnjax.train.hooks.progress`: the progress bar, the epoch lines and the run's ETA;
- :class:`StepCallback`: a caller's function of the global step (a study's progress bar).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np


class Hook:
    """A between-steps concern. Every method does nothing unless overridden."""

    def before_epoch(self, position) -> None:
        """An epoch's training batches are about to start (``position.batch`` may be past 0 after a resume)."""

    def before_step(self, position) -> None:
        """Step ``position.step + 1`` is about to be dispatched."""

    def after_step(self, position, state, metrics) -> None:
        """Step ``position.step`` was dispatched; ``state`` and ``metrics`` are its (asynchronous) outputs."""

    def after_epoch(self, position, record: dict) -> None:
        """Epoch ``record["epoch"]`` is evaluated, saved and written; ``position`` is at the next one."""

    def close(self) -> None:
        """Release what the hook holds; safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StepCallback(Hook):
    """Calls ``function(global_step)`` after each optimizer step is dispatched."""

    def __init__(self, function: Callable[[int], None] | None):
        self.function = function

    def after_step(self, position, state, metrics) -> None:
        if self.function is not None:
            self.function(position.step)


class Cadence:
    """When a periodic action is due: every ``every_steps`` steps, or ``every_minutes`` after :meth:`reset`.

    With several processes the clocks must agree: they are compared every 10 ticks, and process
    0's decides for all (a collective call, so every process asks at the same ticks).
    """

    def __init__(self, every_steps: int = 0, every_minutes: float = 0.0):
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.reset()

    def reset(self) -> None:
        """The action just happened: the minutes count from now."""
        self.last = time.monotonic()

    def due(self, step: int, tick: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        if not self.every_minutes:
            return False
        due = time.monotonic() - self.last >= self.every_minutes * 60
        if jax.process_count() == 1:
            return due
        if tick % 10:
            return False  # processes agree on time only every 10 steps: process 0's clock decides
        from jax.experimental import multihost_utils

        return bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
