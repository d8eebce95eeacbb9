"""pmap over 8 fake CPU devices gives the single-device result; bad batch splits are clear errors.

The 3-step comparison runs in float64: the cross-device mean sums gradients in another
order than one device does, and Adam's early updates (about ``lr * sign(g)``) turn that
float32 rounding into differences of up to ``lr`` for weights whose gradient is near
Adam's eps. In float64 the rounding is gone and the comparison tests the parallel math.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import models
from attnjax.train import create_train_state, eval_step, parallel, train_step

GLOBAL_BATCH = 64
STEPS = 3


def batches(image_shape, steps=STEPS, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.uniform(0, 1, (GLOBAL_BATCH, *image_shape)).astype(dtype),
            "label": rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32),
        }
        for _ in range(steps)
    ]


def train_on(devices, state, data, kind="pmap"):
    p_step = parallel.wrap_step(train_step, devices, kind, donate_state=True)
    state = parallel.replicate(state, devices)
    losses = []
    for batch in data:
        state, metrics = p_step(state, parallel.put_batch(batch, devices, kind))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.parametrize("kind", parallel.KINDS)
@pytest.mark.parametrize("image_shape, block", [((8, 8, 3), "seed"), ((16, 16, 1), "softmax"), ((8, 8, 3), "bam")])
def test_8_devices_match_one_device(devices, image_shape, block, kind):
    with jax.enable_x64(True):
        net = models.create("attention_net", num_classes=10, block=block, dtype=jnp.float64)
        state = create_train_state(jax.random.key(0), net, image_shape, learning_rate=1e-3)
        state = state.replace(params=jax.tree.map(lambda p: p.astype(jnp.float64), state.params))
        state = state.replace(opt_state=state.tx.init(state.params))
        data = batches(image_shape, dtype=np.float64)

        one, one_losses = train_on(devices[:1], state, data, kind)
        eight, eight_losses = train_on(devices, state, data, kind)
        plain = state
        for batch in data:  # the step with no parallel wrapper at all
            plain, _ = jax.jit(train_step)(plain, batch)
        assert jax.tree.leaves(eight.params)[0].dtype == jnp.float64

    np.testing.assert_allclose(eight_losses, one_losses, rtol=1e-5)
    assert int(eight.step) == int(one.step) == STEPS
    for got, want, base in zip(
        jax.tree.leaves(eight.params), jax.tree.leaves(one.params), jax.tree.leaves(plain.params), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(want, base, rtol=1e-5, atol=1e-5)
    # The test is only meaningful if training moved the parameters.
    moved = max(
        float(np.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(state.params), strict=True)
    )
    assert moved > 1e-3


def test_pmapped_eval_sums_over_all_devices(devices):
    net = models.create("attention_net", num_classes=10, block="seed")
    state = create_train_state(jax.random.key(0), net, (8, 8, 3), learning_rate=1e-3)
    batch = batches((8, 8, 3), steps=1)[0]
    batch["mask"] = (np.arange(GLOBAL_BATCH) < 50).astype(np.float32)  # 14 padded examples
    single = jax.jit(eval_step)(state, batch)
    sums = parallel.pmap_step(eval_step, devices)(parallel.replicate(state, devices), parallel.shard(batch, 8))
    assert float(single["count"]) == 50
    for key in ("loss", "correct", "count"):
        np.testing.assert_allclose(sums[key], single[key], rtol=1e-5)


@pytest.mark.parametrize("batch_size", [12, 100, 7])
def test_batch_that_does_not_split_over_devices_names_sizes_that_work(batch_size):
    batch = {"image": np.zeros((batch_size, 8, 8, 1), np.float32)}
    with pytest.raises(
        ValueError, match=rf"batch size {batch_size} does not split over 8 devices: use a multiple of 8"
    ):
        parallel.shard(batch, 8)


def test_shard_splits_the_leading_axis_in_order():
    batch = {"label": np.arange(16)}
    np.testing.assert_array_equal(parallel.shard(batch, 4)["label"], np.arange(16).reshape(4, 4))


@pytest.mark.parametrize("num_devices", [1, 8])
def test_donating_the_replicated_state_leaves_the_callers_state_intact(devices, num_devices):
    net = models.create("attention_net", num_classes=10)
    state = create_train_state(jax.random.key(0), net, (8, 8, 1), learning_rate=1e-3)
    before = jax.device_get(state.params)
    step = parallel.pmap_step(train_step, devices[:num_devices], donate_state=True)
    batch = {"image": np.zeros((8, 8, 8, 1), np.float32), "label": np.zeros(8, np.int32)}
    step(parallel.replicate(state, devices[:num_devices]), parallel.shard(batch, num_devices))
    for leaf, original in zip(jax.tree.leaves(state.params), jax.tree.leaves(before), strict=True):
        assert not leaf.is_deleted()
        np.testing.assert_array_equal(leaf, original)
