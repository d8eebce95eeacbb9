"""Weights from and to timm: a timm ResNet's (SK-ResNet's, ResNeSt's) ``state_dict`` as attnjax variables, and back, bit for bit.

    from attnjax.models import timm_weights
    variables = timm_weights.from_timm("seresnet50", timm_model.state_dict())    # params and batch_stats
    logits = models.create("seresnet50", num_classes=1000).apply(variables, images_nhwc)
    state_dict = timm_weights.to_timm("seresnet50", variables, as_torch=True)    # timm_model.load_state_dict(...)

One walk names every variable in both frameworks (:func:`layout`): it walks the attnjax model's variables in
the order the model creates them, which is the order timm registers its modules, and maps each one:

- a module path to timm's: ``layer1_0`` -> ``layer1.0``, ``conv1_3`` -> ``conv1.3``, ``downsample_1`` ->
  ``downsample.1`` (a name ending in ``_<n>`` is timm's Sequential index ``.n``); the attention ``block``
  is timm's ``se`` (whatever the type), and its own layers by the block's table (:data:`ATTENTION_LAYOUTS`);
- the convs that carry attention in SK-ResNets and ResNeSts by their own names, which are timm's: SK's
  ``conv1``/``conv2`` (:class:`attnjax.blocks.SelectiveKernelAttention`: ``paths_{m}/conv``, ``paths_{m}/bn``,
  ``attn/fc_reduce``, ``attn/bn``, ``attn/fc_select``) -> timm's ``SelectiveKernel`` keys ``conv1.paths.{m}.conv``,
  ..., ``conv1.attn.fc_select``; ResNeSt's ``conv2`` (:class:`attnjax.blocks.SplitAttention`: ``conv``,
  ``bn0``, ``fc1``, ``bn1``, ``fc2``) -> timm's ``SplitAttn`` keys ``conv2.conv``, ..., ``conv2.fc2``; their 1x1
  convs (HWIO ``(1, 1, I, O)``) are timm's ``Conv2d`` weights ``(O, I, 1, 1)``, and timm's ``ConvNormAct``
  (``conv``, ``bn``) is the module of the same children here;
- a leaf to timm's: conv ``kernel`` (H, W, I, O) -> ``weight`` (O, I, H, W); dense ``kernel`` (I, O) ->
  ``weight`` (O, I), or (O, I, 1, 1) where timm has a 1x1 conv (SE's fc1/fc2); batch norm ``scale``,
  ``bias`` -> ``weight``, ``bias``; ``batch_stats`` ``mean``, ``var`` -> ``running_mean``, ``running_var``,
  and timm's ``num_batches_tracked`` beside them (ignored on import, written on export).

The running variance is copied as it is: attnjax's and timm's batch norms then compute the same outputs in
evaluation. (In training they also agree, and their running variances then move apart by the biased against
unbiased batch variance: :func:`attnjax.layers.torch_running_var`.)

A state dict that is not the model's (another network, a key missing or extra, a shape that differs) is
refused with one :class:`attnjax.validate.InputError` that names the first key that differs; nothing is
loaded partially. Reading ``.pth``/``.safetensors`` files or the hub is the caller's (``torch.load``,
``safetensors.numpy.load_file``): these functions take the dict.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import blocks
from attnjax.validate import InputError

ATTENTION = "block"  # the attention module's name in attnjax's residual blocks; timm's is "se"
TIMM_ATTENTION = "se"
NUM_BATCHES_TRACKED = "num_batches_tracked"

# The attention blocks whose parameters have a timm counterpart: attnjax's (sub-)path below the block ->
# (timm's name below ``se``, the layout). SE's Dense layers are timm's 1x1 convs; ECA's (k,) kernel is
# timm's Conv1d weight (1, 1, k).
ATTENTION_LAYOUTS: dict[type, dict[tuple[str, ...], tuple[str, str]]] = {
    blocks.SqueezeExcitation: {
        ("reduce", "kernel"): ("fc1.weight", "conv1x1"),
        ("reduce", "bias"): ("fc1.bias", "copy"),
        ("expand", "kernel"): ("fc2.weight", "conv1x1"),
        ("expand", "bias"): ("fc2.bias", "copy"),
    },
    blocks.EfficientChannelAttention: {("kernel",): ("conv.weight", "conv1d")},
}

# flax -> torch and back, per layout
_TO_TORCH = {
    "copy": lambda a: a,
    "conv": lambda a: np.transpose(a, (3, 2, 0, 1)),
    "linear": lambda a: np.transpose(a),
    "conv1x1": lambda a: np.transpose(a)[:, :, None, None],
    "conv1d": lambda a: a[None, None, :],
}
_FROM_TORCH = {
    "copy": lambda a: a,
    "conv": lambda a: np.transpose(a, (2, 3, 1, 0)),
    "linear": lambda a: np.transpose(a),
    "conv1x1": lambda a: np.transpose(a[:, :, 0, 0]),
    "conv1d": lambda a: a[0, 0, :],
}
_TORCH_SHAPE = {
    "copy": lambda s: s,
    "conv": lambda s: (s[3], s[2], s[0], s[1]),
    "linear": lambda s: (s[1], s[0]),
    "conv1x1": lambda s: (s[1], s[0], 1, 1),
    "conv1d": lambda s: (1, 1, s[0]),
}
_BATCH_STATS = {"mean": "running_mean", "var": "running_var"}
_PARAMS = {"kernel": "weight", "scale": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One variable in both frameworks: attnjax's ``(collection, *path)``, timm's ``key``, the ``layout``
    (``None`` for ``num_batches_tracked``, which attnjax does not keep) and attnjax's shape and dtype."""

    path: tuple[str, ...]
    key: str
    layout: str | None
    shape: tuple[int, ...]
    dtype: Any

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return () if self.layout is None else tuple(_TORCH_SHAPE[self.layout](self.shape))


def _timm_module(name: str) -> str:
    """``layer1_0`` -> ``layer1.0``: attnjax's ``_<n>`` suffix is timm's Sequential index."""
    return re.sub(r"_(\d+)$", r".\1", name)


def _ordered_leaves(tree, prefix=()) -> list[tuple[tuple[str, ...], Any]]:
    """The leaves of nested dicts in insertion order (the order the model created them)."""
    if isinstance(tree, Mapping):
        return [leaf for key, sub in tree.items() for leaf in _ordered_leaves(sub, (*prefix, key))]
    return [(prefix, tree)]


def _attention_table(model) -> tuple[str, dict[tuple[str, ...], tuple[str, str]] | None]:
    """The attention block's class name and its timm table (``None`` where it has no timm counterpart)."""
    block = getattr(model, "block", None)
    cls = block.func if hasattr(block, "func") else type(block)
    return cls.__name__, ATTENTION_LAYOUTS.get(cls)


def layout(model, ordered: list[tuple[tuple[str, ...], Any]]) -> list[Entry]:
    """The walk: every variable of ``model`` (``ordered``: ``(path, leaf)`` in creation order, ``path``
    beginning with ``params``/``batch_stats``), with timm's key, in timm's order."""
    stats = {path[1:-1]: {} for path, _ in ordered if path[0] == "batch_stats"}
    for path, leaf in ordered:
        if path[0] == "batch_stats":
            stats[path[1:-1]][path[-1]] = leaf
    block_name, table = _attention_table(model)
    entries: list[Entry] = []
    params = [(path[1:], leaf) for path, leaf in ordered if path[0] == "params"]
    for i, (path, leaf) in enumerate(params):
        module, name = path[:-1], path[-1]
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if ATTENTION in module:
            at = module.index(ATTENTION)
            if table is None or (*module[at + 1 :], name) not in table:
                known = ", ".join(sorted(c.__name__ for c in ATTENTION_LAYOUTS))
                raise InputError(
                    f"the attention block {block_name} has no timm counterpart for its parameter {'/'.join(path)}; "
                    f"timm's weights convert with the blocks {known} (with their timm options) or none"
                )
            timm_name, kind = table[(*module[at + 1 :], name)]
            key = ".".join([*map(_timm_module, module[:at]), TIMM_ATTENTION, timm_name])
        else:
            prefix = ".".join(map(_timm_module, module))
            key = f"{prefix}.{_PARAMS.get(name, name)}"
            kind = "copy" if name != "kernel" else {4: "conv", 2: "linear"}.get(len(shape), "copy")
        entries.append(Entry(("params", *path), key, kind, shape, dtype))
        last_of_module = i + 1 == len(params) or params[i + 1][0][:-1] != module
        if last_of_module and module in stats:  # a batch norm: timm's running statistics follow its affine
            prefix = ".".join(map(_timm_module, module))
            for stat, timm_stat in _BATCH_STATS.items():
                value = stats[module][stat]
                entries.append(
                    Entry(("batch_stats", *module, stat), f"{prefix}.{timm_stat}", "copy", value.shape, value.dtype)
                )
            entries.append(Entry((), f"{prefix}.{NUM_BATCHES_TRACKED}", None, (), np.int64))
    return entries


def _model(name: str, num_classes: int, block, block_options, options):
    from attnjax import models  # here: attnjax.models imports this module's neighbours

    if name not in models.TIMM_NETWORKS:
        raise InputError(
            f"{name!r} has no timm weights layout; timm's networks in attnjax: {', '.join(models.TIMM_NETWORKS)}"
        )
    return models.create(name, num_classes=num_classes, block=block, block_options=block_options, **options)


def model_layout(name: str, num_classes: int = 1000, *, block=None, block_options=None, **options) -> list[Entry]:
    """:func:`layout` of model ``name`` (built by :func:`attnjax.models.create` with these arguments)."""
    model = _model(name, num_classes, block, block_options, options)
    ordered: list = []

    def init(x):
        variables = model.init(jax.random.key(0), x)
        ordered.extend(_ordered_leaves(variables))  # the paths, in creation order, while tracing
        return variables

    jax.eval_shape(init, jnp.zeros((1, 64, 64, 3), jnp.float32))
    return layout(model, ordered)


def _describe(name: str, options: dict) -> str:
    extra = ", ".join(f"{k}={v!r}" for k, v in options.items())
    return f"timm's {name}" + (f" ({extra})" if extra else "")


def _as_numpy(key: str, value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise InputError(f"state dict entry {key!r} is a {type(value).__name__}, not an array or tensor")
    return np.asarray(value)


def from_timm(name: str, state_dict: Mapping[str, Any], *, block=None, block_options=None, **options) -> dict:
    """timm's ``state_dict`` of network ``name`` as attnjax's ``{"params": ..., "batch_stats": ...}`` (NumPy).

    ``state_dict`` maps timm's keys to torch tensors or arrays (``model.state_dict()``, ``torch.load(path)``,
    ``safetensors.numpy.load_file(path)``). The number of classes is read from ``fc.weight``; ``block``,
    ``block_options`` and ``options`` (model options that change the parameters, such as ``layers``) are as in
    :func:`attnjax.models.create`. The whole dict is checked before anything is converted: a key missing or
    extra, or a shape that differs, raises :class:`InputError` naming the first such key (in timm's order).
    ``num_batches_tracked`` is checked present, and not kept.
    """
    if not isinstance(state_dict, Mapping):
        raise InputError(
            f"from_timm takes a state dict (a mapping of timm's keys to tensors), got {type(state_dict).__name__}"
        )
    fc = state_dict.get("fc.weight")
    num_classes = int(fc.shape[0]) if getattr(fc, "ndim", 0) == 2 else 1000
    entries = model_layout(name, num_classes, block=block, block_options=block_options, **options)
    what = _describe(name, options)
    expected = {entry.key: entry for entry in entries}
    missing = [entry.key for entry in entries if entry.key not in state_dict]
    extra = [key for key in state_dict if key not in expected]
    if missing or extra:
        counts = f"{len(missing)} key(s) missing, {len(extra)} unexpected"
        first = f"{missing[0]!r} is missing" if missing else f"{extra[0]!r} is not in it"
        raise InputError(f"the state dict is not {what}: {first} ({counts})")
    arrays = {}
    for key in state_dict:
        entry = expected[key]
        value = _as_numpy(key, state_dict[key])
        if tuple(value.shape) != entry.torch_shape:
            raise InputError(
                f"the state dict is not {what}: {key!r} has shape {tuple(value.shape)}, {what} has {entry.torch_shape}"
            )
        arrays[key] = value
    variables: dict = {"params": {}, "batch_stats": {}}
    for entry in entries:
        if entry.layout is None:
            continue
        node = variables
        for part in entry.path[:-1]:
            node = node.setdefault(part, {})
        node[entry.path[-1]] = np.array(
            _FROM_TORCH[entry.layout](arrays[entry.key]), order="C"
        )  # a copy: no memory shared
    return variables


def to_timm(
    name: str,
    variables: Mapping[str, Any],
    *,
    block=None,
    block_options=None,
    as_torch: bool = False,
    num_batches_tracked: int = 0,
    **options,
) -> dict:
    """attnjax's ``variables`` of network ``name`` as timm's state dict, in timm's key order.

    The inverse of :func:`from_timm`: ``to_timm(name, from_timm(name, sd))`` equals ``sd`` key for key and
    bit for bit (``num_batches_tracked``, which attnjax does not keep, is written as ``num_batches_tracked``).
    NumPy arrays, or torch tensors with ``as_torch`` (for ``timm_model.load_state_dict``). ``variables``
    must hold exactly the model's ``params`` and ``batch_stats``: otherwise :class:`InputError` names the first
    path that differs.
    """
    try:
        params, batch_stats = variables["params"], variables["batch_stats"]
        num_classes = int(np.shape(params["fc"]["kernel"])[1])
    except (KeyError, TypeError, IndexError):
        raise InputError(
            "to_timm takes a ResNet's variables, {'params': ..., 'batch_stats': ...} with params['fc']['kernel']"
        ) from None
    entries = model_layout(name, num_classes, block=block, block_options=block_options, **options)
    what = f"the variables of {_describe(name, options).removeprefix('timm' + chr(39) + 's ')}"
    given = dict(_ordered_leaves({"params": params, "batch_stats": batch_stats}))
    expected = {entry.path: entry for entry in entries if entry.layout is not None}
    missing = [path for path in expected if path not in given]
    extra = [path for path in given if path not in expected]
    if missing or extra:
        first = f"{'/'.join(missing[0])} is missing" if missing else f"{'/'.join(extra[0])} is not in them"
        raise InputError(f"these are not {what}: {first} ({len(missing)} missing, {len(extra)} unexpected)")
    state = {}
    for entry in entries:
        if entry.layout is None:
            value = np.array(num_batches_tracked, np.int64)
        else:
            value = np.asarray(given[entry.path])
            if tuple(value.shape) != entry.shape:
                raise InputError(
                    f"these are not {what}: {'/'.join(entry.path)} has shape {tuple(value.shape)}, "
                    f"the model has {entry.shape}"
                )
            value = np.array(_TO_TORCH[entry.layout](value), order="C")  # a writable copy
        state[entry.key] = value
    if as_torch:
        import torch

        state = {key: torch.from_numpy(value) for key, value in state.items()}
    return state
