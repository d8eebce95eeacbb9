"""Splat (ResNeSt split attention): PyTorch parity in eval and train mode, gradients, radix weights, widths; and
timm's ``SplitAttn`` itself (timm 1.0.29) as the reference of the block built with timm's options, as timm's
ResNeSts use it in place of a 3x3 conv (and with stride 2, out != in, radix 4 and 1, cardinality 2 and 4)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import (
    apply_jit,
    assert_train_mode_uses_batch_statistics,
    check_forward,
    check_gradients,
    check_running_stats,
    load,
    sown_maps,
)
from flax import traverse_util
from timm_reference import import_timm
from torch import nn
from torch_reference import pytorch_running_var, random_images, random_variables, torch_state_with_stats

from attnjax import blocks
from attnjax.blocks.splat import SplitAttention, radix_softmax, splat_widths, split_attention
from attnjax.validate import InputError

pytestmark = pytest.mark.torch


class TorchSplat(nn.Module):
    """Zhang et al. 2020, split attention as an in-place block, NCHW.

    u = relu(BN(grouped conv3x3 C -> R*C)); the R splits are u's channel chunks [r*C, (r+1)*C);
    s = GAP(sum of the splits); z = relu(BN(fc1 s)); logits = fc2 z, laid out (K, R, C/K);
    a = softmax over R (sigmoid for R = 1); y = sum_r a_r U_r. Returns (y, a) with a of shape (N, R, C).
    """

    def __init__(self, channels, radix, cardinality, conv_groups, hidden):
        super().__init__()
        self.radix, self.cardinality = radix, cardinality
        self.conv = nn.Conv2d(channels, radix * channels, 3, padding=1, groups=conv_groups, bias=False)
        self.bn0 = nn.BatchNorm2d(radix * channels)
        self.fc1 = nn.Conv2d(channels, hidden, 1, groups=cardinality, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, radix * channels, 1, groups=cardinality)

    def forward(self, x):
        n, c, h, w = x.shape
        splits = F.relu(self.bn0(self.conv(x))).reshape(n, self.radix, c, h, w)
        s = splits.sum(dim=1).mean(dim=(2, 3), keepdim=True)
        logits = self.fc2(F.relu(self.bn1(self.fc1(s)))).reshape(n, self.cardinality, self.radix, c // self.cardinality)
        a = torch.softmax(logits, dim=2) if self.radix > 1 else torch.sigmoid(logits)
        a = a.permute(0, 2, 1, 3).reshape(n, self.radix, c)
        return (a[:, :, :, None, None] * splits).sum(dim=1), a


def paper_widths(channels, radix=2, cardinality=1):
    """K: the largest divisor of C up to the asked cardinality; conv groups gcd(C, R*K) (R*K when it divides C);
    hidden max(R*C // 4, 32) capped at R*C, rounded up to a multiple of K."""
    k = max(g for g in range(1, cardinality + 1) if channels % g == 0)
    hidden = max(radix * channels // 4, min(radix * channels, 32))
    return k, math.gcd(channels, radix * k), math.ceil(hidden / k) * k


def init(block, x, seed=0):
    return random_variables(block, x, seed, scale_range=(0.5, 2.0))


def reference_for(variables, shape, radix=2, cardinality=1):
    channels = shape[-1]
    k, groups, hidden = paper_widths(channels, radix, cardinality)
    return load(TorchSplat(channels, radix, k, groups, hidden), variables)


def radix_weights(weights):
    """The reference's (N, R, C) weights in the block's layout (N, 1, 1, C, R)."""
    return weights.numpy().transpose(0, 2, 1)[:, None, None]


# (shape, radix, cardinality): the default R = 2, K = 1 on even and odd C (13, 37: a dense conv), and
# other radixes and cardinalities, including ones that adapt (K = 3 on C = 20 -> 2) and G != R*K (18, R=4, K=3 -> 6).
CASES = [
    ((2, 8, 8, 64), 2, 1),
    ((1, 7, 7, 13), 2, 1),
    ((2, 5, 9, 37), 2, 1),
    ((3, 1, 1, 3), 2, 1),
    ((2, 4, 6, 24), 1, 1),
    ((2, 5, 5, 24), 3, 4),
    ((2, 4, 4, 20), 2, 3),
    ((2, 3, 5, 18), 4, 3),
]


@pytest.mark.parametrize("shape, radix, cardinality", CASES)
def test_matches_pytorch_in_eval_mode_with_running_statistics(shape, radix, cardinality):
    x = random_images(shape, seed=2)
    block = SplitAttention(radix=radix, cardinality=cardinality)
    variables = init(block, x)
    reference = reference_for(variables, shape, radix, cardinality)
    check_forward(block, x, variables, reference, maps=[("attention", radix_weights)])


@pytest.mark.parametrize("shape, radix, cardinality", [CASES[0], CASES[2], ((2, 1, 1, 3), 2, 1), CASES[7]])
def test_matches_pytorch_in_train_mode_with_batch_statistics(shape, radix, cardinality):
    """In float64, so that the comparison is of the math, not of float32 rounding in batch statistics."""
    x = random_images(shape, seed=3)
    block = SplitAttention(radix=radix, cardinality=cardinality)
    variables = init(block, x)
    reference = reference_for(variables, shape, radix, cardinality)
    maps = [("attention", radix_weights)]
    _, state = check_forward(block, x, variables, reference, maps=maps, train=True, float64=True)
    # Running means move the same way (Flax's momentum 0.9 = PyTorch's 0.1); PyTorch's running variance is unbiased.
    check_running_stats(state, reference)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape, radix, cardinality", [((2, 5, 7, 13), 2, 1), ((2, 4, 3, 24), 3, 4)])
def test_gradients_match_pytorch(shape, radix, cardinality, train):
    """Gradients of sum(y * r) with respect to the input and every parameter, against torch's autograd (float64)."""
    x = random_images(shape, seed=5)
    block = SplitAttention(radix=radix, cardinality=cardinality)
    variables = init(block, x, seed=7)
    reference = reference_for(variables, shape, radix, cardinality)
    check_gradients(block, x, variables, reference, random_images(shape, seed=6), train=train, float64=True)


@pytest.mark.parametrize("shape", [(2, 7, 7, 13), (2, 1, 1, 3), (3, 5, 9, 37)])
def test_default_block_keeps_the_shape_and_radix_weights_sum_to_one(shape):
    x = random_images(shape, seed=4)
    block = SplitAttention()
    variables = init(block, x)
    for train in (False, True):
        y, state = apply_jit(block, variables, x, train)
        weights = sown_maps(state)["attention"]
        chex.assert_shape(y, shape)
        chex.assert_shape(weights, (shape[0], 1, 1, shape[-1], 2))
        chex.assert_tree_all_finite((y, weights))
        assert jnp.all(weights >= 0)
        np.testing.assert_allclose(weights.sum(axis=-1), np.ones((shape[0], 1, 1, shape[-1])), rtol=1e-5)


def test_radix_one_is_a_sigmoid_gate():
    x = random_images((2, 4, 4, 16), seed=8)
    block = SplitAttention(radix=1)
    _, state = apply_jit(block, init(block, x), x)
    weights = sown_maps(state)["attention"]
    chex.assert_shape(weights, (2, 1, 1, 16, 1))
    assert jnp.all((weights > 0) & (weights < 1))


@pytest.mark.parametrize(
    "channels, radix, cardinality, expected",
    [
        (64, 2, 1, (1, 2, 32)),  # the paper's ResNeSt-50 first stage: hidden max(128 // 4, 32) = 32
        (256, 2, 1, (1, 2, 128)),
        (128, 2, 2, (2, 4, 64)),
        (13, 2, 1, (1, 1, 26)),  # odd C: a dense conv; hidden capped at R*C = 26
        (3, 2, 1, (1, 1, 6)),
        (37, 2, 1, (1, 1, 32)),
        (20, 2, 3, (2, 4, 32)),  # K = 3 does not divide 20: 2
        (18, 4, 3, (3, 6, 33)),  # G = gcd(18, 12) = 6; hidden 32 rounded up to a multiple of 3
        (16, 1, 1, (1, 1, 16)),
    ],
)
def test_widths(channels, radix, cardinality, expected):
    assert splat_widths(channels, radix, cardinality) == expected
    assert paper_widths(channels, radix, cardinality) == expected


@pytest.mark.parametrize("channels, radix, cardinality", [(64, 2, 1), (13, 2, 1), (24, 3, 4), (18, 4, 3)])
def test_parameter_shapes_follow_the_widths(channels, radix, cardinality):
    block = SplitAttention(radix=radix, cardinality=cardinality)
    variables = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 3, 3, channels)))
    params = variables["params"]
    k, groups, hidden = paper_widths(channels, radix, cardinality)
    chex.assert_shape(params["conv"]["kernel"], (3, 3, channels // groups, radix * channels))
    chex.assert_shape(params["fc1"]["kernel"], (1, 1, channels // k, hidden))
    chex.assert_shape(params["fc2"]["kernel"], (1, 1, hidden // k, radix * channels))
    chex.assert_shape(params["fc2"]["bias"], (radix * channels,))
    assert set(params) == {"conv", "bn0", "fc1", "bn1", "fc2"} and "bias" not in params["fc1"]
    chex.assert_shape(variables["batch_stats"]["bn0"]["mean"], (radix * channels,))
    chex.assert_shape(variables["batch_stats"]["bn1"]["mean"], (hidden,))


def test_radix_softmax_layout_and_split_attention():
    """Logit k*R*C/K + r*C/K + j is split r's for channel k*C/K + j; the weights sum to 1 over r."""
    radix, cardinality, per_group = 3, 2, 4
    logits = random_images((2, radix * cardinality * per_group), seed=9)
    weights = radix_softmax(jnp.asarray(logits), radix, cardinality)
    chex.assert_shape(weights, (2, cardinality * per_group, radix))
    g = logits.reshape(2, cardinality, radix, per_group)
    e = np.exp(g - g.max(axis=2, keepdims=True))
    expected = (e / e.sum(axis=2, keepdims=True)).transpose(0, 1, 3, 2).reshape(2, -1, radix)
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        radix_softmax(jnp.asarray(logits), 1, 4), 1 / (1 + np.exp(-logits))[..., None], rtol=1e-5
    )
    splits = random_images((2, 3, 3, 8, radix), seed=10)
    y = split_attention(jnp.asarray(splits), weights[:, None, None])
    np.testing.assert_allclose(y, (splits * np.asarray(weights)[:, None, None]).sum(-1), rtol=1e-5, atol=1e-6)


def test_flax_init_and_train_mode_uses_batch_statistics_and_updates_running_averages():
    assert_train_mode_uses_batch_statistics(SplitAttention(), random_images((2, 4, 4, 20), seed=11), "bn0")


# --- timm's SplitAttn (timm 1.0.29) as the reference, as timm's ResNeSts build it ----------------------------------


class WithWeights(torch.nn.Module):
    """timm's ``SplitAttn`` returning ``(y, a)``: its radix softmax's output ``a``, caught by a hook."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        caught = []
        hook = self.layer.rsoftmax.register_forward_hook(lambda module, inputs, output: caught.append(output))
        try:
            y = self.layer(x)
        finally:
            hook.remove()
        a = caught[0].reshape(x.shape[0], self.layer.radix, -1)  # radix-major: (N, R, C_out)
        return y, a


def timm_layer(in_channels, variables, extra=None, **timm_options):
    """timm's ``SplitAttn(in_channels, norm_layer=BatchNorm2d, **timm_options)`` with the block's variables (and
    ``extra`` tensors of timm's own) loaded, strictly: the same names and shapes, every parameter and buffer."""
    timm = import_timm()
    layer = timm.layers.SplitAttn(in_channels, norm_layer=torch.nn.BatchNorm2d, **timm_options)
    layer.load_state_dict({**torch_state_with_stats(variables), **(extra or {})}, strict=True)
    return layer


# ResNestBottleneck's conv2 (timm/models/resnest.py): SplitAttn(group_width, group_width, kernel_size=3,
# stride=stride, padding=dilation, dilation=dilation, groups=cardinality, radix=radix, norm_layer=BatchNorm2d).
# resnest14d/26d/50d: radix 2, cardinality 1, avd=True (the stride moves to an avg pool: the layer is always
# stride 1, in = out = group_width = 64, 128, 256, 512); resnest50d_4s2x40d: radix 4, cardinality 2 (width 80 at
# the first stage); resnest50d_1s4x24d: radix 1, cardinality 4 (width 96). Plus timm's layer with stride 2 and
# out != in (a ResNeSt without avd), a dilated one (output stride 16), and kernel 5 with a conv bias.
TIMM_CASES = [
    ("resnest50d-layer1", (2, 8, 8, 64), {}, {}),
    ("resnest50d-layer2", (2, 6, 6, 128), {}, {}),
    ("resnest14d-layer3", (2, 4, 5, 256), {}, {}),
    ("stride2-out128", (2, 9, 9, 64), {"out_channels": 128, "stride": 2}, {"out_channels": 128, "stride": 2}),
    ("resnest50d_4s2x40d-radix4-groups2", (2, 5, 5, 80), {"radix": 4, "cardinality": 2}, {"radix": 4, "groups": 2}),
    ("resnest50d_1s4x24d-radix1-groups4", (2, 5, 5, 96), {"radix": 1, "cardinality": 4}, {"radix": 1, "groups": 4}),
    ("dilated", (2, 7, 7, 64), {"padding": 2, "dilation": 2}, {"padding": 2, "dilation": 2}),
    ("kernel5-bias-groups2-stride2", (2, 7, 6, 64),
     {"out_channels": 32, "kernel_size": 5, "stride": 2, "padding": None, "bias": True, "cardinality": 2,
      "rd_channels": 16},
     {"out_channels": 32, "kernel_size": 5, "stride": 2, "padding": None, "bias": True, "groups": 2,
      "rd_channels": 16}),  # padding None: kernel_size // 2 in both
]  # fmt: skip
TIMM_IDS = [case[0] for case in TIMM_CASES]


def timm_case(shape, options, timm_options, seed):
    """The block with ResNeSt's conv2 options (``fc1_bias``, timm's widths, padding 1 unless given) and timm's layer."""
    block = SplitAttention(**{"padding": 1, "fc1_bias": True, "rd_ratio": 0.25, **options})
    x = random_images(shape, seed=seed)
    variables = random_variables(block, x, seed + 1, scale_range=(0.5, 2.0))
    timm_options = {"radix": 2, "kernel_size": 3, "padding": 1, **timm_options}
    return block, x, variables, timm_layer(shape[-1], variables, **timm_options)


def flat_stats(batch_stats) -> dict[str, dict[str, np.ndarray]]:
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(batch_stats)))
    stats = {}
    for path, value in flat.items():
        stats.setdefault(".".join(path[:-1]), {})[path[-1]] = value
    return stats


@pytest.mark.parametrize("case, shape, options, timm_options", TIMM_CASES, ids=TIMM_IDS)
def test_matches_timms_split_attn_in_eval_mode(case, shape, options, timm_options):
    block, x, variables, layer = timm_case(shape, options, timm_options, seed=10)
    y, _ = check_forward(block, x, variables, WithWeights(layer), maps=[("attention", radix_weights)])
    stride = options.get("stride", 1)
    chex.assert_shape(
        y, (shape[0], -(-shape[1] // stride), -(-shape[2] // stride), options.get("out_channels", shape[-1]))
    )


@pytest.mark.parametrize("case, shape, options, timm_options", TIMM_CASES, ids=TIMM_IDS)
def test_matches_timms_split_attn_in_train_mode_and_running_statistics(case, shape, options, timm_options):
    """Batch statistics, in float64; the running means and variances after the step equal timm's (PyTorch's
    unbiased variance converted: bn0 averages N*H'*W' values per channel, bn1 N)."""
    block, x, variables, layer = timm_case(shape, options, timm_options, seed=20)
    reference = WithWeights(layer)
    y, state = check_forward(
        block, x, variables, reference, maps=[("attention", radix_weights)], train=True, float64=True
    )
    n, h, w, _ = y.shape
    torch_state = layer.state_dict()
    before = flat_stats(variables["batch_stats"])
    for name, stats in flat_stats(state["batch_stats"]).items():
        np.testing.assert_allclose(stats["mean"], torch_state[f"{name}.running_mean"], rtol=1e-5, atol=1e-5)
        var = pytorch_running_var(stats["var"], before[name]["var"], n if name == "bn1" else n * h * w)
        np.testing.assert_allclose(var, torch_state[f"{name}.running_var"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", ["stride2-out128", "kernel5-bias-groups2-stride2"])
def test_gradients_match_timms_split_attn(case, train):
    _, shape, options, timm_options = TIMM_CASES[TIMM_IDS.index(case)]
    block, x, variables, layer = timm_case(shape, options, timm_options, seed=30)
    y_shape = jax.eval_shape(lambda: block.apply(variables, x)).shape
    check_gradients(block, x, variables, layer, random_images(y_shape, seed=31), train=train, float64=True)


@pytest.mark.parametrize("shape", [(2, 6, 6, 64), (2, 5, 5, 16), (2, 4, 4, 32), (2, 3, 3, 48)])
def test_registry_defaults_are_timms_layer_with_a_zero_fc1_bias_for_c_a_multiple_of_16(shape):
    """The default block is timm's SplitAttn(C, C, radix=2, norm_layer=BatchNorm2d) with fc1's bias zero, for C a
    multiple of 16 (where attnjax's width max(C // 2, min(2C, 32)) is timm's make_divisible(C / 2, 8, 32))."""
    block = SplitAttention()
    x = random_images(shape, seed=40)
    variables = random_variables(block, x, 41, scale_range=(0.5, 2.0))
    hidden = variables["params"]["fc1"]["kernel"].shape[-1]
    layer = timm_layer(shape[-1], variables, extra={"fc1.bias": torch.zeros(hidden)})
    check_forward(block, x, variables, WithWeights(layer), maps=[("attention", radix_weights)])
    check_forward(
        block, x, variables, WithWeights(layer), maps=[("attention", radix_weights)], train=True, float64=True
    )


def test_timm_parameter_names_map_one_to_one():
    """Every attnjax variable is one of timm's tensors (timm's num_batches_tracked aside), same name and shape."""
    block = SplitAttention(radix=4, cardinality=2, out_channels=160, stride=2, bias=True, fc1_bias=True, rd_ratio=0.25)
    variables = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 8, 8, 80)))
    ours = {
        k: tuple(v.shape)
        for k, v in torch_state_with_stats(jax.tree.map(lambda v: np.zeros(v.shape, v.dtype), variables)).items()
    }
    timm = import_timm()
    layer = timm.layers.SplitAttn(80, 160, stride=2, bias=True, radix=4, groups=2, norm_layer=torch.nn.BatchNorm2d)
    assert ours == {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert ours["conv.weight"] == (640, 10, 3, 3) and ours["fc1.weight"] == (80, 80, 1, 1)


@pytest.mark.parametrize(
    "channels, radix, cardinality, options, expected",
    [
        (64, 2, 1, {"rd_ratio": 0.25}, (1, 2, 32)),  # resnest50d layer1: make_divisible(32, 8, min 32)
        (512, 2, 1, {"rd_divisor": 8}, (1, 2, 256)),  # layer4
        (80, 4, 2, {"rd_ratio": 0.25}, (2, 8, 80)),  # resnest50d_4s2x40d
        (96, 1, 4, {"rd_ratio": 0.25}, (4, 4, 32)),  # resnest50d_1s4x24d: 24 -> at least 32
        (8, 2, 1, {"rd_ratio": 0.25}, (1, 2, 32)),  # timm's min 32; attnjax's rule gives 16
        (8, 2, 1, {}, (1, 2, 16)),
        (64, 2, 1, {"rd_channels": 24}, (1, 2, 48)),  # timm's rd_channels is per split: times R
        (64, 2, 1, {"rd_ratio": 0.25, "out_channels": 24}, (1, 2, 32)),  # widths from C_in, as timm's
        (64, 2, 3, {"out_channels": 24}, (3, 2, 33)),  # K divides C_out (24); G = gcd(64, 6); d to a multiple of K
    ],
)
def test_timm_widths(channels, radix, cardinality, options, expected):
    assert splat_widths(channels, radix, cardinality, **options) == expected


def test_mixed_width_rules_are_refused_and_options_parse():
    with pytest.raises(
        InputError,
        match=r"^reduction=8 \(attnjax's width rule\) and rd_ratio/rd_channels/rd_divisor \(timm's\) both set",
    ):
        splat_widths(64, 2, 1, 8, rd_ratio=0.25)
    x = jnp.zeros((1, 4, 4, 16))
    with pytest.raises(InputError, match=r"^SplitAttention: padding must be >= 0 or None"):
        jax.eval_shape(SplitAttention(padding=-1).init, jax.random.key(0), x)
    parsed = blocks.parse_options("splat", ["padding=2", "rd_ratio=0.25", "fc1_bias=true", "out_channels=32"])
    assert parsed == {"padding": 2, "rd_ratio": 0.25, "fc1_bias": True, "out_channels": 32}
    block = blocks.factory("splat", out_channels=32, stride=2, fc1_bias=True, rd_ratio=0.25)(name="conv2")
    y = jax.eval_shape(lambda: block.init_with_output(jax.random.key(0), x)[0])
    chex.assert_shape(y, (1, 2, 2, 32))
