"""The timm reference imports on the CPU with the torchvision stand-in, and the stand-in runs no code."""

from __future__ import annotations

import pytest
from timm_reference import TIMM_VERSION, import_timm


def test_real_timm_builds_a_model_and_torchvision_is_the_standin():
    timm = import_timm()
    import torch
    import torchvision

    assert timm.__version__ == TIMM_VERSION
    model = timm.create_model("resnet18", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(RuntimeError, match="placeholder of the test-only torchvision stand-in"):
        torchvision.ops.misc.FrozenBatchNorm2d(8)
