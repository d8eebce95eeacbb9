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


SHARED_DATA_VARIABLE = "ATTNJAX_SHARED_DATA"


@pytest.fixture(scope="session")
def shared_data():
    """The real MNIST and Fashion-MNIST files: ../shared/data beside the repository (or $ATTNJAX_SHARED_DATA)."""
    from pathlib import Path

    path = Path(os.environ.get(SHARED_DATA_VARIABLE, Path(__file__).resolve().parents[2] / "shared" / "data"))
    assert (path / "fashion-mnist").is_dir() and (path / "mnist").is_dir(), (
        f"the original MNIST and Fashion-MNIST files are expected in {path}/{{mnist,fashion-mnist}}; "
        f"set {SHARED_DATA_VARIABLE} to their folder"
    )
    return path


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory, shared_data):
    """A TFDS data_dir where the real mnist and fashion_mnist builders were prepared offline."""
    from attnjax import data

    data_dir = tmp_path_factory.mktemp("tfds")
    previous = os.environ.get("ATTNJAX_OFFLINE")
    os.environ["ATTNJAX_OFFLINE"] = "1"  # proves that preparing from the original files needs no network
    try:
        for name, folder in (("fashion_mnist", "fashion-mnist"), ("mnist", "mnist")):
            data.load(name, data_dir=str(data_dir), manual_dir=str(shared_data / folder))
    finally:
        if previous is None:
            del os.environ["ATTNJAX_OFFLINE"]
        else:
            os.environ["ATTNJAX_OFFLINE"] = previous
    return data_dir
