"""Exit statuses: one mapping from what stopped a command to its status and its one-line message.

A script or scheduler can tell a mistake from a divergence from an interruption.
``python -m attnjax.train`` and ``python -m attnjax.compare`` both exit through :func:`exit_on_failure`.
"""

from __future__ import annotations

import contextlib
import sys

from attnjax.train.checkpoint import CheckpointError, silence_closed_event_loop_noise
from attnjax.train.hooks.nan_guard import TrainingDiverged
from attnjax.train.preemption import Interrupted
from attnjax.validate import InputError

EXIT_BAD_INPUT = 2  # an option, a workdir or a file is wrong: the message says which and what works
EXIT_DIVERGED = 3  # the loss or a gradient stopped being finite
EXIT_CHECKPOINT = 4  # a checkpoint could not be written or read
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped on SIGTERM/SIGINT after saving; rerun the same command to continue
EXIT_ABORTED = 130  # Ctrl-C before training started, or twice: nothing new was saved

FAILURES = (
    (InputError, EXIT_BAD_INPUT),
    (TrainingDiverged, EXIT_DIVERGED),
    (CheckpointError, EXIT_CHECKPOINT),
    (Interrupted, EXIT_INTERRUPTED),
)
ABORTED = "aborted by Ctrl-C; the checkpoints already committed are kept"


def status_of(error: BaseException) -> int | None:
    """The exit status for ``error``, or ``None`` for an error that is a bug (it keeps its traceback)."""
    return next((code for kind, code in FAILURES if isinstance(error, kind)), None)


@contextlib.contextmanager
def exit_on_failure(interrupted_note: str = "", aborted: str = ABORTED):
    """Turn a known failure into its message on stderr and its exit status.

    ``interrupted_note`` follows an interruption's message (a study says where its summary is);
    ``aborted`` is the message for a Ctrl-C that stopped at once.
    """
    silence_closed_event_loop_noise()
    try:
        yield
    except tuple(kind for kind, _ in FAILURES) as error:
        status = status_of(error)
        word = "stopped" if status == EXIT_INTERRUPTED else "error"
        note = interrupted_note if status == EXIT_INTERRUPTED else ""
        print(f"{word}: {error}{note}", file=sys.stderr, flush=True)
        sys.exit(status)
    except KeyboardInterrupt:
        print(aborted, file=sys.stderr, flush=True)
        sys.exit(EXIT_ABORTED)
