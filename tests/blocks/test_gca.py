"""GlobalContextGate (gca): outputs, maps and gradients against a PyTorch GC block with scaling fusion written
from the paper, output against timm's module (timm's 'gc', with timm's options), and its properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import (
    assert_gated,
    check_forward,
    check_gradients,
    load,
    random_maps,
    setup,
    torch_state_with_map_norm,
)
from timm_blocks import check_against_timm, create_attn, load_timm
from torch import nn
from torch_reference import random_images, random_variables, torch_state_with_stats

from attnjax.blocks.gc import GlobalContext
from attnjax.blocks.gca import GlobalContextGate
from attnjax.compare.pytorch import nchw_to_nhwc, nhwc_to_nchw

pytestmark = pytest.mark.torch
PROPERTY_SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 3, 4, 20)]
PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (1, 1, 1, 12), (2, 3, 10, 160), (2, 9, 4, 13)]


class TorchGCA(nn.Module):
    """Cao et al. 2019 with scaling fusion, NCHW: a = softmax_{HW}(W_k x), c = sum_j a_j x_j,
    g = sigmoid(W_v2 relu(LN(W_v1 c))), y = x * g.

    LayerNorm over (C/r, 1, 1) with PyTorch's epsilon. Returns (y, a, g).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, min(channels, 8))
        self.context = nn.Conv2d(channels, 1, 1, bias=False)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.norm = nn.LayerNorm([hidden, 1, 1])
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        a = torch.softmax(self.context(x).reshape(n, 1, h * w), dim=-1)
        context = (x.reshape(n, c, h * w) * a).sum(dim=-1).reshape(n, c, 1, 1)
        g = torch.sigmoid(self.expand(F.relu(self.norm(self.reduce(context)))))
        return x * g, a.reshape(n, 1, h, w), g


def setup_gca(shape, seed=0):
    block = GlobalContextGate()
    return block, *setup(block, TorchGCA(shape[-1]), shape, seed, to_state=torch_state_with_map_norm)


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_and_maps_match_pytorch(shape):
    check_forward(*setup_gca(shape), maps=["attention", "channel"])


@pytest.mark.parametrize("shape", PARITY_SHAPES[1:3])
def test_gradients_match_pytorch(shape):
    check_gradients(*setup_gca(shape, seed=3), random_images(shape, seed=9), to_state=torch_state_with_map_norm)


@pytest.mark.parametrize("ratio", [100, 2000])
def test_layer_norm_is_accurate_in_float32_when_its_input_mean_dwarfs_its_spread(ratio):
    """Float32 against the reference in float64, with the reduce conv's bias set so that the LayerNorm input's
    mean is ``ratio`` times its spread: the error stays at float32's inevitable eps * ratio (see test_gc.py)."""
    shape = (3, 5, 7, 48)
    block, x, variables, _ = setup_gca(shape, seed=4)
    params = jax.tree.map(np.array, variables["params"])
    reference = load(TorchGCA(shape[-1]), {"params": params}, torch_state_with_map_norm).double()
    # The LayerNorm input without bias, from the float64 reference's own pooling.
    xt = nhwc_to_nchw(x).double()
    n, c, h, w = xt.shape
    with torch.no_grad():
        a = torch.softmax(reference.context(xt).reshape(n, 1, h * w), dim=-1)
        pooled = (xt.reshape(n, c, h * w) * a).sum(dim=-1)
        spread = (pooled @ reference.reduce.weight[:, :, 0, 0].T).std(dim=-1, unbiased=False).mean().item()
    params["reduce"]["bias"] = np.full_like(params["reduce"]["bias"], ratio * spread)
    reference = load(TorchGCA(shape[-1]), {"params": params}, torch_state_with_map_norm).double()

    y = jax.jit(block.apply)({"params": params}, x)
    with torch.no_grad():
        expected = nchw_to_nhwc(reference(xt)[0])
    tol = 2e-6 * ratio
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_softmax_map_and_gate(shape):
    x, y, maps = random_maps(GlobalContextGate(), shape)
    assert sorted(maps) == ["attention", "channel"]
    weights, gate = maps["attention"], maps["channel"]
    n, h, w, c = shape
    chex.assert_shape(weights, (n, h, w, 1))
    chex.assert_shape(gate, (n, 1, 1, c))
    chex.assert_tree_all_finite(weights)
    assert jnp.all(weights > 0)
    np.testing.assert_allclose(weights.sum(axis=(1, 2, 3)), np.ones(n), rtol=1e-5)
    assert_gated(y, x, gate)


def test_init_follows_timm_and_zero_init_last_halves_the_input():
    x = random_images((2, 3, 5, 20))
    block = GlobalContextGate()
    variables = jax.jit(block.init)(jax.random.key(0), x)
    params = variables["params"]
    assert sorted(params) == ["context", "expand", "norm", "reduce"]  # gc's names
    chex.assert_shape(params["reduce"]["kernel"], (1, 1, 20, 8))
    chex.assert_shape(params["expand"]["kernel"], (1, 1, 8, 20))
    assert jnp.all(params["expand"]["kernel"] != 0)
    y = jax.jit(block.apply)(variables, x)
    chex.assert_tree_all_finite((variables, y))
    assert not np.allclose(y, x)  # not the identity at initialisation
    zero = GlobalContextGate(zero_init_last=True)
    zero_variables = jax.jit(zero.init)(jax.random.key(0), x)
    assert not jnp.any(zero_variables["params"]["expand"]["kernel"])
    np.testing.assert_array_equal(jax.jit(zero.apply)(zero_variables, x), x * 0.5)  # sigmoid(0) = 1/2


def test_same_parameters_as_gc():
    x = random_images((2, 3, 5, 20))
    gca = jax.eval_shape(GlobalContextGate().init, jax.random.key(0), x)
    gc = jax.eval_shape(GlobalContext().init, jax.random.key(0), x)
    chex.assert_trees_all_equal_shapes_and_dtypes(gca, gc)


# timm 1.0.29's GlobalContext: timm's create_attn('gc') (its defaults, sigmoid-gated fusion) is attnjax's gca.

TIMM_NAMES = {"context": "conv_attn", "reduce": "mlp_scale.fc1", "norm": "mlp_scale.norm", "expand": "mlp_scale.fc2"}


@pytest.mark.parametrize(
    "shape, options",
    [
        ((2, 4, 5, 256), {"rd_ratio": 1 / 8}),  # timm's defaults: C/8 = 32 (attnjax's default: 16)
        ((2, 3, 4, 64), {"rd_divisor": 1}),
        ((2, 3, 5, 40), {"rd_ratio": 1 / 16, "rd_divisor": 2, "act_layer": "silu", "gate_layer": "hard_sigmoid"}),
    ],
)
def test_timm_options_give_timms_parameters_and_output(shape, options):
    """timm's 'gc' with the same options, its conv_attn bias random too."""
    block = GlobalContextGate(**options, norm_eps=1e-6)
    reference = create_attn("gc", shape[-1], **options)
    x = random_images(shape)
    variables = random_variables(block, x, 1)
    reference = load_timm(
        reference, torch_state_with_stats(variables), TIMM_NAMES, {"conv_attn.bias": torch.tensor([-0.4])}
    )
    check_against_timm(block, x, variables, reference)


def test_default_width_is_c_over_16_and_timms_c_over_8_an_option():
    x = jnp.zeros((1, 2, 2, 256))
    for options, width in [({}, 16), ({"rd_ratio": 1 / 8}, 32)]:
        params = jax.eval_shape(GlobalContextGate(**options).init, jax.random.key(0), x)["params"]
        chex.assert_shape(params["reduce"]["kernel"], (1, 1, 256, width))
    assert create_attn("gc", 256).mlp_scale.fc1.out_channels == 32
