"""The trained model's variables in the workdir: ``variables.msgpack``.

A deliberately simple format (Flax's msgpack of ``{"params", "batch_stats"}``) so that
tools such as :mod:`attnjax.viz` can rebuild the model from ``config.json`` and these
variables. It holds no optimizer state: it is for using a model, not resuming its training.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import serialization

from attnjax.validate import InputError

VARIABLES_FILE = "variables.msgpack"


def save_variables(workdir: str, variables: dict) -> str:
    """Write ``variables`` to ``workdir/variables.msgpack`` atomically; returns the path.

    The file is written beside the old one and renamed over it, so an interrupted save
    leaves the previous variables intact.
    """
    path = os.path.join(workdir, VARIABLES_FILE)
    host = jax.tree.map(np.asarray, jax.device_get(variables))
    partial = path + ".partial"
    with open(partial, "wb") as f:
        f.write(serialization.msgpack_serialize(serialization.to_state_dict(host)))
    os.replace(partial, path)
    return path


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
