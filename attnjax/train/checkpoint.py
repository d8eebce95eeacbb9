"""What a run keeps in its workdir: full-state checkpoints, and the trained model's variables.

``WORKDIR/checkpoints/<step>/`` (:class:`Checkpoints`, through Orbax's ``CheckpointManager``)
holds everything needed to continue a run bit for bit: the whole train state (parameters,
batch-norm statistics, the Adam state, the step, the float16 loss scale) and a JSON record
(where in the run it was taken, the config, versions, device counts, the finished epochs'
metrics, the current epoch's per-step metrics, a SHA-256 digest of the saved arrays, and one of
the record itself).

Orbax commits a step atomically (written under a temporary name, renamed, then marked with
``commit_success.txt``), so a save that is killed leaves the previous checkpoints intact. On
top of Orbax this module adds what a resume needs to be trusted: a step folder without the
commit marker is set aside, a checkpoint whose arrays do not match their digest (flipped or
truncated files), or whose record does not match its digest or its own arithmetic, is set
aside and the previous one used, a checkpoint of another model is
refused naming the first parameter that differs (Orbax alone casts dtypes and ignores
shapes when restoring into numpy arrays), and a non-finite state is never written.

``WORKDIR/variables.msgpack`` (:func:`save_variables`) is a deliberately simple file (Flax's
msgpack of ``{"params", "batch_stats"}``) so that tools such as :mod:`attnjax.viz` can rebuild
the model from ``config.json`` and these variables without Orbax.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from attnjax.validate import InputError

VARIABLES_FILE = "variables.msgpack"
CHECKPOINTS_DIR = "checkpoints"
SET_ASIDE_DIR = "checkpoints-set-aside"  # damaged or uncommitted steps, moved here rather than deleted
COMMIT_MARKER = "commit_success.txt"  # what Orbax writes last, when a step is complete
KEEP_LATEST = 2  # besides the checkpoint with the best test accuracy
BEST_METRIC = "test_accuracy"

# Orbax logs every save and restore through absl, and a failed save as a traceback; a run prints its
# metrics, and a failure as one CheckpointError that names the cause.
logging.getLogger("absl").setLevel(logging.CRITICAL)


def silence_closed_event_loop_noise() -> None:
    """Drop the "Event loop is closed" errors that Orbax's pending TensorStore callbacks raise at exit.

    After a failed save or a damaged read, callbacks still queued for Orbax's asyncio loop run
    while the interpreter shuts down, and each prints a traceback as an unraisable exception,
    after the command has already printed its one-line error. Any other unraisable exception
    goes to the previous hook. Installed by the commands (:func:`attnjax.train.exits.exit_on_failure`).
    """
    previous = sys.unraisablehook
    if getattr(previous, "attnjax_filter", False):
        return

    def hook(unraisable) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    hook.attnjax_filter = True
    sys.unraisablehook = hook


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the files and what to do."""


def save_variables(workdir: str, variables: dict) -> str:
    """Write ``variables`` to ``workdir/variables.msgpack`` atomically; returns the path.

    The file is written beside the old one and renamed over it, so an interrupted save
    leaves the previous variables intact.
    """
    path = os.path.join(workdir, VARIABLES_FILE)
    host = jax.tree.map(np.asarray, jax.device_get(variables))
    write_atomically(path, serialization.msgpack_serialize(serialization.to_state_dict(host)))
    return path


def write_atomically(path: str, content: bytes | str) -> None:
    """Write ``content`` beside ``path`` and rename it over ``path``: a reader never sees half a file."""
    partial = path + ".partial"
    with open(partial, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    os.replace(partial, path)


def load_variables(workdir: str, template: dict) -> dict:
    """The variables saved in ``workdir``, checked against ``template`` (the model's freshly initialised ones)."""
    path = os.path.join(workdir, VARIABLES_FILE)
    if not os.path.exists(path):
        raise InputError(f"{path} does not exist: train a model with --workdir {workdir} first")
    try:
        with open(path, "rb") as f:
            saved = serialization.msgpack_restore(f.read())
    except Exception as error:  # msgpack raises several types on truncated or foreign bytes
        raise InputError(f"{path} is not a readable variables file ({error}); retrain or restore it") from None
    expected = serialization.to_state_dict(template)
    if _shapes(saved) != _shapes(expected):
        raise InputError(
            f"{path} does not match the model in {workdir}/config.json: its parameters have other names or "
            "shapes. Was the file copied from another run?"
        )
    return serialization.from_state_dict(template, saved)


def _shapes(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.shape(leaf) for path, leaf in flat}


def to_host(tree) -> dict:
    """``tree`` (a train state, or any pytree of arrays) as nested dicts of numpy arrays.

    Python scalars (a fresh state's ``step``) take JAX's dtype for them, as after a step.
    """
    as_jax = jax.tree.map(
        lambda x: x if isinstance(x, (jax.Array, np.ndarray)) else jnp.asarray(x), serialization.to_state_dict(tree)
    )
    return jax.tree.map(np.asarray, jax.device_get(as_jax))


def _leaves(tree) -> list[tuple[str, np.ndarray]]:
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def digest(tree) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes, in tree order."""
    h = hashlib.sha256()
    for path, leaf in _leaves(tree):
        leaf = np.ascontiguousarray(leaf)
        h.update(f"{path}|{leaf.dtype.str}|{leaf.shape}|".encode())
        h.update(leaf.tobytes())
    return "sha256:" + h.hexdigest()


def record_digest(record: Mapping) -> str:
    """SHA-256 of ``record`` as canonical JSON, leaving out its own ``record_digest``.

    JSON turns tuples into lists and back into lists: the text, hence the digest, is the same.
    """
    fields = {k: v for k, v in record.items() if k != "record_digest"}
    return "sha256:" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def first_non_finite(tree) -> str | None:
    """The path of the first floating-point leaf holding an inf or a NaN, or ``None``."""
    for path, leaf in _leaves(tree):
        if np.issubdtype(np.asarray(leaf).dtype, np.floating) and not np.all(np.isfinite(leaf)):
            return path
    return None


def describe_mismatch(saved, expected) -> str | None:
    """The first leaf whose path, shape or dtype differs between two trees of arrays (or array metadata)."""
    saved_leaves, expected_leaves = dict(_leaves(saved)), dict(_leaves(expected))
    # Parameters first: the difference a user recognises (the optimizer state mirrors them).
    for path in sorted(expected_leaves, key=lambda p: not p.startswith("['params']")):
        want = expected_leaves[path]
        if path not in saved_leaves:
            return f"{path} is missing from the checkpoint"
        got = saved_leaves[path]
        if tuple(got.shape) != tuple(np.shape(want)):
            return f"{path} has shape {tuple(got.shape)} in the checkpoint, {tuple(np.shape(want))} in this model"
        if np.dtype(got.dtype) != np.asarray(want).dtype:
            return f"{path} has dtype {np.dtype(got.dtype)} in the checkpoint, {np.asarray(want).dtype} in this model"
    extra = sorted(set(saved_leaves) - set(expected_leaves))
    return f"{extra[0]} is in the checkpoint but not in this model" if extra else None


def _is_primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Checkpoints:
    """The full-state checkpoints of one run, in ``WORKDIR/checkpoints/<step>/``.

    Keeps the latest :data:`KEEP_LATEST` steps and the step with the best test accuracy
    (two Orbax preservation policies combined: Orbax 0.12's ``best_fn`` with
    ``max_to_keep`` was measured deleting the newest checkpoint). Saves are asynchronous
    unless ``asynchronous=False``: :meth:`save` returns once the arrays are on the host,
    and a save that fails raises :class:`CheckpointError` at the next :meth:`save` or
    :meth:`wait` (never silently). Every process of a multi-host run must call the same
    methods with the same steps; process 0 writes.
    """

    def __init__(self, workdir: str, *, asynchronous: bool = True, keep_latest: int = KEEP_LATEST):
        self.workdir = workdir
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIR))
        self.set_aside: list[str] = []  # messages about the steps moved to SET_ASIDE_DIR
        self._pending: int | None = None  # the step of an asynchronous save not yet waited for
        self._set_aside_uncommitted()
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(
                [
                    policies.LatestN(keep_latest),
                    policies.BestN(
                        get_metric_fn=lambda metrics: metrics[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False
                    ),
                ]
            ),
            enable_async_checkpointing=asynchronous,
            create=True,
        )
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(), "record": ocp.JsonCheckpointHandler()},
            )
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot use {self.directory} for checkpoints: {error}") from None

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def steps(self) -> list[int]:
        """The committed steps, oldest first."""
        return sorted(self.manager.all_steps())

    def _set_aside_uncommitted(self) -> None:
        names = sorted(os.listdir(self.directory)) if os.path.isdir(self.directory) else []
        for name in names:
            folder = os.path.join(self.directory, name)
            if name.isdigit() and os.path.isdir(folder) and not os.path.exists(os.path.join(folder, COMMIT_MARKER)):
                self._move_aside(int(name), f"it has no {COMMIT_MARKER} (a save that did not finish)")
        # Every process passes here, whatever it found: the barrier keeps them in step with Orbax's own.
        _sync("attnjax:checkpoints-scanned")

    def _move_aside(self, step: int, reason: str) -> None:
        target = os.path.join(self.workdir, SET_ASIDE_DIR, str(step))
        if _is_primary():
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.exists(target):
                shutil.rmtree(target)
            shutil.move(self.path(step), target)
        self.set_aside.append(f"checkpoint step {step} was set aside to {target}: {reason}")

    def save(self, step: int, state, record: dict, *, test_accuracy: float | None = None, wait: bool = False) -> None:
        """Save the train ``state`` and the JSON ``record`` as ``step``; ``test_accuracy`` ranks the best.

        A step that is already saved is replaced (it can only be the same state: an
        evaluation interrupted at an epoch's end is saved again with its results).
        """
        host = to_host(state)
        bad = first_non_finite(host)
        if bad is not None:
            raise CheckpointError(f"refusing to save step {step}: {bad} is not finite")
        record = {**record, "step": step, "digest": digest(host)}
        record["record_digest"] = record_digest(record)
        self.wait()  # raises a failure of the previous asynchronous save before starting another
        if step in self.manager.all_steps():
            self.manager.delete(step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(host), record=ocp.args.JsonSave(record))
        metrics = None if test_accuracy is None else {BEST_METRIC: float(test_accuracy)}
        self._pending = step
        try:
            self.manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as error:
            raise self._save_failed(step, error) from None
        if wait:
            self.wait()

    def _save_failed(self, step: int, error: Exception) -> CheckpointError:
        previous = [s for s in self.steps() if s != step]
        kept = f"the last committed checkpoint, step {previous[-1]}, is intact" if previous else "no earlier checkpoint"
        return CheckpointError(
            f"saving checkpoint step {step} to {self.path(step)} failed ({type(error).__name__}: {error}); "
            f"{kept}. Make {self.directory} writable with free space, then rerun the same command to continue."
        )

    def wait(self) -> None:
        """Block until the pending asynchronous save is committed; raise :class:`CheckpointError` if it failed."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as error:
            raise self._save_failed(self._pending, error) from None
        self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def restore(self, template, check_record=None) -> tuple[object, dict] | None:
        """The newest committed checkpoint that is intact, as ``(state, record)``; ``None`` if there is none.

        ``template`` is a freshly created train state of the same model: the restored
        arrays take its structure. A checkpoint of another model raises :class:`InputError`.
        A damaged one (unreadable files or metadata, arrays or a record that do not match the
        digests recorded when it was saved, or a record that ``check_record(record)`` finds
        inconsistent: it returns the reason, or ``None``) is set aside and the previous one
        tried; if every one is damaged, :class:`CheckpointError` names them. ``check_record``
        may also raise :class:`InputError` (an intact run that this command must not continue).
        """
        expected = to_host(template)
        damaged = []
        for step in reversed(self.steps()):
            reason, restored = self._read(step, expected)
            if reason is None:
                state, record = restored["state"], restored["record"]
                reason = self._check_record(state, record, check_record)
            if reason is not None:
                damaged.append((step, reason))
                continue
            for bad_step, bad_reason in damaged:
                self._move_aside(bad_step, bad_reason)
            if damaged:
                _sync("attnjax:damaged-set-aside")
                self.manager.reload()
            return serialization.from_state_dict(template, state), dict(record)
        if damaged:
            listing = "; ".join(f"{self.path(s)}: {reason}" for s, reason in damaged)
            raise CheckpointError(
                f"no intact checkpoint to continue from ({listing}). Restore these folders from a copy, or move "
                f"{self.directory} away to start the run again."
            )
        return None

    def _read(self, step: int, expected) -> tuple[str | None, dict | None]:
        """``(None, restored)`` for a checkpoint that reads, else ``(why it is damaged, None)``."""
        try:
            metadata = self.manager.item_metadata(step)["state"]
        except Exception as error:
            return f"its metadata cannot be read ({type(error).__name__}: {str(error)[:300]})", None
        if not metadata:  # a deleted or emptied state/_METADATA reads as nothing: damage, not another model
            return "its array metadata (state/_METADATA) is missing or empty", None
        mismatch = describe_mismatch(metadata, expected)
        if mismatch:
            raise InputError(
                f"checkpoint {self.path(step)} is not of this model: {mismatch}. It was written by another "
                "configuration; pass a new --workdir for this one."
            )
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(expected), record=ocp.args.JsonRestore())
            )
        except Exception as error:
            return f"its files cannot be read ({type(error).__name__}: {str(error)[:300]})", None
        return None, restored

    @staticmethod
    def _check_record(state, record, check_record) -> str | None:
        if not isinstance(record, Mapping) or record.get("digest") != digest(state):
            return "its arrays do not match the digest recorded when it was saved"
        # Checkpoints from before the record had a digest are checked by their arithmetic alone.
        if "record_digest" in record and record["record_digest"] != record_digest(record):
            return "its record (epoch, batch, history, config) does not match the digest recorded when it was saved"
        return check_record(record) if check_record is not None else None
