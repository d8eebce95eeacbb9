"""Checkpoints that can be trusted: retention, failed saves, damaged and foreign checkpoints (real Orbax, files)."""

import os
import resource
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import models
from attnjax.train import CheckpointError, Checkpoints, checkpoint, create_train_state
from attnjax.validate import InputError


def state_of(block="seed", num_classes=10, seed=0):
    net = models.create("attention_net", num_classes=num_classes, block=block)
    return create_train_state(jax.random.key(seed), net, (8, 8, 1), 1e-3)


def at_step(state, step):
    """A distinct state per step: the step counter and the parameters shifted by it."""
    return state.replace(step=jnp.asarray(step, jnp.int32), params=jax.tree.map(lambda p: p + step, state.params))


def committed(workdir) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, checkpoint.CHECKPOINTS_DIR)) if n.isdigit())


def largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=os.path.getsize)


def test_retention_keeps_the_latest_two_and_the_best(tmp_path):
    state = state_of()
    saver = Checkpoints(str(tmp_path), asynchronous=True)
    accuracies = {1: 0.5, 2: None, 3: 0.9, 4: None, 5: 0.7, 6: None, 7: None}
    for step, accuracy in accuracies.items():
        saver.save(step, at_step(state, step), {"n": step}, test_accuracy=accuracy)
    saver.close()
    assert committed(tmp_path) == [3, 6, 7]  # step 3 is the best (0.9), 6 and 7 the latest
    with Checkpoints(str(tmp_path)) as reader:
        restored, record = reader.restore(state)
    assert record["n"] == 7 and int(restored.step) == 7


def test_a_failed_save_raises_and_the_previous_checkpoint_stays_usable(tmp_path):
    """The file-size limit makes the real write fail (EFBIG): running as root, permissions would not."""
    state = state_of()
    saver = Checkpoints(str(tmp_path), asynchronous=True)
    saver.save(1, at_step(state, 1), {"n": 1}, wait=True)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(
            CheckpointError, match=r"saving checkpoint step 2 .* failed .*File too large.*step 1, is intact"
        ):
            saver.save(2, at_step(state, 2), {"n": 2})
            saver.wait()  # an asynchronous failure surfaces here, never silently
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    with Checkpoints(str(tmp_path)) as reader:
        restored, record = reader.restore(state)
    assert record["n"] == 1
    np.testing.assert_array_equal(restored.params["fc2"]["bias"], np.asarray(state.params["fc2"]["bias"]) + 1)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_checkpoint_is_set_aside_for_the_previous_one(tmp_path, damage):
    state = state_of()
    saver = Checkpoints(str(tmp_path))
    for step in (1, 2):
        saver.save(step, at_step(state, step), {"n": step}, wait=True)
    saver.close()
    target = largest_file(tmp_path / checkpoint.CHECKPOINTS_DIR / "2" / "state")
    data = target.read_bytes()
    if damage == "flip":
        middle = len(data) // 2
        target.write_bytes(data[:middle] + bytes(b ^ 0x5A for b in data[middle : middle + 16]) + data[middle + 16 :])
    elif damage == "truncate":
        target.write_bytes(data[: len(data) // 3])
    else:
        target.unlink()
    with Checkpoints(str(tmp_path)) as reader:
        restored, record = reader.restore(state)
    assert record["n"] == 1 and int(restored.step) == 1
    assert len(reader.set_aside) == 1 and reader.set_aside[0].startswith("checkpoint step 2 was set aside")
    assert committed(tmp_path) == [1]
    assert (tmp_path / checkpoint.SET_ASIDE_DIR / "2" / "state").is_dir()  # kept for inspection, not deleted


def test_when_every_checkpoint_is_damaged_the_run_stops_naming_them(tmp_path):
    state = state_of()
    saver = Checkpoints(str(tmp_path))
    saver.save(1, state, {"n": 1}, wait=True)
    saver.close()
    target = largest_file(tmp_path / checkpoint.CHECKPOINTS_DIR / "1" / "state")
    target.write_bytes(target.read_bytes()[:100])
    with Checkpoints(str(tmp_path)) as reader, pytest.raises(CheckpointError, match=r"no intact checkpoint .*/1: its"):
        reader.restore(state)
    assert committed(tmp_path) == [1]  # left where it was, for the user to restore


def test_a_step_folder_without_the_commit_marker_is_ignored(tmp_path):
    state = state_of()
    saver = Checkpoints(str(tmp_path))
    saver.save(1, state, {"n": 1}, wait=True)
    saver.close()
    folder = tmp_path / checkpoint.CHECKPOINTS_DIR
    shutil.copytree(folder / "1", folder / "5")
    (folder / "5" / checkpoint.COMMIT_MARKER).unlink()
    with Checkpoints(str(tmp_path)) as reader:
        assert reader.steps() == [1]
        assert reader.restore(state)[1]["n"] == 1
    assert "checkpoint step 5 was set aside" in reader.set_aside[0] and "commit_success.txt" in reader.set_aside[0]


@pytest.mark.parametrize(
    "other, message",
    [
        (
            lambda: state_of(block="cbam"),
            r"\['params'\]\['block'\]\['\w+'\]\['\w+'\] (has shape|is missing from|is in the checkpoint)",
        ),
        (lambda: state_of(num_classes=7), r"\['fc2'\]\['bias'\] has shape \(10,\) in the checkpoint, \(7,\) in this"),
        (
            lambda: state_of().replace(params=jax.tree.map(lambda p: p.astype(jnp.bfloat16), state_of().params)),
            r"has dtype float32 in the checkpoint, bfloat16 in this model",
        ),
    ],
    ids=["another-block", "another-shape", "another-dtype"],
)
def test_a_checkpoint_of_another_model_is_refused_naming_the_first_difference(tmp_path, other, message):
    saver = Checkpoints(str(tmp_path))
    saver.save(1, state_of(), {"n": 1}, wait=True)
    saver.close()
    with Checkpoints(str(tmp_path)) as reader, pytest.raises(InputError, match=message):
        reader.restore(other())


def test_a_non_finite_state_is_never_saved(tmp_path):
    state = state_of()
    broken = state.replace(params={**state.params, "fc2": {**state.params["fc2"], "bias": jnp.full(10, jnp.nan)}})
    saver = Checkpoints(str(tmp_path))
    with pytest.raises(
        CheckpointError, match=r"refusing to save step 3: \['params'\]\['fc2'\]\['bias'\] is not finite"
    ):
        saver.save(3, broken, {"n": 3})
    saver.close()
    assert committed(tmp_path) == []
