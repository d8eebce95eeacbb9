"""``--init-from FILE_OR_HUB_ID``: a run that starts from timm's pretrained weights instead of a random init.

- :func:`read`: the weights of ``config.model`` in the file, the snapshot folder or the hub id, with the
  preprocessing that came with them (:mod:`attnjax.models.pretrained`), or ``None`` without the option.
- :func:`initialise`: a fresh train state with every loaded variable put in its place. What the file
  lacks stays as initialised: a classifier whose class count differs from the dataset's (it is new),
  and the parameters of an attention block the network's timm weights do not have (``--model resnet50
  --block cbam`` from ResNet-50 weights). The optimizer's state starts fresh either way.
- :func:`describe`: what ``config.json`` records of it; :func:`preprocessing` reads that back, so a
  run's dataset is rebuilt (``viz``, ``evaluate --workdir``) without the weights file.

The weights are read at every start of the run, a resumed one included: its preprocessing shapes the
dataset. A resumed run's variables are the checkpoint's, so only a fresh start prints the note of
what was loaded.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from attnjax import models
from attnjax.data.pretrained_transforms import PretrainedConfig
from attnjax.models import pretrained
from attnjax.validate import InputError

NAMED = 4  # new variables named in the note before "and N more"
RECORD_KEY = "pretrained"  # config.json's key beside "config" (cli.RUN_KEYS)


def check(config) -> None:
    """Refuse ``--init-from`` on a model that has no timm weights, before any work."""
    if config.init_from and config.model not in models.TIMM_NETWORKS:
        raise InputError(
            f"--init-from loads timm's weights, and --model {config.model} is not one of timm's networks: "
            f"use one of {', '.join(models.TIMM_NETWORKS)}"
        )


def read(config) -> pretrained.Pretrained | None:
    """``config.init_from``'s weights as the file holds them (classifier included), or ``None`` without it."""
    if not config.init_from:
        return None
    try:
        return pretrained.load(config.init_from, config.model)
    except InputError as error:
        raise InputError(f"--init-from {config.init_from}: {error}") from None


def initialise(state, loaded: pretrained.Pretrained, source: str):
    """``state`` with ``loaded``'s variables in place; returns ``(state, note, record)``.

    ``note`` is the line a fresh start prints; ``record`` what :func:`describe` writes.
    """
    fresh = state.variables()
    variables = {key: dict(value) for key, value in loaded.variables.items()}
    fc, fresh_fc = variables["params"].get("fc"), fresh["params"].get("fc")
    classes = ""
    if fc is not None and fresh_fc is not None and np.shape(fc["kernel"]) != np.shape(fresh_fc["kernel"]):
        file_classes, run_classes = np.shape(fc["kernel"])[-1], np.shape(fresh_fc["kernel"])[-1]
        del variables["params"]["fc"]  # a head for this dataset's classes: new, as initialised
        classes = f" (the file's classifier has {file_classes} classes, this dataset {run_classes})"
    try:
        merged = pretrained.merge(fresh, variables)
    except InputError as error:
        raise InputError(
            f"--init-from {source}: {error} (the weights are {loaded.config.architecture}'s with its own "
            "attention; with another --block, start from the weights of the network without it, e.g. resnet50)"
        ) from None
    given = set(traverse_util.flatten_dict(variables))
    every = list(traverse_util.flatten_dict(fresh))
    new = ["/".join(path) for path in every if path not in given]
    merged = jax.tree.map(jnp.asarray, merged)
    state = state.replace(params=merged["params"], batch_stats=merged.get("batch_stats", {}))
    shown = ", ".join(new[:NAMED]) + (f" and {len(new) - NAMED} more" if len(new) > NAMED else "")
    note = (
        f"attnjax: --init-from {source}: loaded {len(every) - len(new)} of {len(every)} variables from "
        f"{loaded.source}; " + (f"new (initialised here): {shown}{classes}" if new else "none is new")
    )
    record = {"source": source, "file": loaded.source, "new": new}
    return state, note, record


def describe(record: dict | None, config: PretrainedConfig | None) -> dict:
    """``config.json``'s :data:`RECORD_KEY`: where the weights came from and the preprocessing they set."""
    if record is None or config is None:
        return {}
    preprocessing = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("label_names", "note")}
    return {RECORD_KEY: {**record, "preprocessing": preprocessing}}


def preprocessing(run: dict) -> PretrainedConfig | None:
    """The preprocessing a run recorded (:func:`describe`), or ``None`` for a run that started from scratch."""
    recorded = run.get(RECORD_KEY)
    if not recorded:
        return None
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded["preprocessing"].items()}
    return PretrainedConfig(**fields)
