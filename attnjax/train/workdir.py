"""A run's folder and its plain files, and the one place that asks whether this is process 0.

``WORKDIR/config.json`` (the options and where the run computed), ``metrics.jsonl`` (one JSON
line per finished epoch), ``variables.msgpack`` (the model after the last epoch) and
``progress`` (the last step dispatched). Checkpoints live in ``WORKDIR/checkpoints``
(:mod:`attnjax.train.checkpoint`). :func:`check_workdir` refuses a folder that this run must
not touch, before any work and without writing anything; :func:`claim_workdir` then creates
it and takes its lock (``WORKDIR/lock``: one writer per workdir); :class:`Workdir` writes the
files, on process 0 only.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from importlib import metadata

import jax
import numpy as np

from attnjax import models
from attnjax.train import checkpoint
from attnjax.train.config import REGISTRY_KEY, Config, other_options_message, recorded_config
from attnjax.train.hooks import Hook
from attnjax.validate import InputError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
PROGRESS_FILE = "progress"  # the last step dispatched, rewritten in place every step: how much an interruption lost
TIMING_FIELDS = ("images_per_second", "epoch_seconds")  # the only fields that vary between identical runs
SHARED_MARKER = ".attnjax-shared-check"
LOCK_FILE = "lock"  # flock'ed by the process that writes the run; the kernel drops it when that process dies
# Orbax cannot read back a checkpoint whose path holds these (its OCDBT merge globs the folder, and
# TensorStore takes a backslash for a separator): measured with orbax-checkpoint 0.12.8 and
# tensorstore 0.1.86, Orbax alone.
UNREADABLE_PATH_CHARACTERS = "[]\\"


def is_leader() -> bool:
    """Process 0 writes the run's files and prints; every process computes and makes the collective calls."""
    return jax.process_index() == 0


def read_config(workdir: str) -> dict | None:
    """The ``config`` object of ``WORKDIR/config.json``, or ``None`` when there is none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return recorded_config(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path} cannot be read ({error}); restore it, or pass a new --workdir") from None


def metrics_lines(workdir: str) -> int:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def check_workdir(config: Config, workdir: str, resume: bool = True) -> None:
    """Refuse a workdir this run must not touch, before any work; writes nothing.

    A workdir that holds a run is continued (``resume``) only with the same options that
    shape training (:data:`attnjax.train.config.TRAJECTORY_FIELDS`); ``resume=False`` refuses it.
    A workdir in use by another process is refused. An unreadable ``config.json`` is noted:
    the run's checkpoint, which records its config, is checked against this command instead.
    """
    check_path_characters(workdir)
    names = (CONFIG_FILE, METRICS_FILE, checkpoint.CHECKPOINTS_DIR)
    holds = [name for name in names if os.path.exists(os.path.join(workdir, name))]
    if holds and not resume:
        raise InputError(
            f"{workdir} holds a run ({', '.join(holds)}) and --no-resume refuses to touch it: "
            "drop --no-resume to continue that run, or pass a new --workdir."
        )
    if is_leader():
        holder = WorkdirLock(workdir).holder()
        if holder is not None:
            raise InputError(in_use_message(workdir, holder))
    try:
        saved = read_config(workdir)
    except InputError as error:
        if not os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINTS_DIR)):
            raise
        saved = None
        if is_leader():
            note = f"attnjax: {str(error).split(';')[0]}; this command is checked against the run's checkpoint instead"
            print(note, file=sys.stderr, flush=True)
    if saved is not None:
        diff = config.trajectory_diff(saved)
        if diff:
            raise InputError(other_options_message(workdir, diff))
    has_checkpoints = os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINTS_DIR))
    if metrics_lines(workdir) and not has_checkpoints:
        raise InputError(
            f"{os.path.join(workdir, METRICS_FILE)} already exists from an earlier run that left no checkpoint to "
            "continue from; attnjax does not overwrite results. Pass a new --workdir (or move that run away)."
        )


def check_path_characters(workdir: str) -> None:
    """Refuse a path whose checkpoints Orbax would write and then fail to read (the run would be lost)."""
    path = os.path.abspath(workdir)
    found = sorted({c for c in path if c in UNREADABLE_PATH_CHARACTERS})
    if found:
        shown = " ".join(found)
        raise InputError(
            f"--workdir {path} holds {shown}: Orbax writes checkpoints under such a path but cannot read them back. "
            f"Pass a --workdir whose full path has none of [ ] \\ (spaces and non-ASCII letters are fine)."
        )


def claim_workdir(workdir: str) -> WorkdirLock:
    """Create ``workdir`` (on process 0), check that it can be written, and take its lock for the run.

    Every process returns the lock (only process 0's holds the file); all fail together when
    process 0 cannot claim the folder, and a multi-host run checks that all processes share it.
    """
    lock, problem = WorkdirLock(workdir), None
    if is_leader():
        probe = os.path.join(workdir, f".attnjax-write-test-{os.getpid()}")
        try:
            os.makedirs(workdir, exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as error:
            problem = (
                f"--workdir {workdir} cannot be created or written ({error.strerror or error}): "
                "pass a folder you can write to."
            )
        if problem is None:
            problem = lock.acquire()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = multihost_utils.broadcast_one_to_all(np.asarray(problem is not None, np.int32))
        if int(failed) and problem is None:
            problem = f"process 0 could not claim --workdir {workdir}: its message says why"
        if problem is None:
            check_workdir_is_shared(workdir)
    if problem is not None:
        lock.release()
        raise InputError(problem)
    return lock


def in_use_message(workdir: str, holder: str) -> str:
    return (
        f"--workdir {workdir} is in use by another attnjax process ({holder}): wait for it to finish or stop it, "
        "or pass another --workdir."
    )


class WorkdirLock(contextlib.AbstractContextManager):
    """An advisory ``flock`` on ``WORKDIR/lock``, held while one process writes the run.

    The kernel releases it when the process exits, however it exits, so ``kill -9`` never
    leaves a stale lock. The file holds the holder's pid, host and start time, for the message
    a second process prints; the file itself stays (removing a lock file races with its next taker).
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.fd: int | None = None

    def holder(self) -> str | None:
        """Who holds the lock now (as written in the file), or ``None`` if nobody does; creates nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None  # no lock file: no attnjax process has claimed this workdir
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return self._describe()
        finally:
            os.close(fd)  # closing drops the probe's shared lock, if it got one
        return None

    def _describe(self) -> str:
        try:
            with open(self.path) as f:
                return f.read().strip() or "a process that has not written its name yet"
        except OSError:
            return "a process whose name cannot be read"

    def acquire(self) -> str | None:
        """Take the lock; ``None`` on success, else the one-line refusal naming the holder."""
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            return (
                f"{self.path} cannot be opened as the workdir's lock ({error.strerror or error}): "
                "remove it and rerun the same command"
            )
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            return in_use_message(os.path.dirname(self.path), self._describe())
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an idle workdir's lock names nobody
            os.close(self.fd)  # releases the flock
            self.fd = None

    def __exit__(self, *exc) -> None:
        self.release()


def check_workdir_is_shared(workdir: str) -> None:
    """Several processes must see one workdir: every process reads the checkpoints when a run resumes.

    Process 0 writes a marker; every process says whether it sees it; all fail together if one does not.
    """
    from jax.experimental import multihost_utils

    marker = os.path.join(workdir, SHARED_MARKER)
    if is_leader():
        with open(marker, "w") as f:
            f.write("written by process 0")
    multihost_utils.sync_global_devices("attnjax:shared-marker-written")
    seen = multihost_utils.process_allgather(np.asarray(os.path.exists(marker), np.int32))
    multihost_utils.sync_global_devices("attnjax:shared-marker-read")
    if is_leader():
        os.remove(marker)
    missing = [int(p) for p in np.flatnonzero(np.asarray(seen) == 0)]
    if missing:
        raise InputError(
            f"--workdir {workdir} is not shared by all processes: process(es) {missing} cannot see what process 0 "
            "writes there. A multi-host run keeps its checkpoints where every host reads them: put the workdir on a "
            "file system all hosts mount at the same path (NFS/Filestore, or a bucket through Cloud Storage FUSE)."
        )


def versions() -> dict:
    """The versions of the packages that shape a run's numbers, as each checkpoint records them."""
    found = {}
    for package in ("attnjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


class Workdir:
    """The run's files in ``path``; only process 0 (``leader``) writes or prints."""

    def __init__(self, path: str):
        self.path = path
        self.leader = is_leader()
        self.metrics_path = os.path.join(path, METRICS_FILE)

    def say(self, *args, **kwargs) -> None:
        """``print`` on process 0."""
        if self.leader:
            print(*args, **kwargs)

    def has_metrics(self) -> bool:
        return bool(metrics_lines(self.path))

    def write_config(self, config: Config, run: dict) -> None:
        """``config.json``; left as it is when it already says the same (a finished run rerun changes no file)."""
        if self.leader:
            text = json.dumps({"config": config.to_dict(), REGISTRY_KEY: models.REGISTRY_VERSION, **run}, indent=2)
            path = os.path.join(self.path, CONFIG_FILE)
            try:
                with open(path) as f:
                    if f.read() == text:
                        return
            except OSError:
                pass  # missing or unreadable: written anew
            checkpoint.write_atomically(path, text)

    def write_history(self, history: list[dict]) -> None:
        """``metrics.jsonl`` as ``history``: a resumed run's finished epochs are the checkpoint's.

        Whatever the file had gained since the checkpoint (epochs that run again) is dropped.
        """
        if self.leader:
            checkpoint.write_atomically(self.metrics_path, "".join(json.dumps(r) + "\n" for r in history))

    def write_epoch(self, variables: dict, record: dict) -> None:
        """An epoch's results: the variables first, so a metrics line always has the model it describes beside it."""
        if self.leader:
            checkpoint.save_variables(self.path, variables)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Progress(Hook):
    """The last step dispatched, kept in ``WORKDIR/progress`` (rewritten in place, no fsync: cheap every step).

    After a kill, the next run reads it to say how many steps the interruption cost.
    """

    def __init__(self, workdir: str, enabled: bool):
        self.path = os.path.join(workdir, PROGRESS_FILE)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644) if enabled else None
        except OSError as error:
            raise InputError(
                f"{self.path} cannot be opened for writing ({error.strerror or error}); it only notes the last step "
                "dispatched: remove it and rerun the same command"
            ) from None

    def last_step(self) -> int | None:
        try:
            with open(self.path) as f:
                return int(f.read().strip() or "x")
        except (OSError, ValueError):
            return None

    def update(self, step: int) -> None:
        if self.fd is not None:
            os.pwrite(self.fd, f"{step:>20}\n".encode(), 0)

    def after_step(self, position, state, metrics) -> None:
        self.update(position.step)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
