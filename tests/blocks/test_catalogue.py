"""Properties that every registered block must have, parametrised over ``blocks.names()``.

A newly registered block is covered by every test here; it must also be entered in
``SOFTMAX_MAPS`` or ``NO_SOFTMAX_MAPS`` (``test_every_block_is_classified`` fails until it is).
The errors every block gives (bad options, wrong rank) are tested in ``test_catalogue_errors.py``.

Speed: compiling dominates, so each (block, shape) is compiled once, init and both modes
together (``run``), with XLA:CPU's backend (LLVM) optimisations off; the properties tested
with it do not depend on code generation. ``test_jit_matches_eager`` compiles with the
default options, as users do.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import blocks

NAMES = blocks.names()

# Odd and tiny spatial shapes (7x7, 1x1, 5x9), each with a channel count that the blocks'
# reduction ratios (2, 8, 16, 32) and MHSA's default 4 heads do not divide.
SHAPES = [(2, 7, 7, 13), (2, 1, 1, 3), (3, 5, 9, 37)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]

# Sown maps that are softmaxes: block -> {sown name: axis (or axes) that sums to 1}.
SOFTMAX_MAPS = {
    "softmax": {"attention": (1, 2)},  # (N, H, W, C): per image and channel, over the positions
    "gc": {"attention": (1, 2)},  # (N, H, W, 1): per image, over the positions
    "nonlocal": {"attention": -1},  # (N, HW, HW): each query's row
    "mhsa": {"attention": -1},  # (N, heads, HW, HW): each head's query row
    "sk": {"attention": -1},  # (N, 1, 1, C, M): per channel, over the branches
    "gca": {"attention": (1, 2)},  # (N, H, W, 1): per image, over the positions
    "bottleneck": {"attention": -1},  # (N, heads, HW, HW): each head's query row
    "halo": {"attention": -1},  # (N, heads, H'/b, W'/b, b*b, (b+2h)^2): each query's row over its window
    "external": {"attention": -1},  # (N, H, W, S): per position, over the memory units (l1-normalised)
    "psa": {"channel_softmax": (1, 2), "spatial_softmax": -1},  # over the positions; over the channels
    "danet": {"position": -1, "channel": -1},  # (N, HW, HW) query rows; (N, C, C) channel rows
    "criss_cross": {"attention": -1},  # (N, H, W, H+W): per position, over its column then its row
    "axial": {"height": -1, "width": -1},  # (N, heads, H, W, H) and (N, heads, H, W, W)
    "splat": {"attention": -1},  # (N, 1, 1, C, R): per channel, over the radix
    "lambda": {"keys": (1, 2)},  # (N, H, W, k): per image and key channel, over the positions
    "bat": {"height": -1, "width": -1},  # (N, G, b, b): each output block's weights over the input blocks
}
# Blocks whose sown maps are sigmoid gates or pre-sigmoid logits, none normalised.
NO_SOFTMAX_MAPS = {
    "bam",
    "cbam",
    "ceca",
    "coord",
    "eca",
    "ecam",
    "ela",
    "ese",
    "ge",
    "lcbam",
    "scoord",
    "se",
    "seed",
    "shuffle",
    "simam",
    "strip",
    "triplet",
}

# Blocks whose last projection (or residual scale) is zero-initialised, so that y == x exactly at initialisation.
IDENTITY_AT_INIT = {"criss_cross", "danet", "gc", "mhsa", "nonlocal"}

FAST_COMPILE = {"xla_backend_optimization_level": 0}
MODES = {"eval": False, "train": True}


def create(name):
    """The block with its default options, except MHSA's heads: ``num_heads=None``, the largest divisor of C up to
    its ``max_heads`` (4, its default count), since its default 4 heads must divide C."""
    return blocks.create(name, num_heads=None) if name == "mhsa" else blocks.create(name)


def images(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def mutable_for(variables, train):
    """``intermediates``, plus ``batch_stats`` in train mode for a block that has them."""
    return ("intermediates", "batch_stats") if train and "batch_stats" in variables else ("intermediates",)


def apply_both_modes(block, variables, x):
    """``{"eval": (y, state), "train": (y, state)}``; ``state`` holds the mutable collections."""
    return {
        mode: block.apply(variables, x, train=train, mutable=mutable_for(variables, train))
        for mode, train in MODES.items()
    }


@functools.cache
def run(name, shape):
    """Init on ``images(shape)`` and apply in both modes, in one compiled call. Cached: several tests read it."""
    block = create(name)
    x = images(shape)

    def init_and_apply(key, x):
        variables = block.init(key, x)
        return variables, apply_both_modes(block, variables, x)

    # The rbg key compiles much faster than the default threefry; the blocks only need random parameters.
    variables, outputs = jax.jit(init_and_apply, compiler_options=FAST_COMPILE)(jax.random.key(1, impl="rbg"), x)
    return block, x, variables, outputs


def test_every_block_is_classified():
    assert not set(SOFTMAX_MAPS) & NO_SOFTMAX_MAPS
    assert set(SOFTMAX_MAPS) | NO_SOFTMAX_MAPS == set(NAMES)
    assert IDENTITY_AT_INIT <= set(NAMES)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_odd_shapes_and_channels_keep_the_shape_and_sow_finite_maps(name, shape):
    _, _, variables, outputs = run(name, shape)
    chex.assert_tree_all_finite(variables)
    for mode, (y, state) in outputs.items():
        chex.assert_shape(y, shape, custom_message=mode)
        chex.assert_type(y, jnp.float32)
        chex.assert_tree_all_finite(y)
        intermediates = state["intermediates"]
        assert jax.tree_util.tree_leaves(intermediates), f"{name} sowed nothing under 'intermediates' in {mode} mode"
        chex.assert_tree_all_finite(intermediates)
        if mode == "train" and "batch_stats" in variables:
            chex.assert_trees_all_equal_shapes(state["batch_stats"], variables["batch_stats"])
            chex.assert_tree_all_finite(state["batch_stats"])


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", sorted(SOFTMAX_MAPS))
def test_softmax_maps_sum_to_one_over_their_axis(name, shape):
    _, _, _, outputs = run(name, shape)
    for mode, (_, state) in outputs.items():
        for key, axis in SOFTMAX_MAPS[name].items():
            (weights,) = state["intermediates"][key]
            assert jnp.all(weights >= 0), mode
            total = jnp.sum(weights, axis=axis)
            np.testing.assert_allclose(total, np.ones(total.shape), rtol=1e-5, atol=1e-6, err_msg=f"{key}, {mode}")


@functools.cache
def run_bfloat16(name):
    """Apply ``name`` built with ``dtype=bfloat16`` to a bfloat16 input, collecting its sown maps (eval mode)."""
    block = (
        blocks.create(name, num_heads=None, dtype=jnp.bfloat16)
        if name == "mhsa"
        else blocks.create(name, dtype=jnp.bfloat16)
    )
    x = images((2, 8, 8, 32)).astype(jnp.bfloat16)

    def init_and_apply(key, x):
        variables = block.init(key, x)
        return block.apply(variables, x, mutable=["intermediates"])

    return jax.jit(init_and_apply, compiler_options=FAST_COMPILE)(jax.random.key(1, impl="rbg"), x)


@pytest.mark.parametrize("name", NAMES)
def test_in_bfloat16_every_sown_map_is_float32_and_softmaxes_sum_to_one_as_in_float32(name):
    """The precision rule (``blocks/primitives/precision.py``): softmaxes computed in float32, maps sown in float32.

    In bfloat16 a softmax's rows sum to 1 only within about 5e-3 (8 bits of mantissa), so the bound here fails
    for a block that computes its softmax, or sows its map, in the compute dtype.
    """
    _, state = run_bfloat16(name)
    maps = state["intermediates"]
    for path, value in jax.tree_util.tree_leaves_with_path(maps):
        assert value.dtype == jnp.float32, f"{name}: {jax.tree_util.keystr(path)} sown as {value.dtype}"
    for key, axis in SOFTMAX_MAPS.get(name, {}).items():
        (weights,) = maps[key]
        total = jnp.sum(weights, axis=axis)
        np.testing.assert_allclose(total, np.ones(total.shape), rtol=0, atol=2e-6, err_msg=key)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_simam_has_no_parameters(shape):
    _, _, variables, _ = run("simam", shape)
    assert jax.tree_util.tree_leaves(variables) == []


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", sorted(IDENTITY_AT_INIT))
def test_zero_initialised_blocks_are_exactly_the_identity_at_init(name, shape):
    _, x, _, outputs = run(name, shape)
    for mode, (y, _) in outputs.items():
        np.testing.assert_array_equal(y, x, err_msg=mode)


@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager(name):
    block, x, variables, outputs = run(name, SHAPES[0])
    eager = apply_both_modes(block, variables, x)
    jitted = jax.jit(functools.partial(apply_both_modes, block))(variables, x)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(outputs, eager, rtol=1e-5, atol=1e-5)  # the fast-compiled call too


@pytest.mark.parametrize("name", NAMES)
def test_eval_output_of_an_image_does_not_depend_on_the_rest_of_the_batch(name):
    block, x, variables, outputs = run(name, SHAPES[2])  # batch 3
    # The running averages after one train step, so that batch norm's eval statistics are not the trivial 0 and 1.
    variables = {**variables, **{k: v for k, v in outputs["train"][1].items() if k == "batch_stats"}}
    others = images((x.shape[0] - 1, *x.shape[1:]), seed=4) * 10

    def batched_and_alone(variables, x, others):
        def forward(x):
            return block.apply(variables, x, train=False)

        alone = jnp.concatenate([forward(x[i : i + 1]) for i in range(x.shape[0])])
        with_others = forward(jnp.concatenate([x[:1], others]))[:1]  # image 0 beside different images
        return forward(x), alone, with_others

    batched, alone, with_others = jax.jit(batched_and_alone, compiler_options=FAST_COMPILE)(variables, x, others)
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched[:1], with_others, rtol=1e-5, atol=1e-5)
