"""The optimizers train, weight decay spares biases and norm scales, warm-up ramps, clipping bounds the update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from attnjax import models
from attnjax.train import TRAJECTORY_FIELDS, Config, create_train_state, optim, train_and_evaluate, warmup_steps


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "adam"},
        {"optimizer": "adamw", "weight_decay": 0.05, "warmup_epochs": 0.5, "clip_grad_norm": 1.0},
        {"optimizer": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": True},
        {"optimizer": "lamb", "learning_rate": 1e-2, "weight_decay": 0.01},
    ],
    ids=lambda options: options["optimizer"],
)
def test_each_optimizer_trains_digits(tmp_path, options):
    config = Config(epochs=3, checkpoint_every_minutes=0, **options)
    _, history = train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert history[-1]["test_accuracy"] > 0.95


def flat(params) -> dict:
    return {"/".join(path): np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(params).items()}


@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb"])
def test_weight_decay_shrinks_kernels_and_leaves_biases_and_norm_scales_alone(name):
    net = models.create("attention_net", num_classes=10, block="bam")  # batch norm inside the block
    tx = optim.optimizer(name, 0.1, weight_decay=0.5, momentum=0.0)
    state = create_train_state(jax.random.key(0), net, (8, 8, 1), 0.1, tx=tx)
    # Zero gradients: whatever moves, weight decay moved.
    new = state.apply_gradients(grads=jax.tree.map(jnp.zeros_like, state.params))
    before, after = flat(state.params), flat(new.params)
    assert any(path.endswith("_bn/scale") for path in before) and any(path.endswith("/bias") for path in before)
    for path, old in before.items():
        if path.endswith(("/bias", "/scale")):
            np.testing.assert_array_equal(after[path], old, err_msg=path)
        else:
            assert old.ndim >= 2 and np.linalg.norm(after[path]) < np.linalg.norm(old), path
            if name in ("adamw", "sgd"):  # one step of decay: p <- p (1 - lr * wd)
                np.testing.assert_allclose(after[path], old * (1 - 0.1 * 0.5), rtol=1e-5, err_msg=path)


def test_decay_mask_selects_exactly_the_kernels():
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.ones(4)}, "bn": {"scale": jnp.ones(4)}}
    params["dense"] = {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}
    params["gain"] = jnp.ones(())
    mask = optim.decay_mask(params)
    assert mask == {
        "conv": {"kernel": True, "bias": False},
        "bn": {"scale": False},
        "dense": {"kernel": True, "bias": False},
        "gain": False,
    }


@pytest.mark.parametrize("name", ["cosine", "constant"])
def test_warmup_ramps_from_zero_to_the_peak_then_follows_the_schedule(name):
    peak, total, warmup = 1e-3, 100, 10
    lr = optim.schedule(name, peak, total, warmup)
    at = lambda step: optim.learning_rate_at(lr, step)  # noqa: E731
    assert at(0) == 0.0
    assert at(5) == pytest.approx(peak / 2)
    assert at(warmup) == pytest.approx(peak)
    if name == "constant":
        assert at(60) == pytest.approx(peak) and at(total) == pytest.approx(peak)
    else:  # the cosine runs over the steps after the warm-up: half-way at 55, 0 at the end
        assert at(55) == pytest.approx(peak / 2) and at(total) == pytest.approx(0.0, abs=1e-12)
        assert all(at(s) >= at(s + 1) for s in range(warmup, total))


def test_without_warmup_the_schedules_are_the_ones_from_before():
    assert optim.schedule("constant", 1e-3, 100) == 1e-3  # the plain float: optax.adam(1e-3) as before
    before = optax.cosine_decay_schedule(init_value=1e-3, decay_steps=100)
    after = optim.schedule("cosine", 1e-3, 100)
    assert [float(after(s)) for s in range(0, 101, 7)] == [float(before(s)) for s in range(0, 101, 7)]


def test_adam_without_clipping_is_plain_optax_adam():
    """Old checkpoints hold optax.adam's state: the default optimizer must have the same structure."""
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    ours, theirs = optim.optimizer("adam", 1e-3).init(params), optax.adam(1e-3).init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)


def test_warmup_epochs_become_whole_steps():
    assert warmup_steps(Config(), 11) == 0
    assert warmup_steps(Config(warmup_epochs=1.0), 11) == 11
    assert warmup_steps(Config(warmup_epochs=0.5), 11) == 6  # rounded
    assert warmup_steps(Config(warmup_epochs=0.001), 11) == 1  # asked for: at least one step


def test_clipping_bounds_a_huge_update_to_the_global_norm():
    params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}
    tx = optim.optimizer("sgd", 1.0, momentum=0.0, clip_grad_norm=1.0)
    huge = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
    updates, _ = tx.update(huge, tx.init(params), params)
    norm = np.sqrt(sum(np.sum(np.square(u)) for u in jax.tree.leaves(updates)))
    assert norm == pytest.approx(1.0, rel=1e-5)
    small = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)  # below the bound: untouched
    updates, _ = tx.update(small, tx.init(params), params)
    for got, grad in zip(jax.tree.leaves(updates), jax.tree.leaves(small), strict=True):
        np.testing.assert_allclose(got, -grad, rtol=1e-6)


def test_a_run_saved_before_the_optimizer_options_continues():
    """An old config.json lacks the new fields: each counts as its default, which is what that run used."""
    old = {k: v for k, v in Config().to_dict().items() if k not in ("optimizer", "weight_decay", "warmup_epochs")}
    assert Config().trajectory_diff(old) == []
    assert Config(optimizer="adamw", weight_decay=0.05).trajectory_diff(old) == [
        "--optimizer: the run has 'adam', this command 'adamw'",
        "--weight-decay: the run has 0.0, this command 0.05",
    ]
    new_fields = ("optimizer", "weight_decay", "momentum", "nesterov", "warmup_epochs", "clip_grad_norm")
    assert set(new_fields) <= set(TRAJECTORY_FIELDS)


def test_an_unknown_optimizer_is_refused_with_the_valid_names(capsys):
    from attnjax.train import cli, exits

    with pytest.raises(SystemExit) as info:
        cli.main(["--optimizer", "rmsprop"])
    err = capsys.readouterr().err
    assert info.value.code == exits.EXIT_BAD_INPUT and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "--optimizer: invalid choice: 'rmsprop'" in last and all(name in last for name in optim.OPTIMIZERS)
