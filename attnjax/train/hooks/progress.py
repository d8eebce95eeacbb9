"""What a person watches: a progress bar per epoch, one line per finished epoch, and the whole run's ETA."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from attnjax.train.hooks import Hook


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


class ProgressReport(Hook):
    """The epoch's bar (process 0, on a terminal), then its line with the run's ETA.

    An epoch's wall time counts its evaluation and saving: the ETA is of the whole run.
    """

    def __init__(self, epochs: int, steps_per_epoch: int, say, show_bar: bool):
        self.epochs, self.steps_per_epoch, self.say, self.show_bar = epochs, steps_per_epoch, say, show_bar
        self.bar = None
        self.epoch_began = time.perf_counter()
        self.epoch_walls = []  # wall seconds of each epoch this process ran, evaluation included

    def before_epoch(self, position) -> None:
        self.epoch_began = time.perf_counter()
        if position.batch >= self.steps_per_epoch:
            return  # interrupted during the evaluation: the epoch's steps are done
        self.bar = tqdm(
            total=self.steps_per_epoch,
            initial=position.batch,
            desc=f"epoch {position.epoch}/{self.epochs}",
            unit="step",
            leave=False,
            disable=None if self.show_bar else True,
        )

    def after_step(self, position, state, metrics) -> None:
        if self.bar is not None:
            self.bar.update()
        if position.batch == self.steps_per_epoch:
            self.close()

    def after_epoch(self, position, record: dict) -> None:
        self.close()
        self.epoch_walls.append(time.perf_counter() - self.epoch_began)
        eta = run_eta(self.epoch_walls, self.epochs - record["epoch"])
        self.say(
            f"epoch {record['epoch']:>3}/{self.epochs}  train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.4f}  test loss {record['test_loss']:.4f} "
            f"acc {record['test_accuracy']:.4f}  {record['images_per_second']:,.0f} img/s"
            + (f"  run ETA {format_duration(eta)}" if eta is not None else ""),
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
