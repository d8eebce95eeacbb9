"""GatherExcite: outputs and gate against a PyTorch gather-excite written from the paper (GE-θ-, GE-θ, GE-θ+,
global and finite extents, timm's options), eval and train mode, gradients; outputs against timm's own module with
timm's width rule and options; and its properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import apply_jit, assert_gated, check_forward, check_gradients, check_running_stats, load, sown_maps
from timm_blocks import check_against_timm, create_attn, fix_gather_excite, load_timm
from torch import nn
from torch_reference import random_images, random_variables

from attnjax.blocks.ge import GatherExcite, average_gather, depthwise_conv, max_gather, nearest_resize
from attnjax.compare.pytorch import nchw_to_nhwc, nhwc_to_nchw
from attnjax.validate import InputError

pytestmark = pytest.mark.torch

PROPERTY_SHAPES = [(2, 7, 7, 13), (2, 1, 1, 3), (3, 5, 9, 37)]

# (options, shape): timm's default (SE-like), GE-θ- (finite extents, no MLP), pooling + MLP, GE-θ (global and
# finite), GE-θ+, and maps smaller than the extent
PARITY_CASES = [
    ({}, (2, 8, 8, 32)),
    ({}, (1, 1, 1, 3)),
    ({"extent": 2, "use_mlp": False}, (2, 7, 5, 20)),
    ({"extent": 4, "use_mlp": False}, (2, 9, 6, 12)),
    ({"extent": 2}, (3, 5, 9, 37)),
    ({"extent": 8, "use_mlp": False}, (2, 3, 5, 6)),
    ({"extent": 0, "extra_params": True, "use_mlp": False}, (2, 5, 7, 12)),
    ({"extent": 4, "extra_params": True, "use_mlp": False}, (2, 9, 7, 12)),
    ({"extent": 8, "extra_params": True}, (2, 10, 13, 16)),
    ({"extent": 4, "extra_params": True}, (2, 1, 1, 3)),
]
PARAMETRIC = [case for case in PARITY_CASES if case[0].get("extra_params")]


class TorchGE(nn.Module):
    """Hu et al. 2018, NCHW: y = x * sigmoid(interp(mlp(gather(x)))). Returns (y, s), s at the gate's shape.

    gather: global mean; or avg_pool2d(window 2e-1, stride e, padding e-1, count_include_pad=False);
    or depthwise convs (global: kernel = the map, no padding; e = 2^n: n times 3x3 stride 2 padding 1),
    each followed by BN, with ReLU between them. mlp: 1x1 conv C -> hidden, ReLU, 1x1 conv -> C.
    interp: nearest neighbour (F.interpolate's default) to (H, W) for a finite extent.
    """

    def __init__(self, channels, hidden, extent=0, extra_params=False, use_mlp=True, feat_size=None):
        super().__init__()
        self.extent, self.extra_params, self.use_mlp = extent, extra_params, use_mlp
        self.num_convs = (1 if extent == 0 else int(np.log2(extent))) if extra_params else 0
        for i in range(self.num_convs):
            kernel, stride, padding = (feat_size, 1, 0) if extent == 0 else (3, 2, 1)
            conv = nn.Conv2d(channels, channels, kernel, stride, padding, groups=channels, bias=False)
            setattr(self, f"gather_{i}", conv)
            setattr(self, f"gather_{i}_bn", nn.BatchNorm2d(channels))
        if use_mlp:
            self.reduce = nn.Conv2d(channels, hidden, 1)
            self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        if self.extra_params:
            g = x
            for i in range(self.num_convs):
                g = getattr(self, f"gather_{i}_bn")(getattr(self, f"gather_{i}")(g))
                if i < self.num_convs - 1:
                    g = F.relu(g)
        elif self.extent == 0:
            g = x.mean(dim=(2, 3), keepdim=True)
        else:
            e = self.extent
            g = F.avg_pool2d(x, 2 * e - 1, e, e - 1, count_include_pad=False)
        if self.use_mlp:
            g = self.expand(F.relu(self.reduce(g)))
        if self.extent != 0:
            g = F.interpolate(g, size=x.shape[-2:])
        s = torch.sigmoid(g)
        return x * s, s


def to_torch_state(variables):
    """Depthwise kernels (kh, kw, C) -> (C, 1, kh, kw); Dense (in, out) -> 1x1 conv (out, in, 1, 1); BN renamed."""
    state = {}
    params, stats = variables.get("params", {}), variables.get("batch_stats", {})
    for name, value in params.items():
        value = jax.tree.map(np.asarray, value)
        if name.endswith("_bn"):
            state.update({f"{name}.weight": value["scale"], f"{name}.bias": value["bias"]})
            state.update({f"{name}.running_mean": stats[name]["mean"], f"{name}.running_var": stats[name]["var"]})
            state[f"{name}.num_batches_tracked"] = np.array(0)
        elif name.startswith("gather_"):
            state[f"{name}.weight"] = value.transpose(2, 0, 1)[:, None]
        else:
            state.update({f"{name}.weight": value["kernel"].T[:, :, None, None], f"{name}.bias": value["bias"]})
    return {name: torch.from_numpy(np.array(value)) for name, value in state.items()}


def setup_ge(options, shape, seed=0):
    block = GatherExcite(**options)
    x = random_images(shape, seed)
    variables = random_variables(block, x, seed + 1)
    hidden = variables["params"]["reduce"]["kernel"].shape[1] if block.use_mlp else None
    reference = TorchGE(shape[-1], hidden, block.extent, block.extra_params, block.use_mlp, feat_size=shape[1:3])
    return block, x, variables, load(reference, variables, to_torch_state)


@pytest.mark.parametrize("options, shape", PARITY_CASES)
def test_eval_output_and_gate_match_pytorch(options, shape):
    check_forward(*setup_ge(options, shape), maps=["attention"])


@pytest.mark.parametrize("options, shape", PARAMETRIC)
def test_train_output_and_running_means_match_pytorch(options, shape):
    """In float64 (batch norm over a small batch amplifies float32 rounding; see tests/blocks/test_bam.py)."""
    block, x, variables, reference = setup_ge(options, shape, seed=5)
    _, state = check_forward(block, x, variables, reference, maps=["attention"], train=True, float64=True)
    check_running_stats(state, reference)


@pytest.mark.parametrize("options, shape", [PARITY_CASES[4], PARITY_CASES[8]])
def test_gradients_match_pytorch(options, shape):
    cotangent = random_images(shape, seed=9)
    check_gradients(*setup_ge(options, shape, seed=3), cotangent, to_state=to_torch_state, float64=True)


@pytest.mark.parametrize(
    "options, shape",
    [({}, shape) for shape in PROPERTY_SHAPES]
    + [({"extent": 2, "use_mlp": False}, PROPERTY_SHAPES[2])]
    + [({"extent": 8, "extra_params": True}, shape) for shape in PROPERTY_SHAPES[:2]],  # maps smaller than e
)
def test_shape_gate_and_sown_map(options, shape):
    x = random_images(shape)
    block = GatherExcite(**options)
    variables = jax.jit(block.init)(jax.random.key(1), x)
    chex.assert_tree_all_finite(variables)
    for train in (False, True):
        y, state = apply_jit(block, variables, x, train)
        maps = sown_maps(state)
        assert list(maps) == ["attention"]
        chex.assert_shape(maps["attention"], (shape[0], 1, 1, shape[-1]) if block.extent == 0 else shape)
        assert_gated(y, x, maps["attention"])


def test_default_is_squeeze_excitation_with_one_mlp():
    params = jax.eval_shape(GatherExcite().init, jax.random.key(0), jnp.zeros((2, 5, 5, 256)))
    assert set(params) == {"params"}
    assert jax.tree.map(lambda a: a.shape, params["params"]) == {
        "reduce": {"kernel": (256, 16), "bias": (16,)},
        "expand": {"kernel": (16, 256), "bias": (256,)},
    }


def test_parameter_free_ge_has_no_parameters():
    variables = GatherExcite(extent=4, use_mlp=False).init(jax.random.key(0), jnp.zeros((1, 9, 9, 4)))
    assert jax.tree_util.tree_leaves(variables) == []


@pytest.mark.parametrize("extent, shape", [(2, (2, 2, 1, 5)), (4, (2, 3, 4, 5)), (8, (2, 8, 5, 5)), (8, (1, 1, 1, 5))])
def test_maps_no_larger_than_the_extent_gather_the_global_mean(extent, shape):
    x = random_images(shape)
    local = GatherExcite(extent=extent, use_mlp=False).apply({}, x)
    np.testing.assert_allclose(local, GatherExcite(use_mlp=False).apply({}, x), rtol=1e-6, atol=1e-6)


def test_global_parametric_gather_is_tied_to_its_map_size():
    block = GatherExcite(extra_params=True)
    variables = jax.jit(block.init)(jax.random.key(0), jnp.zeros((1, 5, 7, 8)))
    assert variables["params"]["gather_0"].shape == (5, 7, 8)
    with pytest.raises(ValueError, match="built for 5x7x8 maps, got 6x7x8; use a finite extent"):
        jax.eval_shape(block.apply, variables, jnp.zeros((1, 6, 7, 8)))


@pytest.mark.parametrize("extent", [2, 4, 6])
@pytest.mark.parametrize("size", [1, 2, 5, 7, 12, 13])
def test_average_gather_is_the_clipped_window_mean(extent, size):
    x = random_images((2, size, size + 1, 3))
    g = np.asarray(average_gather(x, extent))
    for i in range(g.shape[1]):
        for j in range(g.shape[2]):
            rows = slice(max(0, i * extent - extent + 1), i * extent + extent)
            cols = slice(max(0, j * extent - extent + 1), j * extent + extent)
            np.testing.assert_allclose(g[:, i, j], x[:, rows, cols].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    assert g.shape[1:3] == (-(-size // extent), -(-(size + 1) // extent))


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 1), (2, 0)])
def test_depthwise_conv_matches_torch(stride, padding):
    x = random_images((2, 7, 6, 4))
    kernel = np.random.default_rng(0).normal(size=(3, 3, 4)).astype(np.float32)
    weight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(2, 0, 1)[:, None]))
    expected = nchw_to_nhwc(F.conv2d(nhwc_to_nchw(x), weight, stride=stride, padding=padding, groups=4))
    np.testing.assert_allclose(depthwise_conv(x, kernel, stride, padding), expected, rtol=1e-5, atol=1e-6)


def test_nearest_resize_matches_torch():
    """F.interpolate's 'nearest' for every gathered size the extents 2, 4, 8 give up to 40 x 40."""
    for size in range(1, 41):
        for extent in (2, 4, 8):
            small = -(-size // extent)
            t = random_images((1, small, small, 2), seed=size)
            expected = nchw_to_nhwc(F.interpolate(nhwc_to_nchw(t), size=(size, size)))
            np.testing.assert_array_equal(nearest_resize(t, size, size), expected)


# timm 1.0.29's GatherExcite (create_attn('ge')), built with its *dd call bug bypassed (timm_blocks.fix_gather_excite).


def timm_names(num_convs):
    names = {"reduce": "mlp.fc1", "expand": "mlp.fc2"}
    for i in range(num_convs):
        names.update({f"gather_{i}": f"gather.conv{i + 1}", f"gather_{i}_bn": f"gather.norm{i + 1}"})
    return names


TIMM_CASES = [
    ({}, (2, 5, 6, 64)),  # timm's defaults: width round(64 / 16) = 4 (attnjax's default: 8)
    ({"extent": 2, "add_maxpool": True, "rd_ratio": 1 / 8}, (2, 7, 5, 20)),
    ({"add_maxpool": True, "act_layer": "silu", "gate_layer": "hard_sigmoid", "rd_channels": 5}, (2, 4, 4, 32)),
    ({"extent": 4, "extra_params": True}, (2, 9, 7, 16)),
    ({"extent": 8, "extra_params": True, "use_mlp": False, "act_layer": "gelu"}, (2, 10, 13, 12)),
]


def setup_timm_ge(monkeypatch, options, shape, seed=0):
    """attnjax's GatherExcite with timm's width rule (``rd_divisor=1``, timm's) and ``options``, and timm's module
    with ``options``, sharing random parameters and running statistics."""
    fix_gather_excite(monkeypatch)
    timm_options = {"rd_divisor": 1, **options}
    block = GatherExcite(**timm_options)
    x = random_images(shape, seed)
    variables = random_variables(block, x, seed + 1)
    num_convs = len([name for name in variables["params"] if name.startswith("gather_") and name[-1].isdigit()])
    reference = create_attn("ge", shape[-1], **timm_options)
    return block, x, variables, load_timm(reference, to_torch_state(variables), timm_names(num_convs))


@pytest.mark.parametrize("options, shape", TIMM_CASES)
def test_timm_options_give_timms_parameters_and_output(monkeypatch, options, shape):
    check_against_timm(*setup_timm_ge(monkeypatch, options, shape))


@pytest.mark.parametrize("options, shape", [case for case in TIMM_CASES if case[0].get("extra_params")])
def test_timm_options_match_timm_in_train_mode(monkeypatch, options, shape):
    """Batch statistics and the running means after the step, in float64 (see the train-mode test above)."""
    block, x, variables, reference = setup_timm_ge(monkeypatch, options, shape, seed=5)
    _, state = check_against_timm(block, x, variables, reference, train=True, float64=True)
    check_running_stats(state, reference, module_name=lambda name: timm_names(3)[name])


def test_default_width_is_attnjax_rule_and_timms_is_an_option(monkeypatch):
    fix_gather_excite(monkeypatch)
    x = jnp.zeros((1, 2, 2, 64))
    for options, width in [({}, 8), ({"rd_divisor": 1}, 4), ({"rd_ratio": 1 / 8}, 8), ({"rd_channels": 3}, 3)]:
        params = jax.eval_shape(GatherExcite(**options).init, jax.random.key(0), x)["params"]
        assert params["reduce"]["kernel"].shape == (64, width), options
    assert create_attn("ge", 64).mlp.fc1.out_channels == 4


def test_add_maxpool_with_gather_parameters_is_refused_where_timm_ignores_it():
    with pytest.raises(InputError, match=r"^add_maxpool applies to the parameter-free gather only"):
        jax.eval_shape(
            GatherExcite(extent=2, extra_params=True, add_maxpool=True).init, jax.random.key(0), jnp.zeros((1, 4, 4, 8))
        )


@pytest.mark.parametrize("extent", [0, 2, 4])
def test_max_gather_is_the_window_max(extent):
    x = random_images((2, 7, 6, 3))
    expected = nchw_to_nhwc(
        F.adaptive_max_pool2d(nhwc_to_nchw(x), 1)
        if extent == 0
        else F.max_pool2d(nhwc_to_nchw(x), 2 * extent - 1, extent, extent - 1)
    )
    np.testing.assert_array_equal(max_gather(x, extent), expected)
