"""TensorBoard scalars for a run (``--tensorboard``), written with tensorboardX into ``WORKDIR/tb``.

tensorboardX writes TensorBoard's event files with protobuf alone: training never imports
TensorFlow, which Colab TPU runtimes lack (CLU's and ``flax.metrics.tensorboard``'s writers
import it). It is the optional extra ``attnjax[tensorboard]``; without ``--tensorboard`` a
:class:`MetricWriter` does nothing and tensorboardX is never imported.

Every scalar is keyed by the global optimizer step, so a resumed run continues the curves of
the run it continues: each run writes a new event file in the same folder, and a resumed one
starts it with a purge marker at its first new step, which tells TensorBoard to drop anything an
earlier, killed process had logged from that step on (steps that run again after the checkpoint).
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from attnjax.train import optim
from attnjax.train.hooks import Hook
from attnjax.validate import InputError

TB_DIR = "tb"
INSTALL = "pip install 'attnjax[tensorboard]'"


def check_available() -> None:
    """Refuse ``--tensorboard`` before any work when tensorboardX is not installed; the error names the fix."""
    try:
        import tensorboardX  # noqa: F401  (imports protobuf only, never TensorFlow)
    except ImportError:
        raise InputError(f"--tensorboard needs tensorboardX, which is not installed: {INSTALL}") from None


class MetricWriter:
    """Scalars by step into ``logdir`` with tensorboardX; with ``logdir=None``, a writer that does nothing.

    ``first_step`` is the first step this writer will log; given for a resumed run, TensorBoard
    discards the earlier event files' points from that step on, so no step appears twice.
    """

    def __init__(self, logdir: str | None, first_step: int | None = None):
        self._writer = None
        if logdir is not None:
            check_available()
            from tensorboardX import SummaryWriter

            # tensorboardX names files by the second and opens them with "wb": the suffix keeps two runs
            # started within one second from overwriting each other, and in order.
            suffix = f".{time.time_ns()}"
            self._writer = SummaryWriter(logdir, purge_step=first_step, flush_secs=30, filename_suffix=suffix)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log each ``tag: value`` of ``values`` at ``step``."""
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close; safe to call twice (the loop closes it on errors and at the end)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class TensorBoard(Hook):
    """Every ``log_every_steps`` steps: the window's mean train loss and accuracy, the step's learning rate, images/s.

    After each epoch: its test loss and accuracy, train means and images/s. A writer that is off
    (not ``--tensorboard``, not process 0, or a run that had already finished) logs nothing.
    """

    def __init__(self, writer: MetricWriter, log_every_steps: int, schedule: optim.LearningRate, update_batch: int):
        self.writer, self.log_every_steps = writer, log_every_steps
        self.schedule, self.update_batch = schedule, update_batch
        self.window, self.window_start = [], (0, time.perf_counter())  # the steps since the last log

    def before_epoch(self, position) -> None:
        self.window, self.window_start = [], (position.step, time.perf_counter())

    def after_step(self, position, state, metrics) -> None:
        if not self.writer.enabled:
            return
        self.window.append(metrics)
        if position.step % self.log_every_steps == 0:
            self.log_window(position.step)

    def log_window(self, step: int) -> None:
        values = jax.device_get(self.window)  # waits for the last step: the window's time is then its work's
        now = time.perf_counter()
        steps, seconds = step - self.window_start[0], now - self.window_start[1]
        self.writer.scalars(
            step,
            {
                "train/loss": np.mean([float(v["loss"]) for v in values]),
                "train/accuracy": np.mean([float(v["accuracy"]) for v in values]),
                # The rate this step's update applied: optax counts updates from 0.
                "train/learning_rate": optim.learning_rate_at(self.schedule, step - 1),
                "train/images_per_second": steps * self.update_batch / seconds,
            },
        )
        self.window, self.window_start = [], (step, now)

    def after_epoch(self, position, record: dict) -> None:
        self.writer.scalars(
            position.step,
            {
                "test/loss": record["test_loss"],
                "test/accuracy": record["test_accuracy"],
                "epoch/train_loss": record["train_loss"],
                "epoch/train_accuracy": record["train_accuracy"],
                "epoch/images_per_second": record["images_per_second"],
                "epoch/epoch": record["epoch"],
            },
        )
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()  # flushes what was logged, up to a failure


def create(workdir: str, enabled: bool, first_step: int | None = None) -> MetricWriter:
    """``WORKDIR/tb``'s writer when ``enabled`` (process 0 only, decided by the caller), else a no-op writer."""
    return MetricWriter(os.path.join(workdir, TB_DIR) if enabled else None, first_step=first_step)
