"""The NaN guard: stop a run at the first step whose loss or gradient is not finite.

The step computes its own ``finite`` flag (:func:`attnjax.train.step.train_step`). Reading it
right after dispatch would wait for the step; the guard reads the flag of the step
:data:`GUARD_LAG` steps back, which has finished, so it never stalls the device queue. It also
keeps the per-step metrics not yet collected into the epoch's (:meth:`NanGuard.collect`),
checked there without lag before any save and at an epoch's end.
"""

from __future__ import annotations

import jax

from attnjax.train.hooks import Hook
from attnjax.train.position import RECORDED_METRICS

GUARD_LAG = 2  # the NaN guard reads the flag of the step this many steps back: finished, so the read never waits


class TrainingDiverged(FloatingPointError):
    """The training loss or a gradient stopped being finite."""


class NanGuard(Hook):
    """Raises :class:`TrainingDiverged` at a non-finite step, naming the last good checkpoint and the fix.

    ``describe_checkpoint(step)`` gives a checkpoint's path; ``learning_rate`` and
    ``metrics_path`` go into the message.
    """

    def __init__(self, describe_checkpoint, learning_rate: float, metrics_path: str):
        self.describe_checkpoint, self.learning_rate, self.metrics_path = (
            describe_checkpoint,
            learning_rate,
            metrics_path,
        )
        self.pending = []  # device metrics of the steps not yet collected into the epoch's

    def after_step(self, position, state, metrics) -> None:
        self.pending.append(metrics)
        if len(self.pending) > GUARD_LAG and not self.pending[-1 - GUARD_LAG]["finite"]:
            self.diverged(position.step - GUARD_LAG, position)

    def collect(self, position) -> None:
        """Move the pending metrics into ``position.epoch_metrics`` (waiting for the last step).

        Raises at a non-finite step.
        """
        first = position.step - len(self.pending) + 1
        for i, metrics in enumerate(jax.device_get(self.pending)):
            if not metrics["finite"]:
                self.diverged(first + i, position)
            for k in RECORDED_METRICS:
                position.epoch_metrics[k].append(float(metrics[k]))
        self.pending.clear()

    def diverged(self, step: int, position):
        last = position.last_good
        good = "none (no checkpoint yet)" if last is None else f"{self.describe_checkpoint(last)} (step {last})"
        raise TrainingDiverged(
            f"training diverged at step {step} (epoch {position.epoch}): the loss or a gradient is not finite. "
            f"The last good checkpoint is {good}; nothing after it was saved. Lower --learning-rate "
            f"(now {self.learning_rate}) and pass a new --workdir; the epochs before this one are in "
            f"{self.metrics_path}."
        )
