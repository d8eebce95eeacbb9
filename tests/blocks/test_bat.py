"""BilinearAttentionalTransform (bat): output, maps, gradients and batch statistics against timm 1.0.29's own
BatNonLocalAttn (create_attn('bat'), with its defaults and other options), maps of other sizes against timm's
layers on the zero-padded maps, the channel dropout, and its properties.

Dropout: timm's default drop_rate is 0.2 (attnjax's 0, see attnjax/blocks/bat.py). Eval mode never drops, so the
eval comparisons use timm's default module as it is. The train-mode comparisons (batch statistics) build timm's
module with ``drop_rate=0.0``, attnjax's default: dropout off in both, so the outputs are comparable. That the
dropout is applied in train mode only, and drops whole channels scaled by 1 / (1 - p) as timm's Dropout2d does,
is tested separately (``test_dropout_*``).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import check_gradients, check_running_stats, random_maps
from timm_blocks import check_against_timm, create_attn, load_timm, timm_state
from torch_reference import random_images, random_variables, torch_state_with_stats

from attnjax import blocks
from attnjax.blocks.bat import (
    TIMM_DROP_RATE,
    BilinearAttentionalTransform,
    bilinear_transform,
    block_length,
    block_max_pool,
)
from attnjax.compare.pytorch import nchw_to_nhwc, nhwc_to_nchw
from attnjax.validate import InputError

pytestmark = pytest.mark.torch
TIMM_NAMES = {
    "reduce": "conv1.conv",
    "reduce_bn": "conv1.bn",
    "to_groups": "ba.conv1.conv",
    "to_groups_bn": "ba.conv1.bn",
    "row_conv": "ba.conv_p",
    "column_conv": "ba.conv_q",
    "mix": "ba.conv2.conv",
    "mix_bn": "ba.conv2.bn",
    "expand": "conv2.conv",
    "expand_bn": "conv2.bn",
}
SHAPES = [(2, 7, 7, 64), (2, 14, 21, 40), (1, 7, 14, 13), (3, 21, 7, 96)]  # H, W multiples of 7, as timm asserts
# (attnjax's options, timm's, shape): the same module, named alike except the activation (a name against a class).
OPTIONS = [
    (
        {"block_size": 4, "groups": 4, "rd_ratio": 0.5, "act_layer": "silu"},
        {"block_size": 4, "groups": 4, "rd_ratio": 0.5, "act_layer": torch.nn.SiLU},
        (2, 8, 12, 32),
    ),
    ({"rd_channels": 6, "groups": 3, "block_size": 3}, {"rd_channels": 6, "groups": 3, "block_size": 3}, (2, 9, 6, 20)),
    ({"rd_divisor": 4, "block_size": 2, "groups": 1}, {"rd_divisor": 4, "block_size": 2, "groups": 1}, (3, 4, 6, 24)),
]


def setup_timm(shape, options=None, timm_options=None, seed=0):
    block = BilinearAttentionalTransform(**(options or {}))
    x = random_images(shape, seed)
    variables = random_variables(block, x, seed + 1)
    reference = create_attn("bat", shape[-1], **(timm_options or {}))
    return block, x, variables, load_timm(reference, torch_state_with_stats(variables), TIMM_NAMES)


def timm_maps(reference, x):
    """timm's P and Q (N, G, b, b), from the outputs of its conv_p and conv_q (caught by hooks), normalised as
    its BilinearAttnTransform normalises them."""
    caught = {}
    hooks = [
        getattr(reference.ba, name).register_forward_hook(lambda m, i, o, name=name: caught.__setitem__(name, o))
        for name in ("conv_p", "conv_q")
    ]
    with torch.no_grad():
        reference(nhwc_to_nchw(x))
    for hook in hooks:
        hook.remove()
    n, groups, b = x.shape[0], reference.ba.groups, reference.ba.block_size
    p = caught["conv_p"].view(n, groups, b, b).sigmoid()
    q = caught["conv_q"].view(n, groups, b, b).sigmoid()
    return (p / p.sum(dim=3, keepdim=True)).numpy(), (q / q.sum(dim=2, keepdim=True)).numpy()


@pytest.mark.parametrize("shape", SHAPES)
def test_defaults_are_timms_module_in_eval_mode(shape):
    block, x, variables, reference = setup_timm(shape)
    assert reference.dropout.p == TIMM_DROP_RATE  # timm's default module, its dropout off in eval mode
    check_against_timm(block, x, variables, reference)


@pytest.mark.parametrize("options, timm_options, shape", OPTIONS)
def test_options_are_timms_options(options, timm_options, shape):
    check_against_timm(*setup_timm(shape, options, timm_options, seed=2))


def test_sown_maps_are_timms_with_width_transposed():
    block, x, variables, reference = setup_timm((2, 14, 7, 40), seed=4)
    _, state = check_against_timm(block, x, variables, reference)
    p, q = timm_maps(reference, x)
    (height,), (width,) = state["intermediates"]["height"], state["intermediates"]["width"]
    np.testing.assert_allclose(height, p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(width, q.swapaxes(-1, -2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(height.sum(-1), 1, rtol=1e-5)
    np.testing.assert_allclose(width.sum(-1), 1, rtol=1e-5)


@pytest.mark.parametrize("options, timm_options, shape", [({}, {}, (2, 14, 7, 40)), (*OPTIONS[0][:2], (3, 8, 4, 32))])
def test_train_mode_matches_timm_without_dropout_and_updates_the_same_running_statistics(options, timm_options, shape):
    """Dropout off in both (timm's drop_rate=0.0, attnjax's default); batch statistics in float64."""
    block, x, variables, reference = setup_timm(shape, options, {**timm_options, "drop_rate": 0.0}, seed=5)
    _, state = check_against_timm(block, x, variables, reference, train=True, float64=True)
    n, h, w, _ = shape
    # every BN sees the N*H*W positions of the map (none of the padding)
    check_running_stats(
        state, reference, old=variables["batch_stats"], counts=lambda name: n * h * w, module_name=TIMM_NAMES.get
    )


def test_gradients_match_timm():
    shape = (2, 7, 14, 24)
    block, x, variables, reference = setup_timm(shape, seed=3)
    check_gradients(
        block,
        x,
        variables,
        reference,
        random_images(shape, seed=9),
        to_state=lambda v: timm_state(torch_state_with_stats(v), TIMM_NAMES, reference),
    )


def timm_on_padded_maps(reference, x):
    """timm's layers with its transform on the zero-padded maps: x + conv2(ba(pad(conv1(x))) cropped), NCHW in and
    out, eval mode. ba's first layer must map the padding's zeros to zeros (see the test), so that its pooling
    and transform see zero padding, as attnjax's block does."""
    with torch.no_grad():
        u = reference.conv1(x)
        h, w = u.shape[2:]
        b = reference.ba.block_size
        padded = F.pad(u, (0, b * block_length(w, b) - w, 0, b * block_length(h, b) - h))
        assert torch.all(reference.ba.conv1(torch.zeros_like(padded)) == 0)
        return x + reference.conv2(reference.ba(padded)[:, :, :h, :w])


@pytest.mark.parametrize("shape, block_size", [((2, 9, 12, 40), 7), ((2, 1, 1, 16), 7), ((3, 5, 8, 24), 3)])
def test_other_sizes_are_timms_transform_on_maps_padded_to_the_block_grid(shape, block_size):
    block = BilinearAttentionalTransform(block_size=block_size)
    x = random_images(shape, 7)
    variables = jax.tree.map(np.array, random_variables(block, x, 8))
    # ba.conv1's BN maps 0 to a negative value, so the ReLU keeps the padding at 0 in timm's module too
    variables["params"]["to_groups_bn"]["bias"] = -np.abs(variables["params"]["to_groups_bn"]["bias"]) - 0.5
    variables["batch_stats"]["to_groups_bn"]["mean"] = np.abs(variables["batch_stats"]["to_groups_bn"]["mean"])
    reference = load_timm(
        create_attn("bat", shape[-1], block_size=block_size), torch_state_with_stats(variables), TIMM_NAMES
    )
    y = jax.jit(block.apply)(variables, x)
    np.testing.assert_allclose(y, nchw_to_nhwc(timm_on_padded_maps(reference, nhwc_to_nchw(x))), rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):  # timm itself refuses these sizes
        reference(nhwc_to_nchw(x))


def dropout_outputs(shape, rate, seed=0):
    """``(x, variables, {(mode, dropping): output})`` of the block with ``drop_rate`` 0 and ``rate``, one set of
    variables, in eval and train mode (a ``dropout`` stream given to both)."""
    x = random_images(shape, seed)
    variables = random_variables(BilinearAttentionalTransform(), x, seed + 1)
    outputs = {}
    for dropping in (False, True):
        block = BilinearAttentionalTransform(drop_rate=rate if dropping else 0.0)
        for mode, train in (("eval", False), ("train", True)):
            outputs[mode, dropping], _ = block.apply(
                variables, x, train=train, mutable=["batch_stats"], rngs={"dropout": jax.random.key(seed + 2)}
            )
    return x, variables, outputs


def channel_dropout_mask(v, v_plain, rate):
    """``v = mask * v_plain / (1 - rate)`` with a 0/1 mask per image and channel (constant over the positions),
    asserted: the mask of the channels that are not zero anyway (after the ReLU), flattened."""
    kept = np.all(np.isclose(v, v_plain / (1 - rate), rtol=1e-5, atol=1e-6), axis=(1, 2))
    dropped = np.all(v == 0, axis=(1, 2))
    assert np.all(kept | dropped), "each channel of each image is kept (scaled) or dropped whole"
    return kept[np.any(v_plain != 0, axis=(1, 2))]


def test_dropout_drops_whole_channels_in_train_mode_only_as_timms_dropout2d():
    shape, rate = (4, 7, 7, 64), 0.5
    x, variables, outputs = dropout_outputs(shape, rate)
    np.testing.assert_array_equal(outputs["eval", True], outputs["eval", False])
    plain, dropped = (np.asarray(outputs["train", dropping] - x) for dropping in (False, True))
    kept = channel_dropout_mask(dropped, plain, rate)
    assert 0.3 < kept.mean() < 0.7, kept.mean()  # about 1 - rate of the 4 x 64 channels

    # timm's Dropout2d, in its own module: the same structure (its own random mask), the same output without it
    state = torch_state_with_stats(variables)
    timm_plain = load_timm(create_attn("bat", shape[-1], drop_rate=0.0), state, TIMM_NAMES).train()
    timm_dropping = load_timm(create_attn("bat", shape[-1], drop_rate=rate), state, TIMM_NAMES).train()
    with torch.no_grad():
        t = nhwc_to_nchw(x)
        v_plain, v_drop = (nchw_to_nhwc(m(t) - t) for m in (timm_plain, timm_dropping))
    np.testing.assert_allclose(v_plain, plain, rtol=1e-4, atol=1e-4)
    assert 0.3 < channel_dropout_mask(v_drop, v_plain, rate).mean() < 0.7


def test_dropout_in_train_mode_needs_a_random_stream():
    x = random_images((2, 7, 7, 16))
    block = blocks.create("bat", drop_rate=TIMM_DROP_RATE)
    variables = block.init(jax.random.key(0), x)
    with pytest.raises(InputError, match=r"drop_rate=0.2 drops channels in train mode, which needs a random stream"):
        block.apply(variables, x, train=True, mutable=["batch_stats"])
    block.apply(variables, x)  # eval mode: no stream needed
    blocks.create("bat").apply(variables, x, train=True, mutable=["batch_stats"])  # nor with attnjax's default


@pytest.mark.parametrize("channels", [3, 13, 32, 40, 64, 100, 256, 1000])
@pytest.mark.parametrize("options", [{}, {"rd_ratio": 1 / 8, "rd_divisor": 16}, {"rd_channels": 10}])
def test_width_is_timms(channels, options):
    params = jax.eval_shape(
        BilinearAttentionalTransform(**options).init, jax.random.key(0), jnp.zeros((1, 7, 7, channels))
    )["params"]
    width = params["reduce"]["kernel"].shape[-1]
    assert width == create_attn("bat", channels, **options).conv1.conv.out_channels, (channels, options)


def test_groups_must_divide_the_reduced_width():
    message = r"^BilinearAttentionalTransform: groups=3 does not divide the 16 reduced channels"
    with pytest.raises(InputError, match=message):
        jax.eval_shape(BilinearAttentionalTransform(groups=3).init, jax.random.key(0), jnp.zeros((1, 7, 7, 64)))


@pytest.mark.parametrize("shape", [(2, 7, 7, 64), (2, 9, 5, 24), (3, 1, 1, 8), (2, 15, 3, 40)])
def test_shapes_and_maps(shape):
    _, y, maps = random_maps(blocks.create("bat"), shape)
    chex.assert_shape(y, shape)
    assert sorted(maps) == ["height", "width"]
    for name in ("height", "width"):
        chex.assert_shape(maps[name], (shape[0], 2, 7, 7))
        assert jnp.all(maps[name] > 0)
        np.testing.assert_allclose(maps[name].sum(-1), 1, rtol=1e-5, err_msg=name)


def test_transform_is_the_kronecker_product_form():
    """v = (P kron I_t) u (Q kron I_s) per channel, P and Q of the channel's group: timm's resize_mat and matmuls."""
    rng = np.random.default_rng(0)
    n, b, t, s, groups, per_group = 2, 3, 2, 4, 2, 3
    u = rng.normal(size=(n, b * t, b * s, groups * per_group)).astype(np.float32)
    p, q = rng.uniform(size=(2, n, groups, b, b)).astype(np.float32)
    expected = np.empty_like(u)
    for i in range(n):
        for c in range(groups * per_group):
            g = c // per_group
            expected[i, :, :, c] = np.kron(p[i, g], np.eye(t)) @ u[i, :, :, c] @ np.kron(q[i, g], np.eye(s))
    np.testing.assert_allclose(bilinear_transform(u, p, q), expected, rtol=1e-5, atol=1e-5)


def test_block_max_pool_is_adaptive_max_pooling_and_pools_blocks_outside_the_map_to_zero():
    o = random_images((2, 14, 21, 3))
    rows, cols = block_max_pool(o, 7)
    t = torch.from_numpy(o.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(rows, F.adaptive_max_pool2d(t, (7, 1))[..., 0].numpy().transpose(0, 2, 1))
    np.testing.assert_array_equal(cols, F.adaptive_max_pool2d(t, (1, 7))[:, :, 0].numpy().transpose(0, 2, 1))
    o = -np.abs(random_images((1, 9, 2, 1)))  # negative: the blocks past the edge (0) stand out
    rows, cols = block_max_pool(o, 7)  # rows in blocks of 2: blocks 0-3 full, 4 one row, 5-6 outside
    np.testing.assert_array_equal(rows[0, :, 0], [*(o[0, 2 * i : 2 * i + 2].max() for i in range(5)), 0, 0])
    np.testing.assert_array_equal(cols[0, :, 0], [o[0, :, 0].max(), o[0, :, 1].max(), 0, 0, 0, 0, 0])
