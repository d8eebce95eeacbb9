"""GlobalContext: output and softmax map against a PyTorch GC block written from the paper and against timm's module
(timm's 'gca', with timm's options), and its properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import check_forward, load, random_maps, setup, torch_state_with_map_norm
from timm_blocks import check_against_timm, create_attn, load_timm
from torch import nn
from torch_reference import random_images, random_variables, torch_state_with_stats

from attnjax import blocks
from attnjax.blocks.gc import GlobalContext
from attnjax.compare.pytorch import nchw_to_nhwc, nhwc_to_nchw
from attnjax.validate import InputError

pytestmark = pytest.mark.torch
PROPERTY_SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 3, 4, 20)]
PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (1, 1, 1, 12), (2, 3, 10, 160)]


class TorchGC(nn.Module):
    """Cao et al. 2019, NCHW: a = softmax_{HW}(W_k x), c = sum_j a_j x_j, y = x + W_v2 relu(LN(W_v1 c)).

    LayerNorm over (C/r, 1, 1) as in the official code. Returns (y, a).
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
        a = torch.softmax(self.context(x).reshape(n, h * w, 1), dim=1)
        context = torch.bmm(x.reshape(n, c, h * w), a).reshape(n, c, 1, 1)
        t = self.expand(F.relu(self.norm(self.reduce(context))))
        return x + t, a.reshape(n, 1, h, w)


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_output_and_map_match_pytorch(shape):
    block = GlobalContext()
    x, variables, reference = setup(block, TorchGC(shape[-1]), shape, to_state=torch_state_with_map_norm)
    check_forward(block, x, variables, reference, maps=["attention"])


def with_large_layer_norm_mean(params, x, ratio):
    """``params`` with the reduce conv's bias set so that the LayerNorm input's mean over its channels is ``ratio``
    times its spread (the mean over images of the per-image standard deviation)."""
    params = jax.tree.map(np.array, params)
    kernel = params["context"]["kernel"][0, 0, :, 0]
    logits = np.einsum("nhwc,c->nhw", x.astype(np.float64), kernel)
    weights = np.exp(logits - logits.max(axis=(1, 2), keepdims=True))
    weights /= weights.sum(axis=(1, 2), keepdims=True)
    context = np.einsum("nhw,nhwc->nc", weights, x)
    t = context @ params["reduce"]["kernel"][0, 0]
    params["reduce"]["bias"] = np.full_like(params["reduce"]["bias"], ratio * t.std(axis=-1).mean())
    return params


@pytest.mark.parametrize("ratio", [100, 2000])
def test_layer_norm_is_accurate_in_float32_when_its_input_mean_dwarfs_its_spread(ratio):
    """Float32 GC against the reference in float64, with a LayerNorm input whose mean is ``ratio`` times its spread.

    Rounding the LayerNorm input to float32 already costs about eps * ratio relative to its spread, so no float32
    implementation does better than that (PyTorch's float32 reaches 6e-5 at 100 and 9e-4 at 2000). The one-pass
    variance E[t^2] - E[t]^2 loses eps * ratio^2 instead: 2e-3 at 100, and 1.4 at 2000 (a variance of 0).
    """
    shape = (3, 5, 7, 48)
    block = GlobalContext()
    x, variables, _ = setup(block, TorchGC(shape[-1]), shape, seed=4, to_state=torch_state_with_map_norm)
    variables = {"params": with_large_layer_norm_mean(variables["params"], x, ratio)}
    y = jax.jit(block.apply)(variables, x)
    reference = load(TorchGC(shape[-1]), variables, torch_state_with_map_norm).double()
    with torch.no_grad():
        expected = nchw_to_nhwc(reference(nhwc_to_nchw(x).double())[0])
    tol = 2e-6 * ratio  # about 3x PyTorch's float32 error, 10x below the one-pass variance's
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_and_softmax_map(shape):
    _, y, maps = random_maps(blocks.create("gc"), shape)
    assert list(maps) == ["attention"]
    weights = maps["attention"]
    n, h, w, _ = shape
    chex.assert_shape(y, shape)
    chex.assert_shape(weights, (n, h, w, 1))
    chex.assert_tree_all_finite((y, weights))
    assert jnp.all(weights > 0)
    np.testing.assert_allclose(weights.sum(axis=(1, 2, 3)), np.ones(n), rtol=1e-5)


def test_init_starts_as_the_identity_unless_told_otherwise():
    x = random_images((2, 3, 5, 20))
    block = GlobalContext()
    variables = jax.jit(block.init)(jax.random.key(0), x)
    chex.assert_shape(variables["params"]["reduce"]["kernel"], (1, 1, 20, 8))
    chex.assert_shape(variables["params"]["expand"]["kernel"], (1, 1, 8, 20))
    assert not jnp.any(variables["params"]["expand"]["kernel"])
    np.testing.assert_array_equal(jax.jit(block.apply)(variables, x), x)
    other = jax.jit(GlobalContext(zero_init_last=False).init)(jax.random.key(0), x)
    assert jnp.all(other["params"]["expand"]["kernel"] != 0)
    chex.assert_tree_all_finite(other)


# timm 1.0.29's GlobalContext: timm's create_attn('gca') (additive fusion) is attnjax's gc.

TIMM_NAMES = {"context": "conv_attn", "reduce": "mlp_add.fc1", "norm": "mlp_add.norm", "expand": "mlp_add.fc2"}


def timm_gc(shape, options, timm_options, seed=0):
    """attnjax's gc with ``options`` and timm's 'gca' with ``timm_options``, sharing random parameters; timm's
    ``conv_attn.bias`` (attnjax has none: it cancels in the softmax) is set to a random value too."""
    block = GlobalContext(**options)
    reference = create_attn("gca", shape[-1], **timm_options)
    x = random_images(shape, seed)
    variables = random_variables(block, x, seed + 1)
    extra = {"conv_attn.bias": torch.tensor([0.7])} if block.use_attn else {}
    return block, x, variables, load_timm(reference, torch_state_with_stats(variables), TIMM_NAMES, extra)


@pytest.mark.parametrize(
    "shape, options, timm_options",
    [
        ((2, 4, 5, 256), {"rd_ratio": 1 / 8}, {}),  # timm's defaults: C/8 = 32 (attnjax's default: 16)
        ((2, 3, 4, 64), {"rd_divisor": 1}, {}),  # rd_ratio defaults to timm's 1/8
        (
            (2, 3, 5, 100),
            {"rd_ratio": 0.1, "rd_divisor": 8, "act_layer": "gelu"},
            {"rd_ratio": 0.1, "rd_divisor": 8, "act_layer": "gelu"},
        ),
        ((2, 4, 4, 40), {"rd_channels": 3, "use_attn": False}, {"rd_channels": 3, "use_attn": False}),
    ],
)
def test_timm_options_give_timms_parameters_and_output(shape, options, timm_options):
    block, x, variables, reference = timm_gc(shape, {**options, "norm_eps": 1e-6}, timm_options)
    check_against_timm(block, x, variables, reference)


def test_default_width_is_attnjax_rule_and_timms_is_an_option():
    x = jnp.zeros((1, 2, 2, 256))
    widths = {
        options: jax.eval_shape(GlobalContext(**dict(options)).init, jax.random.key(0), x)["params"]["reduce"]["bias"]
        for options in [(), (("rd_ratio", 1 / 8),), (("rd_divisor", 1),), (("rd_channels", 20),)]
    }
    assert [w.shape[0] for w in widths.values()] == [16, 32, 32, 20]
    assert create_attn("gca", 256).mlp_add.fc1.out_channels == 32
    with pytest.raises(InputError, match=r"^reduction=8 \(attnjax's width rule\) and rd_ratio/rd_channels/rd_divisor"):
        jax.eval_shape(GlobalContext(reduction=8, rd_ratio=0.25).init, jax.random.key(0), x)
