"""Preemption: SIGTERM and SIGINT become a request to stop at the next step, save and exit.

Cloud TPU VMs and SLURM send SIGTERM before they take a machine; Ctrl-C and a notebook's
interrupt send SIGINT. Either, while :class:`Preemption` is active, sets a flag instead of
killing the process; the training loop polls :meth:`Preemption.requested` after every train
step and evaluation batch, saves a checkpoint of that step and stops with
:class:`Interrupted` ("rerun the same command to continue").

Several processes (``jax.distributed``) must all save the same step. JAX's preemption sync
point does that: its runtime catches SIGTERM on whichever process receives it and every
process agrees on the step at which :func:`jax.experimental.multihost_utils.reached_preemption_sync_point`
returns True. So under ``jax.distributed`` SIGTERM is left to JAX's handler, and SIGINT is
turned into a SIGTERM to the same process so that a Ctrl-C reaches the other processes the
same way. A single process has no such runtime and uses its own flag.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; rerunning the same command continues it."""


class Preemption:
    """A context manager that turns SIGTERM/SIGINT into :meth:`requested` returning True.

    A second SIGINT while a save is pending stops at once (Python's ``KeyboardInterrupt``),
    for a user who does not want to wait; Orbax's atomic commit keeps the earlier
    checkpoints intact.
    """

    def __init__(self):
        self.received: int | None = None  # the first signal received
        self._previous: dict[int, object] = {}
        self._depth = 0  # re-entrant: a study holds one across its runs, and each run enters it again

    @property
    def distributed(self) -> bool:
        return jax.process_count() > 1

    def __enter__(self) -> Preemption:
        self._depth += 1
        if self._depth > 1:
            return self  # already installed by an outer ``with``
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        for signum in SIGNALS:
            if signum == signal.SIGTERM and self.distributed:
                continue  # JAX's preemption notifier handles it and tells the other processes
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        first = self.received is None
        self.received = signum
        if first:
            name = signal.Signals(signum).name
            extra = " (press Ctrl-C again to stop without saving)" if signum == signal.SIGINT else ""
            print(f"\n{name} received: finishing the current step, then saving a checkpoint{extra}", file=sys.stderr)
        if self.distributed:
            os.kill(os.getpid(), signal.SIGTERM)  # through JAX's notifier to every process

    def requested(self, tick: int) -> bool:
        """Whether to save and stop now. ``tick`` counts the steps and evaluation batches run so far.

        Every process must call this after every step and evaluation batch, with the same ticks.
        """
        if self.distributed:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(tick)
        return self.received is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "SIGTERM"
