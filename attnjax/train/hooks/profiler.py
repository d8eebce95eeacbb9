"""``--profile-steps START:COUNT``: a ``jax.profiler`` trace of chosen optimizer steps, in ``WORKDIR/profile``.

The trace covers global steps START to START + COUNT - 1 (step 1 is a run's first update, so
a resumed run profiles the same steps as an uninterrupted one). Pick START after the first
epoch's first steps to keep compilation out of it. The folder holds TensorBoard's profile
layout (``plugins/profile/<time>/<host>.xplane.pb`` and ``.trace.json.gz``): open the
``.trace.json.gz`` in Perfetto (ui.perfetto.dev), or point TensorBoard with its profile
plugin at ``WORKDIR/profile``. Every process writes its own host's trace.
"""

from __future__ import annotations

import os

import jax

from attnjax.train.hooks import Hook
from attnjax.validate import InputError

PROFILE_DIR = "profile"


def parse_steps(text: str) -> tuple[int, int] | None:
    """``"START:COUNT"`` as ``(start, count)``, both at least 1; ``""`` (off) as ``None``."""
    if not text:
        return None
    start, sep, count = text.partition(":")
    try:
        parsed = int(start), int(count)
    except ValueError:
        parsed = None
    if not sep or parsed is None or min(parsed) < 1:
        raise InputError(
            f"--profile-steps {text!r} is invalid: use START:COUNT, two whole numbers of at least 1 "
            "(for example 20:5 traces optimizer steps 20 to 24)"
        )
    return parsed


class Profiler(Hook):
    """Starts the trace before step ``start`` is dispatched and stops it once step ``start + count - 1`` is done.

    With ``steps=None`` it does nothing. A run resumed inside the window traces the window's
    remaining steps; one resumed past it traces nothing. Closing it inside the window (the run
    ended or stopped there) writes the trace cut short.
    """

    def __init__(self, workdir: str, steps: tuple[int, int] | None):
        self.logdir = os.path.join(workdir, PROFILE_DIR)
        self.first, self.last = (steps[0], steps[0] + steps[1] - 1) if steps else (0, -1)
        self.tracing = False

    def before_step(self, position) -> None:
        step = position.step + 1
        if not self.tracing and self.first <= step <= self.last:
            jax.profiler.start_trace(self.logdir)
            self.tracing = True

    def after_step(self, position, state, metrics) -> None:
        if self.tracing and position.step >= self.last:
            jax.block_until_ready(
                (state, metrics)
            )  # dispatch is asynchronous: the trace must hold the last step's work
            self.close()

    def close(self) -> None:
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
