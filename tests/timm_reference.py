"""timm, the reference for the networks it ships: its real model code, imported on the CPU.

``import timm`` imports torchvision, whose wheel for torch 2.13.0 fails to import beside the CPU
build of torch. timm's models never run torchvision code, so :func:`import_timm` puts the
placeholder package in ``tests/timm_standin`` first on ``sys.path`` (for this test session only)
and then imports the real, installed timm. See tests/timm_standin/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

STANDIN = Path(__file__).resolve().parent / "timm_standin"
TIMM_VERSION = "1.0.29"


def import_timm():
    """The installed timm (``TIMM_VERSION``), imported with the test-only torchvision stand-in."""
    if "timm" not in sys.modules:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # a failed import of the real torchvision may have left pieces
        if str(STANDIN) not in sys.path:
            sys.path.insert(0, str(STANDIN))
    import timm

    assert Path(sys.modules["torchvision"].__file__).is_relative_to(STANDIN), "the real torchvision was imported"
    assert timm.__version__ == TIMM_VERSION, f"the tests compare with timm {TIMM_VERSION}, found {timm.__version__}"
    return timm
