"""Scale options: pmap and jit end like one device, gradient accumulation, mixed precision."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import models
from attnjax.train import Config, create_model, create_train_state, parallel, precision, train_and_evaluate, train_step
from attnjax.validate import InputError

pytestmark = pytest.mark.slow


def final(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][-1]


def test_pmap_and_jit_on_4_devices_end_like_one_device(devices, tmp_path):
    """The CLI's result (test accuracy and loss) does not depend on the parallel wrapper, beyond rounding:
    a mean over 4 devices' partial means rounds differently from one mean, and two epochs of Adam grow that
    (jaxlib 0.10.2: test loss 0.140204 on 4 devices, 0.140229 on one, 1.8e-4 apart). The equality of
    several steps, to 1e-5, is tests/train/test_parallel.py's, in float64."""
    config = Config(epochs=2)
    runs = {}
    for name, kind, used in (("one", "pmap", devices[:1]), ("pmap", "pmap", devices[:4]), ("jit", "jit", devices[:4])):
        train_and_evaluate(dataclasses.replace(config, parallel=kind), str(tmp_path / name), devices=used)
        runs[name] = final(tmp_path / name)
    for name in ("pmap", "jit"):
        assert runs[name]["test_correct"] == runs["one"]["test_correct"]
        assert runs[name]["test_loss"] == pytest.approx(runs["one"]["test_loss"], rel=1e-3)
        assert runs[name]["train_loss"] == pytest.approx(runs["one"]["train_loss"], rel=1e-3)
    assert json.loads((tmp_path / "jit" / "config.json").read_text())["devices"] == 4


def f64_state(block="seed", image_shape=(8, 8, 3)):
    net = models.create("attention_net", num_classes=10, block=block, dtype=jnp.float64)
    state = create_train_state(jax.random.key(0), net, image_shape, learning_rate=1e-3)
    state = state.replace(params=jax.tree.map(lambda p: p.astype(jnp.float64), state.params))
    return state.replace(opt_state=state.tx.init(state.params))


def random_batch(n, image_shape=(8, 8, 3), seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.uniform(0, 1, (n, *image_shape)), "label": rng.integers(0, 10, n).astype(np.int32)}


@pytest.mark.parametrize("kind, num_devices", [(None, 1), ("pmap", 8), ("jit", 8)])
def test_gradient_accumulation_equals_the_larger_batch(devices, kind, num_devices):
    """4 microbatches of 16 per update make the same 3 updates as batches of 64 (float64, see test_parallel)."""
    with jax.enable_x64(True):
        state = f64_state()
        data = [random_batch(64, seed=s) for s in range(3)]

        def run(microbatches):
            step = lambda s, b, axis_name=None: train_step(s, b, axis_name, microbatches=microbatches)
            used = devices[:num_devices]
            if kind is None:
                wrapped, put, current = jax.jit(step), (lambda b: b), state
            else:
                wrapped = parallel.wrap_step(step, used, kind)
                put, current = (lambda b: parallel.put_batch(b, used, kind)), parallel.replicate(state, used)
            for batch in data:
                current, metrics = wrapped(current, put(batch))
            return current, float(metrics["loss"])

        big, big_loss = run(1)
        accumulated, accumulated_loss = run(4)
    assert accumulated_loss == pytest.approx(big_loss, rel=1e-6)
    for got, want in zip(jax.tree.leaves(accumulated.params), jax.tree.leaves(big.params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert got.dtype == jnp.float64
    leaves = zip(jax.tree.leaves(big.params), jax.tree.leaves(state.params), strict=True)
    moved = max(float(np.abs(a - b).max()) for a, b in leaves)
    assert moved > 1e-3


def test_grad_accum_from_the_cli_trains_on_the_larger_batch(tmp_path):
    """--batch-size 32 --grad-accum 2 sees the same batches and makes the same updates as --batch-size 64."""
    base = Config(epochs=1, batch_size=64)
    train_and_evaluate(base, str(tmp_path / "big"), devices=jax.local_devices()[:1])
    train_and_evaluate(
        dataclasses.replace(base, batch_size=32, grad_accum=2), str(tmp_path / "acc"), devices=jax.local_devices()[:1]
    )
    big, acc = final(tmp_path / "big"), final(tmp_path / "acc")
    assert acc["test_correct"] == big["test_correct"]
    assert acc["train_loss"] == pytest.approx(big["train_loss"], rel=1e-4)
    with pytest.raises(InputError, match="--grad-accum 0 is invalid: use a whole number of at least 1"):
        train_and_evaluate(dataclasses.replace(base, grad_accum=0), str(tmp_path / "bad"))


def test_bfloat16_training_ends_within_a_point_of_float32(tmp_path):
    """bf16 compute, fp32 parameters and Adam state, on the embedded digits (12 epochs, the default run)."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        state, history = train_and_evaluate(Config(dtype=dtype), str(tmp_path / dtype), devices=jax.local_devices()[:1])
        floats = [x for x in jax.tree.leaves((state.params, state.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.float32 for x in floats)  # parameters and Adam moments stay float32
        results[dtype] = history[-1]["test_accuracy"]
    assert results["float32"] > 0.97
    assert abs(results["bfloat16"] - results["float32"]) <= 0.01


@pytest.mark.parametrize("model", ["attention_net", "cifar_resnet18"])
def test_bfloat16_computes_in_bfloat16(model):
    net = create_model(Config(model=model, block="cbam", dtype="bfloat16"), num_classes=10)
    state = create_train_state(jax.random.key(0), net, (8, 8, 1), 1e-3)
    batch = random_batch(8, (8, 8, 1))
    jaxpr = str(jax.make_jaxpr(lambda s, b: train_step(s, b, dtype=jnp.bfloat16))(state, batch))
    assert "conv_general_dilated" in jaxpr
    for line in jaxpr.splitlines():
        if "conv_general_dilated" in line:
            assert "bf16" in line.split("=")[0], line  # every convolution's output is bfloat16


def test_float16_with_loss_scaling_trains_and_skips_overflowing_steps():
    net = create_model(Config(block="seed", dtype="float16"), num_classes=10)
    state = create_train_state(jax.random.key(0), net, (8, 8, 1), 1e-3, loss_scaling=True)
    batch = random_batch(32, (8, 8, 1))
    step = jax.jit(lambda s, b: train_step(s, b, dtype=jnp.float16))
    first_loss = None
    for _ in range(10):
        state, metrics = step(state, batch)
        first_loss = first_loss or float(metrics["loss"])
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) < first_loss
    assert int(state.step) == 10 and float(state.loss_scale.scale) == 2.0**15

    # A scale so large that the float16 gradients overflow: the update is skipped and the scale halves.
    huge = state.replace(loss_scale=state.loss_scale.replace(scale=jnp.asarray(2.0**40, jnp.float32)))
    after, metrics = step(huge, batch)
    assert int(after.step) == int(huge.step)
    for got, want in zip(jax.tree.leaves(after.params), jax.tree.leaves(huge.params), strict=True):
        np.testing.assert_array_equal(got, want)
    assert float(after.loss_scale.scale) == 2.0**39


def test_dynamic_loss_scale_grows_after_a_period_of_finite_steps():
    scale = precision.DynamicLossScale.create(initial=8.0, period=3)
    for _ in range(2):
        scale = scale.adjust(jnp.asarray(True))
    assert float(scale.scale) == 8.0 and int(scale.finite_steps) == 2
    scale = scale.adjust(jnp.asarray(True))
    assert float(scale.scale) == 16.0 and int(scale.finite_steps) == 0
    scale = scale.adjust(jnp.asarray(False))
    assert float(scale.scale) == 8.0 and int(scale.finite_steps) == 0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dtype": "float8"}, "unknown dtype 'float8'; valid: float32, bfloat16, float16"),
        ({"parallel": "vmap"}, "unknown parallel wrapper 'vmap'; valid: pmap, jit"),
    ],
)
def test_unknown_scale_options_list_the_valid_ones(tmp_path, options, message):
    with pytest.raises(InputError, match=message):
        train_and_evaluate(Config(**options), str(tmp_path / "run"))


@pytest.mark.parametrize(
    "bad, expected",
    [(None, True), (np.nan, False), (np.inf, False), (-np.inf, False), ("inf-and-minus-inf", False)],
)
def test_all_finite_finds_one_bad_element_among_millions(bad, expected):
    tree = {"big": np.full((2048, 1024), 0.5, np.float32), "small": np.ones(3, np.float32)}
    if bad == "inf-and-minus-inf":  # the two would cancel in a naive sum of magnitudes: they make NaN
        tree["big"][7, 9], tree["small"][1] = np.inf, -np.inf
    elif bad is not None:
        tree["big"][1234, 567] = bad
    assert bool(jax.jit(precision.all_finite)(tree)) is expected
