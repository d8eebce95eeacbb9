"""Pretrained timm weights, read and written with their preprocessing: files, hub snapshots and hub ids.

    from attnjax.models import pretrained
    loaded = pretrained.load("timm/seresnet50.ra2_in1k", "seresnet50")        # the hub (or its cache, offline)
    loaded = pretrained.load("weights.safetensors", "resnet18")                # .safetensors, .pth, .bin, a folder
    logits = models.create("resnet18", num_classes=1000).apply(loaded.variables, images_nhwc)
    loaded.config.mean, loaded.config.crop_pct, loaded.config.interpolation     # the eval transform's settings

    loaded = pretrained.load("weights.safetensors", "resnet18", num_classes=10)  # fine-tune: a new classifier
    variables = pretrained.merge(fresh_variables, loaded.variables)             # loaded.new: left to `fresh`
    pretrained.save("out_dir", "resnet18", variables, loaded.config)            # timm loads out_dir/model.safetensors

Sources (:func:`read`):

- a ``.safetensors`` file (read with ``safetensors.numpy``, no torch needed);
- a PyTorch ``.pth``/``.pt``/``.bin``/``.ckpt`` file, read with ``torch.load(map_location="cpu",
  weights_only=True)`` (torch is imported only then). As timm's ``load_checkpoint`` does, a checkpoint dict
  is unwrapped from ``state_dict_ema``, ``model_ema`` (timm's EMA weights first), ``state_dict`` or ``model``,
  and the prefixes ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) are removed from its keys. timm's
  training checkpoints also pickle their ``argparse.Namespace`` of arguments, which is allowed; any other
  Python object in the pickle is refused (``weights_only``), as are NumPy ``.npz`` checkpoints (timm reads those
  with model-specific code, ResNets have none);
- a folder laid out as a hub snapshot: ``model.safetensors`` (else ``pytorch_model.bin``) and ``config.json``;
- a Hugging Face hub id, ``timm/seresnet50.ra2_in1k`` or ``hf-hub:timm/seresnet50.ra2_in1k`` (``@revision``
  allowed), through ``huggingface_hub.hf_hub_download``: ``model.safetensors`` (else ``pytorch_model.bin``) and
  ``config.json``, kept in its cache (``HF_HUB_CACHE``/``HF_HOME``). With ``HF_HUB_OFFLINE=1`` (read at each
  call) only the cache is used. A path that exists is always read as a path, never as a hub id.

Floating-point weights are read as float32 (timm's half-precision releases included).

The preprocessing travels with the weights (:class:`PretrainedConfig`): ``config.json``'s ``pretrained_cfg``
in timm's layout (``save_config_for_hf``: ``architecture``, ``num_classes``, ``num_features`` at the top,
``pretrained_cfg`` with ``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``, ...; the older flat
layout is read as well), from the hub or beside a local file. Without one, timm's generic ResNet defaults
(``_cfg`` in timm's resnet.py: 224 x 224, crop 0.875, bilinear, ImageNet's mean and std), with a note that
says so: a particular release may differ (timm's ``resnet50.a1_in1k`` evaluates at crop 0.95, bicubic).

Every refusal is one :class:`InputError` line and nothing is loaded partially: a missing, truncated or
foreign file, another network's weights, a key missing or extra or a shape that differs (the first, in timm's
order, from :func:`attnjax.models.timm_weights.from_timm`), or a hub id that is neither online nor cached.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from attnjax.data.pretrained_transforms import PretrainedConfig, config_from_json, default_config
from attnjax.models import timm_weights
from attnjax.validate import InputError

SAFETENSORS_NAME = "model.safetensors"  # timm's HF_SAFE_WEIGHTS_NAME
TORCH_NAME = "pytorch_model.bin"  # timm's HF_WEIGHTS_NAME
CONFIG_NAME = "config.json"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
HUB_PREFIX = "hf-hub:"
# timm's checkpoint wrappers, in timm's order of preference (timm.models._helpers.load_state_dict, use_ema=True)
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
KEY_PREFIXES = ("module.", "_orig_mod.")  # timm's clean_state_dict
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """What :func:`load` read: attnjax ``variables`` (NumPy), their ``config``, the ``source`` (the file read)
    and ``new``: the variables' paths (``params/fc/kernel``, ...) that were not loaded and must be initialised
    (:func:`merge`)."""

    variables: dict
    config: PretrainedConfig
    source: str
    new: tuple[str, ...] = ()


# ---- reading -------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"cannot read {path}: {error}") from None


def _float32(array: np.ndarray) -> np.ndarray:
    """Floating-point arrays as float32: float16, float64 and bfloat16 (ml_dtypes', not a NumPy floating type)."""
    floating = np.issubdtype(array.dtype, np.floating) or "float" in array.dtype.name
    return array.astype(np.float32) if floating and array.dtype != np.float32 else array


def _read_safetensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    try:
        state = load_file(str(path))
    except Exception as error:  # noqa: BLE001 (SafetensorError for truncated or foreign bytes, TypeError, ...)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(
            f"cannot read {path} as safetensors ({reason}): is the file complete and a .safetensors?"
        ) from None
    return {key: _float32(value) for key, value in state.items()}


def _tensor_to_numpy(value):
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return value


def _read_torch(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise InputError(f"reading {path} needs PyTorch (pip install torch), or convert it to .safetensors") from None
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm's training checkpoints keep their args
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (UnpicklingError, RuntimeError for a truncated zip, EOFError, ...)
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        fix = "is the file complete and a PyTorch checkpoint?"
        if "weights only" in reason.lower() or "weights_only" in reason or "Unsupported global" in reason:
            reason = "it holds Python objects besides tensors, which are not unpickled (weights_only=True)"
            fix = "save the state dict alone (torch.save(model.state_dict(), path)) or as .safetensors"
        raise InputError(f"cannot read {path} as a PyTorch checkpoint: {reason}; {fix}") from None
    state = unwrap(checkpoint, str(path))
    return {
        key: _float32(np.asarray(_tensor_to_numpy(value))) if hasattr(value, "detach") else value
        for key, value in state.items()
    }


def unwrap(checkpoint: Any, where: str) -> dict:
    """The state dict in a timm/PyTorch checkpoint: unwrapped and its keys cleaned as timm's ``load_state_dict``."""
    if not isinstance(checkpoint, Mapping):
        raise InputError(f"{where} holds a {type(checkpoint).__name__}, not a state dict (a dict of tensors)")
    for key in WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state = {}
    for key, value in checkpoint.items():
        key = str(key)
        for prefix in KEY_PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value
    return state


def read_state_dict(path: str | Path) -> dict:
    """The state dict in one weights file (``.safetensors`` or a PyTorch pickle), as NumPy arrays."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return unwrap(_read_safetensors(path), str(path))
    if path.suffix in (".npz", ".npy"):
        raise InputError(f"{path}: NumPy checkpoints are not read (timm's ResNets have none); use .safetensors or .pth")
    if path.suffix not in TORCH_SUFFIXES:
        with path.open("rb") as f:
            head = f.read(9)
        if len(head) >= 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then JSON
            return unwrap(_read_safetensors(path), str(path))
    return _read_torch(path)


def _in_folder(folder: Path) -> tuple[Path, Path | None]:
    for name in (SAFETENSORS_NAME, TORCH_NAME):
        if (folder / name).is_file():
            config = folder / CONFIG_NAME
            return folder / name, config if config.is_file() else None
    raise InputError(
        f"folder {folder} holds no {SAFETENSORS_NAME} or {TORCH_NAME} (the layout of a hub snapshot): "
        "pass the weights file itself"
    )


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_files(hub_id: str) -> tuple[Path, Path | None]:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise InputError(f"reading the hub id {hub_id!r} needs huggingface_hub (pip install huggingface_hub)") from None
    repo, _, revision = hub_id.partition("@")
    offline = _true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("TRANSFORMERS_OFFLINE"))
    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read here: huggingface_hub reads it once, at import

    def download(filename: str) -> Path | None:
        try:
            return Path(
                hf_hub_download(
                    repo, filename, revision=revision or None, cache_dir=cache_dir, local_files_only=offline
                )
            )
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None

    try:
        weights = download(SAFETENSORS_NAME) or download(TORCH_NAME)
        config = download(CONFIG_NAME) if weights else None
    except GatedRepoError:
        raise InputError(f"hub model {hub_id!r} is gated: log in (hf auth login) and accept its terms") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise InputError(f"hub model {hub_id!r} does not exist (check the id, e.g. timm/resnet18.a1_in1k)") from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        raise InputError(f"cannot download {hub_id!r} from the hub ({reason}): pass a local file instead") from None
    if weights is None:
        if offline:
            raise InputError(
                f"hub model {hub_id!r} is not in the hub cache ({cache_dir or 'the default cache'}) and HF_HUB_OFFLINE "
                "is set: download it once with network (unset HF_HUB_OFFLINE), or pass a local weights file"
            )
        raise InputError(f"hub model {hub_id!r} has no {SAFETENSORS_NAME} or {TORCH_NAME}: pass a local weights file")
    return weights, config


def resolve(source: str | Path) -> tuple[Path, Path | None, str]:
    """The weights file, its ``config.json`` (or ``None``) and how the source was read (for messages)."""
    text = str(source)
    path = Path(text).expanduser()
    looks_like_file = path.suffix in (".safetensors", ".npz", ".npy", *TORCH_SUFFIXES) or text.startswith(
        (".", "/", "~")
    )
    if text.startswith(HUB_PREFIX) or (not path.exists() and _HUB_ID.match(text) and not looks_like_file):
        hub_id = text.removeprefix(HUB_PREFIX)
        if not _HUB_ID.match(hub_id):
            raise InputError(f"{text!r} is not a hub id (owner/name, e.g. hf-hub:timm/resnet18.a1_in1k)")
        weights, config = _hub_files(hub_id)
        return weights, config, f"hub model {hub_id}"
    if path.is_dir():
        weights, config = _in_folder(path)
        return weights, config, f"folder {path}"
    if not path.is_file():
        raise InputError(
            f"weights {text} do not exist: pass a .safetensors/.pth/.bin file, a folder with {SAFETENSORS_NAME}, "
            "or a hub id such as timm/resnet18.a1_in1k"
        )
    beside = path.parent / CONFIG_NAME
    return path, beside if beside.is_file() else None, f"file {path}"


def read(source: str | Path, name: str) -> tuple[dict, PretrainedConfig, Path]:
    """The state dict (NumPy), the :class:`PretrainedConfig` and the weights file of ``source`` (see the module)."""
    weights, config_path, _ = resolve(source)
    state = read_state_dict(weights)
    if config_path is None:
        config = default_config(name)
    else:
        config = config_from_json(_read_json(config_path), name, str(config_path))
    return state, config, weights


# ---- loading and saving --------------------------------------------------------------------------------------

CLASSIFIER = ("fc.weight", "fc.bias")
CLASSIFIER_PATHS = ("params/fc/kernel", "params/fc/bias")


def load(source: str | Path, name: str, num_classes: int | None = None) -> Pretrained:
    """timm's weights of network ``name`` from ``source`` (a file, a snapshot folder or a hub id) as attnjax's.

    With ``num_classes`` other than the file's classifier's, the classifier (``fc``) is not loaded: it is left
    out of ``variables`` and listed in ``new`` (:func:`merge` puts the loaded variables into freshly initialised
    ones). Raises :class:`InputError` (one line) for any bad source, before anything is returned.
    """
    from attnjax import models

    if name not in models.TIMM_NETWORKS:
        raise InputError(f"{name!r} has no timm weights; timm's networks in attnjax: {', '.join(models.TIMM_NETWORKS)}")
    state, config, weights = read(source, name)
    architecture = config.architecture.split(".")[0]
    if not config.default and architecture != name:
        raise InputError(
            f"{weights} holds timm's {config.architecture!r} weights (its config.json), not {name!r}: "
            f"pass the model {architecture!r}, or weights of {name}"
        )
    fc = state.get("fc.weight")
    file_classes = int(fc.shape[0]) if getattr(fc, "ndim", 0) == 2 else None
    new: tuple[str, ...] = ()
    if num_classes is not None and file_classes is not None and num_classes != file_classes:
        if num_classes < 1:
            raise InputError(f"num_classes must be positive, got {num_classes}")
        state = dict(state)  # a stand-in classifier of the new shape: the rest is checked as usual, then dropped
        state["fc.weight"] = np.zeros((num_classes, fc.shape[1]), np.float32)
        if "fc.bias" in state:
            state["fc.bias"] = np.zeros((num_classes,), np.float32)
        new = CLASSIFIER_PATHS
    try:
        variables = timm_weights.from_timm(name, state)
    except InputError as error:
        raise InputError(f"{weights}: {error}") from None
    if new:
        del variables["params"]["fc"]
    classes = num_classes if num_classes is not None else (file_classes or config.num_classes)
    config = dataclasses.replace(config, num_classes=classes, label_names=None if new else config.label_names)
    return Pretrained(variables=variables, config=config, source=str(weights), new=new)


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def merge(fresh: Mapping, loaded: Mapping) -> dict:
    """``fresh`` (a model's initialised variables) with every variable of ``loaded`` put in its place.

    What ``loaded`` lacks (the classifier of :func:`load` with a new ``num_classes``) keeps its fresh value.
    A loaded variable that ``fresh`` lacks or that has another shape raises :class:`InputError` (the first one).
    """
    given = _flatten(loaded)
    target = _flatten(fresh)
    for path, value in given.items():
        if path not in target:
            raise InputError(f"the loaded variable {'/'.join(path)} is not in the model's variables: another model?")
        if tuple(np.shape(value)) != tuple(np.shape(target[path])):
            raise InputError(
                f"the loaded variable {'/'.join(path)} has shape {tuple(np.shape(value))}, "
                f"the model's has {tuple(np.shape(target[path]))}"
            )

    def build(tree: Mapping, prefix: tuple[str, ...]) -> dict:
        out = {}
        for key, value in tree.items():
            path = (*prefix, key)
            if isinstance(value, Mapping):
                out[key] = build(value, path)
            else:
                out[key] = np.asarray(given[path], dtype=np.asarray(value).dtype) if path in given else value
        return out

    return build(fresh, ())


def save(path: str | Path, name: str, variables: Mapping, config: PretrainedConfig | None = None) -> Path:
    """Write ``variables`` of network ``name`` as timm's ``.safetensors`` with its ``config.json`` beside it.

    ``path`` ending in ``.safetensors`` is the file; otherwise a folder laid out as a hub snapshot
    (``model.safetensors``, ``config.json``), which timm's ``load_model_config_from_path`` and
    ``load_checkpoint`` read. Returns the weights file.
    """
    from safetensors.numpy import save_file

    state = timm_weights.to_timm(name, variables)
    num_classes = int(state["fc.weight"].shape[0])
    config = config or default_config(name)
    config = dataclasses.replace(config, architecture=name, num_classes=num_classes)
    if config.label_names and len(config.label_names) != num_classes:
        config = dataclasses.replace(config, label_names=None)
    path = Path(path)
    weights = path if path.suffix == ".safetensors" else path / SAFETENSORS_NAME
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: np.array(value, order="C") for key, value in state.items()}, str(weights))  # 0-d stays 0-d
    cfg = config.to_timm()
    cfg["num_features"] = int(state["fc.weight"].shape[1])
    (weights.parent / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return weights


__all__ = [
    "Pretrained",
    "PretrainedConfig",
    "config_from_json",
    "default_config",
    "load",
    "merge",
    "read",
    "read_state_dict",
    "resolve",
    "save",
    "unwrap",
]
