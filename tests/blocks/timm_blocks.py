"""timm's own attention modules as the references of attnjax's blocks built with timm's options.

A block's timm test builds timm's module (``timm.layers.create_attn`` or its class, timm 1.0.29 through
:mod:`timm_reference`), draws random attnjax variables (every parameter and running statistic non-trivial:
:func:`torch_reference.random_variables`), converts them to a PyTorch state dict in attnjax's names (the
block's own converter), renames that to timm's names with :func:`timm_state` and loads it into timm's module,
strictly: then the two have the same parameters, and the test compares their outputs with
:func:`check_against_timm`.
"""

from __future__ import annotations

import functools
import importlib

import jax
import numpy as np
import torch
from block_harness import TOL, apply_jit, as_float64
from timm_reference import import_timm

from attnjax.compare.pytorch import nchw_to_nhwc, nhwc_to_nchw


def create_attn(name: str, channels: int, **options) -> torch.nn.Module:
    """timm's ``create_attn(name, channels, **options)`` (``halo``, ``bottleneck``: the class is called)."""
    timm = import_timm()
    made = timm.layers.create_attn(name, channels, **options)
    return made if isinstance(made, torch.nn.Module) else made(channels, **options)


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(size for size in shape if size != 1)


def timm_state(state: dict, names: dict[str, str], reference: torch.nn.Module, extra=None) -> dict:
    """``state`` (attnjax's layer names) in ``reference``'s names and shapes, plus ``extra`` (timm's own tensors).

    ``names`` maps an attnjax layer or parameter ('reduce', 'height_rel') to timm's ('mlp.fc1',
    'pos_embed.height_rel'); a tensor is reshaped to timm's shape only where the two differ by unit axes (a
    Dense kernel as a 1x1 conv). Asserts that the result has exactly timm's tensors, each of timm's shape:
    the same parameters (and running statistics) in both.
    """
    expected = reference.state_dict()
    renamed = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        name = f"{names[module]}.{leaf}" if module in names else names.get(key, key)
        target = expected[name].shape if name in expected else value.shape
        assert _squeezed(value.shape) == _squeezed(target), (key, name, tuple(value.shape), tuple(target))
        renamed[name] = torch.as_tensor(value).reshape(target)
    renamed.update(extra or {})
    assert set(renamed) == set(expected), sorted(set(renamed) ^ set(expected))
    return renamed


def load_timm(reference: torch.nn.Module, state: dict, names: dict[str, str], extra=None) -> torch.nn.Module:
    """``reference`` with :func:`timm_state` loaded (``strict``), in eval mode."""
    reference.load_state_dict(timm_state(state, names, reference, extra), strict=True)
    return reference.eval()


def check_against_timm(block, x, variables, reference: torch.nn.Module, *, train=False, float64=False):
    """Assert that the block's output equals ``reference``'s to :data:`block_harness.TOL`, both in train mode
    (batch statistics) if ``train`` and in float64 if ``float64``. Returns ``(largest error, the block's state)``."""
    if float64:
        x, variables = as_float64((x, variables))
        reference.double()
    with jax.enable_x64(float64):
        y, state = apply_jit(block, variables, x, train)
        y = np.asarray(y)
    reference.train(train)
    with torch.no_grad():
        expected = nchw_to_nhwc(reference(nhwc_to_nchw(x)))
    np.testing.assert_allclose(y, expected, rtol=TOL, atol=TOL)
    return float(np.abs(y - expected).max()), state


def _without_dd_keys(fn):
    """``fn`` without the positional strings 'device' and 'dtype' its caller adds by mistake."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return fn(*(a for a in args if not (isinstance(a, str) and a in ("device", "dtype"))), **kwargs)

    return call


class _TorchNN:
    """``torch.nn`` with ``BatchNorm2d`` called without the 'device'/'dtype' strings (see :func:`gather_excite`)."""

    BatchNorm2d = staticmethod(_without_dd_keys(torch.nn.BatchNorm2d))

    def __getattr__(self, name):
        return getattr(torch.nn, name)


def fix_gather_excite(monkeypatch) -> None:
    """Let timm 1.0.29's ``GatherExcite`` build: its ``__init__`` passes its ``dd = {'device': ..., 'dtype': ...}``
    as ``*dd`` (the two keys as positional arguments) to ``ConvMlp``, ``create_conv2d`` and ``nn.BatchNorm2d``,
    where it means ``**dd``, and fails (``got multiple values for argument``). Within the test, those three are
    called without the two strings, which is what ``**dd`` passes with device and dtype None. timm's code is
    otherwise run as it is."""
    import_timm()
    module = importlib.import_module("timm.layers.gather_excite")
    monkeypatch.setattr(module, "ConvMlp", _without_dd_keys(module.ConvMlp))
    monkeypatch.setattr(module, "create_conv2d", _without_dd_keys(module.create_conv2d))
    monkeypatch.setattr(module, "nn", _TorchNN())
