"""A resume trusts only what it has checked: the checkpoint's record (position, history, config, dataset)
is covered by a digest and by its own arithmetic, the run's config is read from the checkpoint when
``config.json`` is gone, and a dataset that changed since is refused (real runs, real Orbax files).

The interrupted run: digits, 2 epochs of 11 steps, a checkpoint every 4 steps, stopped by SIGTERM
at tick 20 (step 17, in epoch 2): checkpoints 11 (the epoch end, the best), 16 and 17.
"""

import json
import shutil

import numpy as np
import pytest
from image_folders import write_folder
from PIL import Image
from test_bad_input import snapshot as snapshot_with_lock
from test_workdir import StopAt, lines

from attnjax.train import Config, Interrupted, checkpoint, train_and_evaluate
from attnjax.train.workdir import LOCK_FILE
from attnjax.validate import InputError

pytestmark = pytest.mark.slow

CONFIG = Config(epochs=2, checkpoint_every_steps=4)


def snapshot(workdir) -> dict:
    """The workdir's files but its lock, which a refused run took for a moment (and left empty again)."""
    files = snapshot_with_lock(workdir)
    assert files.pop(LOCK_FILE)[0] == 0
    return files


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the uninterrupted run's workdir, the interrupted run's workdir): copy the second before damaging it."""
    reference, interrupted = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("interrupted")
    train_and_evaluate(CONFIG, str(reference))
    with pytest.raises(Interrupted):
        train_and_evaluate(CONFIG, str(interrupted), preemption=StopAt(20))
    steps = sorted(int(p.name) for p in (interrupted / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [11, 16, 17]
    return reference, interrupted


@pytest.fixture
def workdir(runs, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(runs[1], copy)
    return copy


def record_path(workdir, step):
    return workdir / checkpoint.CHECKPOINTS_DIR / str(step) / "record" / "metadata"


def edit_record(workdir, step, change):
    path = record_path(workdir, step)
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def resumes_from(workdir, step, reference, capsys) -> str:
    """Resume ``workdir``: it must continue from ``step`` and end as the uninterrupted run."""
    train_and_evaluate(CONFIG, str(workdir))
    out, err = capsys.readouterr()
    assert f"resumed from {workdir / 'checkpoints' / str(step)} " in out
    assert lines(workdir) == lines(reference)
    assert (workdir / "variables.msgpack").read_bytes() == (reference / "variables.msgpack").read_bytes()
    return err


def flip_bit(value: int) -> int:
    return value ^ 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r.update(batch=flip_bit(r["batch"])),  # would silently skip a batch
        lambda r: r["history"][0].update(test_correct=flip_bit(r["history"][0]["test_correct"])),  # a false line
        lambda r: r["config"].update(learning_rate=0.0011),  # a config the run never had
        lambda r: r.update(best_test_accuracy=0.999),
    ],
    ids=["batch", "history", "config", "best"],
)
def test_a_changed_record_is_set_aside_for_the_previous_checkpoint(runs, workdir, capsys, damage):
    edit_record(workdir, 17, damage)
    err = resumes_from(workdir, 16, runs[0], capsys)
    assert "checkpoint step 17 was set aside" in err and "its record" in err and "does not match the digest" in err


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda r: r.update(batch=flip_bit(r["batch"])), "its record says step 17 but epoch 2, batch 7"),
        (lambda r: r["history"].pop(), "history has 0 epoch lines where epoch 2 needs 1"),
        (lambda r: r["epoch_metrics"]["loss"].pop(), "per-step metrics for 6 batches"),
    ],
    ids=["batch", "history", "metrics"],
)
def test_a_record_from_before_its_digest_is_checked_by_its_arithmetic(runs, workdir, capsys, damage, reason):
    edit_record(workdir, 17, lambda r: (r.pop("record_digest"), damage(r)))
    err = resumes_from(workdir, 16, runs[0], capsys)
    assert "checkpoint step 17 was set aside" in err and reason in err


def test_a_deleted_array_metadata_file_falls_back_instead_of_blaming_the_model(runs, workdir, capsys):
    (workdir / "checkpoints" / "17" / "state" / "_METADATA").unlink()
    err = resumes_from(workdir, 16, runs[0], capsys)
    assert "checkpoint step 17 was set aside" in err and "not of this model" not in err


def test_without_config_json_the_checkpoint_refuses_other_options_and_touches_nothing(workdir):
    (workdir / "config.json").unlink()
    before = snapshot(workdir)
    changed = Config(epochs=2, checkpoint_every_steps=4, learning_rate=2e-3)
    with pytest.raises(InputError, match="--learning-rate: the run has 0.001, this command 0.002"):
        train_and_evaluate(changed, str(workdir))
    assert snapshot(workdir) == before


def test_an_unreadable_config_json_is_noted_and_the_run_continues_from_its_checkpoint(runs, workdir, capsys):
    (workdir / "config.json").write_text('{"config": {"dataset": "dig')
    err = resumes_from(workdir, 17, runs[0], capsys)
    assert "config.json cannot be read" in err and "checked against the run's checkpoint" in err
    assert json.loads((workdir / "config.json").read_text())["config"] == json.loads(json.dumps(CONFIG.to_dict()))


def test_a_folder_dataset_that_changed_since_the_interruption_is_refused_with_the_difference(tmp_path):
    root = write_folder(tmp_path / "images", per_class=(40, 6))
    config = Config(dataset=f"folder:{root}", epochs=2, batch_size=32, checkpoint_every_steps=2)
    workdir = tmp_path / "run"
    with pytest.raises(Interrupted):
        train_and_evaluate(config, str(workdir), preemption=StopAt(3))
    pixels = np.full((10, 12, 3), 200, np.uint8)
    for i in range(20):  # more images of one class: more steps per epoch, another mean
        Image.fromarray(pixels).save(root / "train" / "fox" / f"new-{i}.png")
    before = snapshot(workdir)
    with pytest.raises(InputError) as refused:
        train_and_evaluate(config, str(workdir))
    message = str(refused.value)
    assert "has changed since the run" in message
    assert "train_examples: the run's 120, now 140" in message and "steps per epoch: the run's 3, now 4" in message
    assert "Restore the dataset as it was, or pass a new --workdir" in message
    assert snapshot(workdir) == before


def test_a_changed_xla_options_is_noted_as_a_change_of_trajectory(workdir, capsys):
    changed = Config(epochs=2, checkpoint_every_steps=4, xla_options="default")
    train_and_evaluate(changed, str(workdir))
    out = capsys.readouterr().out
    assert "written with --xla-options tuned, continuing with default: the trajectory changes from here" in out
