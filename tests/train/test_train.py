"""The train step learns, evaluation counts every example once, and bad runs fail clearly."""

import json
import os

import jax
import numpy as np
import pytest

from attnjax import data, models
from attnjax.train import (
    METRICS_FILE,
    Config,
    TrainingDiverged,
    create_train_state,
    eval_step,
    evaluate,
    parallel,
    train_and_evaluate,
    train_step,
)


def digits_batch(n=64):
    """The first ``n`` digits training examples, normalised as the pipeline does."""
    ds = data.load("digits")
    batch = ds.train.get_batch(np.arange(n))
    return {"image": data.augment.normalize(batch["image"], ds.mean, ds.std), "label": batch["label"]}


def test_train_step_reduces_the_loss_on_a_fixed_batch():
    batch = digits_batch()
    state = create_train_state(
        jax.random.key(0), models.create("attention_net", num_classes=10, block="seed"), (8, 8, 1), 1e-3
    )
    step = jax.jit(train_step)
    state, first = step(state, batch)
    for _ in range(20):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.2 * float(first["loss"])
    assert float(metrics["accuracy"]) > float(first["accuracy"])
    assert int(state.step) == 21


@pytest.mark.parametrize("num_devices", [1, 8])
def test_evaluate_counts_every_test_example_once(devices, num_devices):
    ds = data.load("digits")
    state = create_train_state(jax.random.key(0), models.create("attention_net", num_classes=10), (8, 8, 1), 1e-3)
    used = devices[:num_devices]
    p_eval = parallel.pmap_step(eval_step, used)
    result = evaluate(p_eval, parallel.replicate(state, used), ds, 64, used)
    assert result["count"] == len(ds.test) == 360  # 360 is not a multiple of 64: the last batch is padded
    test = ds.test.get_batch(np.arange(360))
    logits = state.apply_fn(state.variables(), data.augment.normalize(test["image"], ds.mean, ds.std))
    expected_correct = int(np.sum(np.argmax(logits, -1) == test["label"]))
    assert result["correct"] == expected_correct
    assert result["accuracy"] == pytest.approx(expected_correct / 360)


def test_digits_split_is_fixed_and_disjoint():
    a, b = data.load("digits"), data.load("digits")
    assert a.image_shape == (8, 8, 1) and a.num_classes == 10
    assert len(a.train) == 1437 and len(a.test) == 360
    a_train, a_test = a.train.get_batch(np.arange(1437))["image"], a.test.get_batch(np.arange(360))["image"]
    np.testing.assert_array_equal(a_test, b.test.get_batch(np.arange(360))["image"])
    assert 0.0 <= a_train.min() and a_train.max() <= 1.0
    train_rows = {row.tobytes() for row in a_train}
    overlap = sum(row.tobytes() in train_rows for row in a_test)
    assert overlap <= 2  # load_digits holds a couple of duplicate images; the split itself is disjoint


def test_diverging_loss_stops_with_a_clear_error_and_keeps_earlier_epochs(tmp_path):
    config = Config(epochs=3, learning_rate=1e9)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+ .*Lower --learning-rate"):
        train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert (tmp_path / "config.json").exists()


def test_batch_size_that_does_not_split_over_devices_fails_before_training(devices, tmp_path):
    with pytest.raises(
        ValueError, match=r"batch size 100 does not split over 8 devices: use a multiple of 8 \(for example 96 or 104\)"
    ):
        train_and_evaluate(Config(batch_size=100), str(tmp_path), devices=devices)
    assert not os.listdir(tmp_path)


def test_batch_larger_than_the_training_set_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"larger than the 1437 training examples"):
        train_and_evaluate(Config(batch_size=2048), str(tmp_path), devices=jax.devices()[:1])


def test_existing_results_are_never_overwritten(tmp_path):
    metrics = tmp_path / METRICS_FILE
    metrics.write_text(json.dumps({"epoch": 1, "test_accuracy": 0.99}) + "\n")
    before = metrics.read_text()
    with pytest.raises(ValueError, match=r"already exists from an earlier run.*new --workdir"):
        train_and_evaluate(Config(epochs=1), str(tmp_path), devices=jax.devices()[:1])
    assert metrics.read_text() == before


@pytest.mark.parametrize("block", ["bam", "sk", "triplet", "coord"])
def test_blocks_with_batch_norm_train_and_update_their_statistics(devices, block):
    net = models.create("attention_net", num_classes=10, block=block)
    state = create_train_state(jax.random.key(0), net, (8, 8, 1), 1e-3)
    assert jax.tree.leaves(state.batch_stats), "the block's batch norm should hold running statistics"
    batch = digits_batch()
    p_step = parallel.pmap_step(train_step, devices, donate_state=False)
    new, metrics = p_step(parallel.replicate(state, devices), parallel.shard(batch, len(devices)))
    assert np.isfinite(float(metrics["loss"]))
    moved = [
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(state.batch_stats), strict=True)
    ]
    assert any(moved)
    # Synchronised batch norm: 8 devices leave the statistics that one device leaves on the global batch.
    single, _ = jax.jit(train_step)(state, batch)
    for got, want in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(single.batch_stats), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
