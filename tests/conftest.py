"""Test session set-up: 8 fake CPU devices, so that multi-device code runs here as on a TPU host.

The flag must be set before JAX starts its backend, hence at conftest import time.
Single-device tests run on the first device as usual.
"""

import os

NUM_FAKE_DEVICES = 8
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NUM_FAKE_DEVICES}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
    found = jax.devices()
    assert len(found) == NUM_FAKE_DEVICES, f"expected {NUM_FAKE_DEVICES} fake CPU devices, got {found}"
    return found
