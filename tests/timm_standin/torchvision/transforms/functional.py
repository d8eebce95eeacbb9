"""Test-only stand-in (see tests/timm_standin/README.md)."""

from torchvision._placeholder import placeholder_module

__getattr__ = placeholder_module(__name__)
