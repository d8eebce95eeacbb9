"""Placeholders: any name resolves to a class that raises when it is called or instantiated."""

from __future__ import annotations

import enum


class InterpolationMode(enum.Enum):
    """torchvision.transforms.InterpolationMode's values, which timm reads when it is imported."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _refuse(name: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(
            f"{name} is a placeholder of the test-only torchvision stand-in (tests/timm_standin): "
            "the test reached torchvision code, which these tests must not use"
        )

    return refuse


def placeholder(name: str) -> type:
    """A class named ``name`` that can be subclassed and referenced, and raises when instantiated."""
    return type(name.rsplit(".", 1)[-1], (), {"__new__": _refuse(name), "__module__": name.rsplit(".", 1)[0]})


def placeholder_module(module: str):
    """A module ``__getattr__`` (PEP 562) giving a placeholder class for every name asked for."""

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr == "InterpolationMode":
            return InterpolationMode
        value = placeholder(f"{module}.{attr}")
        globals_of = __import__("sys").modules[module].__dict__
        globals_of[attr] = value  # one class per name, so isinstance and subclassing agree
        return value

    return __getattr__
