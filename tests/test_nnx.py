"""attnjax.nnx: every registered block as an NNX module equals the linen block and trains in an NNX model."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import attnjax.nnx
from attnjax import blocks
from attnjax.validate import InputError

SHAPE = (2, 8, 8, 16)  # N, H, W, C
TOL = 1e-6


def random_variables(variables, seed=0):
    """Variables of the same structure, drawn with NumPy: every value non-trivial (zero-initialised ones too)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            value = 0.3 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, variables)


def images(shape=SHAPE, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def assert_trees_close(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("name", blocks.names())
def test_nnx_block_equals_the_linen_block_with_the_same_variables(name):
    block = attnjax.nnx.Block(name, channels=SHAPE[-1], rngs=nnx.Rngs(0), init_size=SHAPE[1:3])
    linen = block.linen_module
    variables = random_variables(block.variables())
    block.load_variables(variables)
    assert_trees_close(block.variables(), variables)
    x = images()

    y = block(x)  # eval: running averages, nothing updated
    want, state = linen.apply(variables, x, mutable=["intermediates"])
    np.testing.assert_allclose(y, want, rtol=TOL, atol=TOL)
    assert block.intermediates(), "every block sows its attention map(s)"
    assert_trees_close(block.intermediates(), state["intermediates"])
    assert_trees_close(block.variables(), variables)

    y = block(x, train=True)  # train: batch statistics, running averages updated in the module
    want, state = linen.apply(variables, x, train=True, mutable=["intermediates", "batch_stats"])
    np.testing.assert_allclose(y, want, rtol=TOL, atol=TOL)
    assert_trees_close(block.intermediates(), state["intermediates"])  # the last call's maps only
    assert ("batch_stats" in state) == ("batch_stats" in variables)
    assert_trees_close(block.variables(), {**variables, **{k: v for k, v in state.items() if k == "batch_stats"}})


class Net(nnx.Module):
    """A tiny classifier: conv -> attnjax block -> global mean -> linear."""

    def __init__(self, name, *, rngs):
        self.conv = nnx.Conv(3, SHAPE[-1], (3, 3), rngs=rngs)
        self.attention = attnjax.nnx.create(name, SHAPE[-1], rngs=rngs, init_size=SHAPE[1:3])
        self.head = nnx.Linear(SHAPE[-1], 10, rngs=rngs)

    def __call__(self, x, train=False):
        x = nnx.relu(self.conv(x))
        x = self.attention(x, train=train)
        return self.head(x.mean(axis=(1, 2)))


@nnx.jit
def train_step(model, optimizer, x, labels):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x, train=True), labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads


@pytest.mark.parametrize("name", blocks.names())
def test_nnx_block_trains_one_optimizer_step_in_an_nnx_model(name):
    model = Net(name, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    before = jax.tree.map(np.array, model.attention.variables())

    loss, grads = train_step(model, optimizer, images((*SHAPE[:3], 3)), jnp.array([1, 7]))

    assert np.isfinite(loss)
    after = model.attention.variables()
    grads = nnx.to_pure_dict(grads).get("attention", {}).get("linen", {})
    params = [jax.tree.leaves(v.get("params", {})) for v in (before, after)]
    moved = [bool(np.any(a != b)) for a, b in zip(*params, strict=True)]
    assert moved == [bool(np.any(g)) for g in jax.tree.leaves(grads)], "the parameters with a gradient moved"
    assert any(moved) or not before, "the block's parameters changed"
    if "batch_stats" in before:  # updated in the module, by nnx.jit and nnx.value_and_grad
        stats = [jax.tree.leaves(v["batch_stats"]) for v in (before, after)]
        assert all(np.any(a != b) for a, b in zip(*stats, strict=True))
    assert model.attention.intermediates(), "the step's maps stay reachable after nnx.jit"
    assert nnx.pop(model, nnx.Intermediate), "and NNX's own nnx.pop takes them out"
    assert model.attention.intermediates() == {}


def test_create_checks_options_and_sets_the_block_fields():
    block = attnjax.nnx.create("se", 16, rngs=nnx.Rngs(0), reduction=4, dtype=jnp.bfloat16, keep_intermediates=False)
    assert block.linen_module.reduction == 4 and block.linen_module.dtype == jnp.bfloat16
    assert block(images()).shape == SHAPE
    assert block.intermediates() == {}
    with pytest.raises(InputError, match="no option"):
        attnjax.nnx.create("se", 16, rngs=nnx.Rngs(0), reductio=4)


def test_a_linen_block_instance_and_its_variables():
    block = attnjax.nnx.Block(blocks.SimAMAttention(), 16, rngs=nnx.Rngs(0))
    assert block.variables() == {}
    assert sorted(block(images()).shape) == sorted(SHAPE)
    se = attnjax.nnx.Block("se", 16, rngs=nnx.Rngs(0))
    with pytest.raises(InputError, match="do not fit"):
        se.load_variables(attnjax.nnx.Block("se", 32, rngs=nnx.Rngs(0)).variables())


def test_the_nnx_wrapper_does_not_import_the_trainer():
    code = "import sys, attnjax.nnx; print(sorted(m for m in sys.modules if m.startswith('attnjax.train')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
