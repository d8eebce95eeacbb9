"""Where a run stands, and the record a checkpoint keeps of it: the resume format, as a named type.

A :class:`Position` is the loop's whole state apart from the train state: the epoch and the
batch within it, the global step, the tick (steps and evaluation batches run by this process,
the preemption sync point's clock), the finished epochs' metrics, the running epoch's per-step
metrics and seconds, the best test accuracy and the step of the last good checkpoint.
:meth:`Position.to_record` and :meth:`Position.from_record` convert it to and from the record
that every checkpoint holds beside the train state (:class:`attnjax.train.checkpoint.Checkpoints`).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

RECORDED_METRICS = ("loss", "accuracy")  # the per-step metrics an epoch's train means are made of


def empty_epoch_metrics() -> dict[str, list[float]]:
    return {k: [] for k in RECORDED_METRICS}


def epoch_means(values: dict[str, list[float]]) -> dict[str, float]:
    """Per-step metrics averaged in float64: the same value whether the floats came from the devices or a checkpoint."""
    return {k: float(np.mean(np.asarray(v, np.float64))) for k, v in values.items()}


@dataclasses.dataclass
class Position:
    """A run's position; ``epoch`` is 1-based and past ``epochs`` once the run has finished."""

    steps_per_epoch: int
    epoch: int = 1
    batch: int = 0  # batches of ``epoch`` done
    tick: int = 0  # steps and evaluation batches run by this process (not saved: a new process counts anew)
    history: list[dict] = dataclasses.field(default_factory=list)  # one metrics line per finished epoch
    epoch_metrics: dict[str, list[float]] = dataclasses.field(default_factory=empty_epoch_metrics)
    carried_seconds: float = 0.0  # training seconds of ``epoch`` banked so far (by earlier processes too)
    best_test_accuracy: float | None = None
    last_good: int | None = None  # the step of the last checkpoint saved or restored
    segment_start: float = dataclasses.field(default_factory=time.perf_counter)  # when this stretch of training began

    @property
    def step(self) -> int:
        """The global optimizer step: updates done since the run began."""
        return (self.epoch - 1) * self.steps_per_epoch + self.batch

    def advance(self) -> None:
        """One optimizer step dispatched."""
        self.batch += 1
        self.tick += 1

    def epoch_seconds(self) -> float:
        """The running epoch's training seconds: those banked plus this stretch's."""
        return self.carried_seconds + time.perf_counter() - self.segment_start

    def bank_seconds(self) -> None:
        """Add this stretch's seconds to ``carried_seconds`` (before a save) and start a new stretch."""
        self.carried_seconds += time.perf_counter() - self.segment_start
        self.segment_start = time.perf_counter()

    def finish_epoch(self, test: dict, seconds: float, update_batch: int) -> dict:
        """Record the epoch that just ended (``test``: its evaluation) and move to the next; returns its line."""
        train = epoch_means(self.epoch_metrics)
        record = {
            "epoch": self.epoch,
            "train_loss": train["loss"],
            "train_accuracy": train["accuracy"],
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "test_correct": test["correct"],
            "test_examples": test["count"],
            "images_per_second": self.steps_per_epoch * update_batch / seconds,
            "epoch_seconds": seconds,
        }
        self.history.append(record)
        best = self.best_test_accuracy
        self.best_test_accuracy = test["accuracy"] if best is None else max(best, test["accuracy"])
        self.epoch, self.batch, self.epoch_metrics, self.carried_seconds = self.epoch + 1, 0, empty_epoch_metrics(), 0.0
        return record

    def to_record(self, reason: str, **run) -> dict:
        """The checkpoint's record: this position, why it was saved, and ``run`` (config, versions, devices)."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "reason": reason,
            "history": self.history,
            "epoch_metrics": self.epoch_metrics,
            "epoch_seconds": self.carried_seconds,
            "best_test_accuracy": self.best_test_accuracy,
            "steps_per_epoch": self.steps_per_epoch,
            **run,
        }

    @classmethod
    def from_record(cls, record: dict, steps_per_epoch: int) -> Position:
        """The position a checkpoint's record (as :meth:`Checkpoints.restore` returns it, with its ``step``) saved."""
        return cls(
            steps_per_epoch=steps_per_epoch,
            epoch=record["epoch"],
            batch=record["batch"],
            history=record["history"],
            epoch_metrics=record["epoch_metrics"],
            carried_seconds=record["epoch_seconds"],
            best_test_accuracy=record["best_test_accuracy"],
            last_good=record["step"],
        )


def record_inconsistency(record: dict) -> str | None:
    """Why a checkpoint's record contradicts itself (its step, epoch, batch and history), or ``None``.

    A record that passes its digest always passes this; a record from before the digest existed
    is trusted only this far.
    """
    try:
        steps_per_epoch, epoch, batch, step = (record[k] for k in ("steps_per_epoch", "epoch", "batch", "step"))
        history = record["history"]
        counts = [len(v) for v in record["epoch_metrics"].values()]
    except (KeyError, TypeError, AttributeError) as error:
        return f"its record lacks a field ({type(error).__name__}: {error})"
    if not all(isinstance(v, int) and v >= 0 for v in (steps_per_epoch, epoch, batch, step)) or epoch < 1:
        return "its record's epoch, batch or step is not a count"
    if batch > steps_per_epoch or step != (epoch - 1) * steps_per_epoch + batch:
        return (
            f"its record says step {step} but epoch {epoch}, batch {batch} of {steps_per_epoch} "
            f"(step {(epoch - 1) * steps_per_epoch + batch})"
        )
    if [line.get("epoch") if isinstance(line, dict) else None for line in history] != list(range(1, epoch)):
        return f"its record's history has {len(history)} epoch lines where epoch {epoch} needs {epoch - 1}"
    if any(count != batch for count in counts):
        return f"its record holds {counts} per-step metrics for {batch} batches of epoch {epoch}"
    return None
