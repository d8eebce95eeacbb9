"""Test-only stand-in for torchvision (see tests/timm_standin/README.md): placeholders, no code of torchvision's."""

from torchvision._placeholder import placeholder_module

__version__ = "0.0+attnjax-test-standin"
__getattr__ = placeholder_module(__name__)
