"""SK (selective kernel): PyTorch parity in eval and train mode, branch weights, groups, shapes, gradients; and
timm's ``SelectiveKernel`` itself (timm 1.0.29) as the reference of the block built with timm's options, as
timm's SK-ResNets use it in place of a 3x3 conv (stride 2, out != in, groups 32, split input)."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import apply_jit, check_forward, check_gradients
from flax import traverse_util
from jax.test_util import check_grads
from timm_reference import import_timm
from torch import nn
from torch_reference import pytorch_running_var, random_images, random_variables, torch_state_with_stats

from attnjax import blocks
from attnjax.blocks import SelectiveKernelAttention
from attnjax.blocks.sk import path_logits, select_kernels, sk_branches, sk_groups, sk_widths
from attnjax.validate import InputError

pytestmark = pytest.mark.torch

SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 4, 4, 20)]  # 20: r = 16 does not divide C


class TorchSK(nn.Module):
    """Li et al. 2019, SK convolution, NCHW: split (grouped 3x3 convs, dilations 1 and 2), fuse, select."""

    def __init__(self, channels: int, groups: int, hidden: int, dilations=(1, 2)):
        super().__init__()
        self.num_branches = len(dilations)
        for m, dilation in enumerate(dilations):
            conv = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, groups=groups, bias=False)
            setattr(self, f"conv_{m}", conv)
            setattr(self, f"bn_{m}", nn.BatchNorm2d(channels))
            setattr(self, f"select_{m}", nn.Linear(hidden, channels, bias=False))
        self.fuse = nn.Linear(channels, hidden, bias=False)
        self.fuse_bn = nn.BatchNorm1d(hidden)

    def forward(self, x):
        u = [F.relu(getattr(self, f"bn_{m}")(getattr(self, f"conv_{m}")(x))) for m in range(self.num_branches)]
        s = sum(u).mean(dim=(2, 3))  # (N, C)
        z = F.relu(self.fuse_bn(self.fuse(s)))
        a = torch.softmax(torch.stack([getattr(self, f"select_{m}")(z) for m in range(self.num_branches)], 1), dim=1)
        return sum(a[:, m, :, None, None] * u[m] for m in range(self.num_branches)), a  # a: (N, M, C)


def paper_widths(channels):
    """G = 32 (or the largest divisor of C below it) and d = max(C // 16, L = 32), capped at C."""
    groups = max(g for g in range(1, 33) if channels % g == 0)
    return groups, max(channels // 16, min(channels, 32))


BLOCK = SelectiveKernelAttention()


def init(x, seed=0):
    return random_variables(BLOCK, x, seed, scale_range=(0.5, 2.0))


def apply(variables, x, train=False):
    """``BLOCK.apply`` under jit, returning ``(y, intermediates, new_batch_stats)``."""
    y, state = apply_jit(BLOCK, variables, x, train)
    return y, state["intermediates"], state.get("batch_stats")


def paper_state(variables) -> dict[str, torch.Tensor]:
    """The block's variables in ``TorchSK``'s names: ``paths_{m}.conv``/``.bn`` are ``conv_{m}``/``bn_{m}``,
    ``attn.fc_reduce`` (a 1x1 conv) is the Linear ``fuse``, ``attn.bn`` is ``fuse_bn`` and ``attn.fc_select``'s
    branch-major rows [m*C, (m+1)*C) are the Linears ``select_{m}``."""
    paths = sum(name.startswith("paths_") for name in variables["params"])
    state = {}
    for key, value in torch_state_with_stats(variables).items():
        module, _, leaf = key.rpartition(".")
        if module == "attn.fc_select":
            for m, rows in enumerate(value[:, :, 0, 0].chunk(paths)):
                state[f"select_{m}.{leaf}"] = rows.contiguous()
        elif module == "attn.fc_reduce":
            state[f"fuse.{leaf}"] = value[:, :, 0, 0].contiguous()
        elif module == "attn.bn":
            state[f"fuse_bn.{leaf}"] = value
        else:  # paths_0.conv -> conv_0
            path, layer = module.split(".")
            state[f"{layer}_{path.removeprefix('paths_')}.{leaf}"] = value
    return state


def reference_for(x, variables):
    reference = TorchSK(x.shape[-1], *paper_widths(x.shape[-1]))
    reference.load_state_dict(paper_state(variables), strict=True)
    return reference


def flat_stats(batch_stats) -> dict[str, dict[str, np.ndarray]]:
    """``{"paths_0.bn": {"mean": ..., "var": ...}, "attn.bn": ...}``: every BN's statistics by its dotted path."""
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(batch_stats)))
    stats = {}
    for path, value in flat.items():
        stats.setdefault(".".join(path[:-1]), {})[path[-1]] = value
    return stats


def check_running_stats(state, old, reference, module_name, counts):
    """Every BN's running mean and variance after one train step equals the reference's: means as they are,
    variances through the unbiased/biased conversion (``counts``: a BN's path -> values per channel)."""
    torch_state = reference.state_dict()
    before = flat_stats(old)
    for name, stats in flat_stats(state["batch_stats"]).items():
        module = module_name(name)
        np.testing.assert_allclose(stats["mean"], torch_state[f"{module}.running_mean"], rtol=1e-5, atol=1e-5)
        var = pytorch_running_var(stats["var"], before[name]["var"], counts(name))
        np.testing.assert_allclose(var, torch_state[f"{module}.running_var"], rtol=1e-5, atol=1e-5)


def paper_module(name):
    return {"attn.bn": "fuse_bn"}.get(name) or f"bn_{name.split('.')[0][6:]}"


def branch_weights(weights):
    """The reference's (N, M, C) weights in the block's layout (N, 1, 1, C, M)."""
    return weights.numpy().transpose(0, 2, 1)[:, None, None]


@pytest.mark.parametrize("shape", [(2, 8, 8, 64), (1, 7, 7, 16), (2, 5, 9, 24), (2, 4, 4, 48), (3, 1, 1, 32)])
def test_matches_pytorch_in_eval_mode_with_running_statistics(shape):
    x = random_images(shape, seed=2)
    variables = init(x)
    check_forward(BLOCK, x, variables, reference_for(x, variables), maps=[("attention", branch_weights)])


@pytest.mark.parametrize("shape", [(2, 8, 8, 64), (2, 5, 9, 24), (3, 1, 1, 32)])
def test_matches_pytorch_in_train_mode_with_batch_statistics(shape):
    """Compared in float64: in float32, Flax's BatchNorm computes the batch variance as
    E[x^2] - E[x]^2 (``use_fast_variance``), whose cancellation error, after z's BN over a
    batch of 2, reaches ~1e-3 in the output (PyTorch's two-pass variance stays near 1e-5).
    In float64 the two agree to ~1e-12, so what is compared is the math."""
    x = random_images(shape, seed=3)
    variables = init(x)
    reference = reference_for(x, variables)
    _, state = check_forward(
        BLOCK, x, variables, reference, maps=[("attention", branch_weights)], train=True, float64=True
    )
    # The running averages move the same way (momentum 0.9 here = 0.1 in PyTorch); PyTorch's variance is unbiased.
    n, h, w, _ = shape
    counts = lambda name: n if name == "attn.bn" else n * h * w
    check_running_stats(state, variables["batch_stats"], reference, paper_module, counts)


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_and_branch_weights_sum_to_one(shape):
    x = random_images(shape, seed=4)
    y, intermediates, _ = apply(init(x), x)
    assert list(intermediates) == ["attention"]
    (weights,) = intermediates["attention"]
    chex.assert_shape(y, shape)
    chex.assert_shape(weights, (shape[0], 1, 1, shape[-1], 2))
    chex.assert_tree_all_finite((y, weights))
    assert jnp.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(axis=-1), np.ones((shape[0], 1, 1, shape[-1])), rtol=1e-5)


@pytest.mark.parametrize(
    "channels, groups, expected",
    [(64, 32, 32), (96, 32, 32), (48, 32, 24), (40, 32, 20), (16, 32, 16), (1, 32, 1), (37, 32, 1), (24, 8, 8)],
)
def test_groups_are_the_largest_divisor_up_to_g(channels, groups, expected):
    assert sk_groups(channels, groups) == expected


@pytest.mark.parametrize(
    "channels, groups, hidden", [(64, 32, 32), (48, 24, 32), (20, 20, 20), (512, 32, 32), (1024, 32, 64)]
)
def test_parameter_shapes_follow_groups_and_bottleneck(channels, groups, hidden):
    variables = jax.eval_shape(BLOCK.init, jax.random.key(0), jnp.zeros((1, 3, 3, channels)))
    params = variables["params"]
    assert set(params) == {"paths_0", "paths_1", "attn"} and set(params["attn"]) == {"fc_reduce", "bn", "fc_select"}
    for m in (0, 1):
        assert set(params[f"paths_{m}"]) == {"conv", "bn"} and set(params[f"paths_{m}"]["conv"]) == {"kernel"}
        chex.assert_shape(params[f"paths_{m}"]["conv"]["kernel"], (3, 3, channels // groups, channels))
        chex.assert_shape(variables["batch_stats"][f"paths_{m}"]["bn"]["mean"], (channels,))
    chex.assert_shape(params["attn"]["fc_reduce"]["kernel"], (1, 1, channels, hidden))
    chex.assert_shape(params["attn"]["fc_select"]["kernel"], (1, 1, hidden, 2 * channels))
    chex.assert_shape(variables["batch_stats"]["attn"]["bn"]["var"], (hidden,))


def test_more_branches_follow_the_dilations():
    x = jnp.zeros((2, 5, 5, 8))
    block = SelectiveKernelAttention(dilations=(1, 2, 3))
    variables = jax.eval_shape(block.init, jax.random.key(0), x)
    assert {f"paths_{m}" for m in range(3)} <= set(variables["params"])
    weights = jax.eval_shape(lambda v: block.apply(v, x, mutable=["intermediates"])[1], variables)
    chex.assert_shape(weights["intermediates"]["attention"][0], (2, 1, 1, 8, 3))


def test_flax_init_and_train_mode_uses_batch_statistics_and_updates_running_averages():
    x = random_images((2, 4, 4, 20), seed=5)
    variables = jax.jit(BLOCK.init)(jax.random.key(0), x)
    chex.assert_tree_all_finite(variables)
    y_eval, _ = apply_jit(BLOCK, variables, x)
    y_train, state = apply_jit(BLOCK, variables, x, train=True)
    assert not np.allclose(y_eval, y_train, atol=1e-3)
    for name in ("paths_0", "paths_1", "attn"):
        assert not np.allclose(state["batch_stats"][name]["bn"]["mean"], variables["batch_stats"][name]["bn"]["mean"])


def test_select_kernels_formula_and_gradients():
    branches = random_images((2, 3, 4, 5, 2), seed=6)
    logits = random_images((2, 1, 1, 5, 2), seed=7)
    y, weights = select_kernels(branches, logits)
    expected_a = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(weights, expected_a, rtol=1e-5)
    np.testing.assert_allclose(y, (expected_a * np.asarray(branches)).sum(-1), rtol=1e-5, atol=1e-6)
    check_grads(jax.jit(select_kernels), (branches, logits), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)


# --- timm's SelectiveKernel (timm 1.0.29) as the reference, as timm's SK-ResNets build it -------------------------


def timm_module(name: str) -> str:
    """An attnjax module path in timm's names: ``paths_0.conv`` -> ``paths.0.conv``; ``attn.*`` is the same."""
    return re.sub(r"^paths_(\d+)", r"paths.\1", name)


timm_state = functools.partial(torch_state_with_stats, module_name=timm_module)


class WithWeights(torch.nn.Module):
    """timm's ``SelectiveKernel`` returning ``(y, a)``: its attention's softmax ``a``, (N, M, C, 1, 1), caught by a hook."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        caught = []
        hook = self.layer.attn.register_forward_hook(lambda module, inputs, output: caught.append(output))
        try:
            y = self.layer(x)
        finally:
            hook.remove()
        return y, caught[0]


def timm_weights(a):
    """timm's (N, M, C, 1, 1) branch weights in the block's layout (N, 1, 1, C, M)."""
    return a.numpy()[:, :, :, 0, 0].transpose(0, 2, 1)[:, None, None]


def timm_layer(in_channels, variables, **timm_options):
    """timm's ``SelectiveKernel(in_channels, **timm_options)`` with the block's variables loaded, strictly."""
    timm = import_timm()
    layer = timm.layers.SelectiveKernel(in_channels, **timm_options)
    layer.load_state_dict(timm_state(variables), strict=True)  # same names and shapes, every parameter and buffer
    return layer


# (case id, input shape, attnjax options, timm's SelectiveKernel options): the layers of timm's models (read from
# timm/models/sknet.py: skresnet18/34 pass rd_ratio=1/8, rd_divisor=16, split_input=True to SelectiveKernelBasic's
# conv1, SelectiveKernel(inplanes, planes, stride); skresnext50_32x4d rd_ratio=1/16, rd_divisor=32,
# split_input=False, groups=cardinality=32 to the bottleneck's conv2, SelectiveKernel(width, width, stride)).
SKRESNET = {"rd_ratio": 1 / 8, "rd_divisor": 16, "split_input": True}
SKRESNEXT = {"rd_ratio": 1 / 16, "rd_divisor": 32, "split_input": False}
TIMM_CASES = [
    ("skresnet18-layer1", (2, 8, 8, 64), {"groups": 1, **SKRESNET}, SKRESNET),
    ("skresnet18-layer2.0-stride2", (2, 9, 9, 64), {"out_channels": 128, "stride": 2, "groups": 1, **SKRESNET},
     {"out_channels": 128, "stride": 2, **SKRESNET}),
    ("skresnet34-layer3.0-stride2", (2, 6, 7, 128), {"out_channels": 256, "stride": 2, "groups": 1, **SKRESNET},
     {"out_channels": 256, "stride": 2, **SKRESNET}),
    ("skresnet18-dilated", (2, 7, 7, 64), {"dilation": 2, "groups": 1, **SKRESNET}, {"dilation": 2, **SKRESNET}),
    ("skresnext50-layer1-groups32", (2, 6, 6, 128), {"groups": 32, **SKRESNEXT}, {"groups": 32, **SKRESNEXT}),
    ("skresnext50-layer2.0-groups32-stride2", (2, 7, 7, 256), {"stride": 2, "groups": 32, **SKRESNEXT},
     {"stride": 2, "groups": 32, **SKRESNEXT}),
    ("skresnet50-defaults", (2, 5, 5, 64), {"groups": 1, "split_input": True, "rd_divisor": 8},
     {"split_input": True}),  # timm's own defaults (rd_ratio 1/16, rd_divisor 8): the untrained skresnet50
    ("kernels-3-5-7-no-keep3x3", (2, 6, 5, 24),
     {"out_channels": 16, "stride": 2, "kernel_size": (3, 5, 7), "keep_3x3": False, "groups": 4, "rd_channels": 8},
     {"out_channels": 16, "stride": 2, "kernel_size": [3, 5, 7], "keep_3x3": False, "groups": 4, "rd_channels": 8,
      "split_input": False}),
    ("kernel-int-split", (2, 5, 6, 32), {"kernel_size": 5, "groups": 8, "split_input": True, "rd_ratio": 0.25},
     {"kernel_size": 5, "groups": 8, "split_input": True, "rd_ratio": 0.25}),
]  # fmt: skip
TIMM_IDS = [case[0] for case in TIMM_CASES]


def timm_case(shape, options, timm_options, seed):
    block = SelectiveKernelAttention(**options)
    x = random_images(shape, seed=seed)
    variables = random_variables(block, x, seed + 1, scale_range=(0.5, 2.0))
    return block, x, variables, timm_layer(shape[-1], variables, **timm_options)


@pytest.mark.parametrize("case, shape, options, timm_options", TIMM_CASES, ids=TIMM_IDS)
def test_matches_timms_selective_kernel_in_eval_mode(case, shape, options, timm_options):
    block, x, variables, layer = timm_case(shape, options, timm_options, seed=10)
    y, _ = check_forward(block, x, variables, WithWeights(layer), maps=[("attention", timm_weights)])
    stride = options.get("stride", 1)
    out = options.get("out_channels", shape[-1])
    chex.assert_shape(y, (shape[0], -(-shape[1] // stride), -(-shape[2] // stride), out))


@pytest.mark.parametrize("case, shape, options, timm_options", TIMM_CASES, ids=TIMM_IDS)
def test_matches_timms_selective_kernel_in_train_mode_and_running_statistics(case, shape, options, timm_options):
    """Batch statistics, in float64 (the math, not float32 rounding through the batch-of-2 BN); the running means
    and variances after the step equal timm's (PyTorch's unbiased variance converted)."""
    block, x, variables, layer = timm_case(shape, options, timm_options, seed=20)
    y, state = check_forward(
        block, x, variables, WithWeights(layer), maps=[("attention", timm_weights)], train=True, float64=True
    )
    n, h, w, _ = y.shape
    counts = lambda name: n if name == "attn.bn" else n * h * w
    check_running_stats(state, variables["batch_stats"], WithWeights(layer).layer, timm_module, counts)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", ["skresnet18-layer2.0-stride2", "kernels-3-5-7-no-keep3x3"])
def test_gradients_match_timms_selective_kernel(case, train):
    """Gradients of sum(y * r) with respect to the input and every parameter, under timm's names (float64)."""
    _, shape, options, timm_options = TIMM_CASES[TIMM_IDS.index(case)]
    block, x, variables, layer = timm_case(shape, options, timm_options, seed=30)
    y_shape = jax.eval_shape(lambda: block.apply(variables, x))
    cotangent = random_images(y_shape.shape, seed=31)
    check_gradients(block, x, variables, layer, cotangent, to_state=timm_state, train=train, float64=True)


@pytest.mark.parametrize("shape", [(2, 6, 6, 64), (2, 5, 7, 24), (2, 4, 4, 20)])
def test_registry_defaults_are_timms_layer_with_attnjax_widths(shape):
    """The default block is timm's SelectiveKernel(C, C, groups=sk_groups(C), rd_channels=d, split_input=False)."""
    channels = shape[-1]
    groups, hidden = paper_widths(channels)
    block, x, variables, layer = timm_case(
        shape, {}, {"groups": groups, "rd_channels": hidden, "split_input": False}, seed=40
    )
    check_forward(block, x, variables, WithWeights(layer), maps=[("attention", timm_weights)])
    check_forward(block, x, variables, WithWeights(layer), maps=[("attention", timm_weights)], train=True, float64=True)


def test_timm_parameter_names_map_one_to_one():
    """Every attnjax variable is one of timm's tensors (plus timm's num_batches_tracked), same shapes."""
    block = SelectiveKernelAttention(out_channels=128, stride=2, groups=1, **SKRESNET)
    variables = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 8, 8, 64)))
    ours = {
        k: tuple(v.shape) for k, v in timm_state(jax.tree.map(lambda v: np.zeros(v.shape, v.dtype), variables)).items()
    }
    timm = import_timm()
    theirs = {
        k: tuple(v.shape) for k, v in timm.layers.SelectiveKernel(64, 128, stride=2, **SKRESNET).state_dict().items()
    }
    assert ours == theirs
    assert ours["paths.0.conv.weight"] == (128, 32, 3, 3) and ours["attn.fc_select.weight"] == (256, 16, 1, 1)


@pytest.mark.parametrize(
    "kernel_size, dilations, dilation, keep_3x3, expected",
    [
        ((), (1, 2), 1, True, ((3, 1), (3, 2))),  # attnjax's default = timm's default [3, 5] with keep_3x3
        ((), (1, 2), 2, True, ((3, 2), (3, 4))),
        ((), (1, 2), 1, False, ((3, 1), (5, 1))),  # timm's [3, 5] without keep_3x3
        ((), (1, 2, 3), 1, True, ((3, 1), (3, 2), (3, 3))),
        ((3, 5, 7), (1, 2), 1, True, ((3, 1), (3, 2), (3, 3))),
        (5, (1, 2), 1, True, ((3, 2), (3, 2))),  # timm's int: two branches of it
        ((3, 7), (1, 2), 2, False, ((3, 2), (7, 2))),
    ],
)
def test_branches_follow_timms_kernel_rule(kernel_size, dilations, dilation, keep_3x3, expected):
    assert sk_branches(kernel_size, dilations, dilation, keep_3x3) == expected


@pytest.mark.parametrize(
    "in_channels, out_channels, options, expected",
    [
        (64, 128, SKRESNET | {"groups": 1}, (32, 1, 16)),  # skresnet18 layer2.0: make_divisible(16, 16)
        (64, 64, SKRESNET | {"groups": 1}, (32, 1, 16)),  # make_divisible(8, 16) = 16 (at least the divisor)
        (256, 512, SKRESNET | {"groups": 1}, (128, 1, 64)),
        (1024, 1024, SKRESNEXT | {"groups": 32}, (1024, 32, 64)),  # skresnext50 layer4
        (128, 128, SKRESNEXT | {"groups": 32}, (128, 32, 32)),  # make_divisible(8, 32) = 32
        (64, 64, {"rd_channels": 24}, (64, 32, 24)),
        (64, 64, {}, (64, 32, 32)),  # attnjax's rule
        (24, 40, {"split_input": True}, (12, 4, 32)),  # G: largest divisor of gcd(12, 40) = 4 up to 32
    ],
)
def test_widths(in_channels, out_channels, options, expected):
    assert sk_widths(in_channels, out_channels, 2, **options) == expected


def test_timm_options_refuse_what_timm_refuses_and_mixed_rules():
    x = jnp.zeros((1, 4, 4, 15))
    with pytest.raises(InputError, match=r"split_input divides the 15 input channels among the 2 branches"):
        jax.eval_shape(SelectiveKernelAttention(split_input=True).init, jax.random.key(0), x)
    with pytest.raises(InputError, match=r"both set the hidden width; give one of them"):
        sk_widths(16, 16, 2, reduction=8, rd_ratio=0.25)
    with pytest.raises(InputError, match=r"kernel_size=\(3, 5\) .* and dilations=\(1, 3\) .* give one of them"):
        sk_branches((3, 5), (1, 3))
    with pytest.raises(InputError, match=r"keep_3x3=False asks for k x k branches, but dilations=\(1, 3\)"):
        sk_branches((), (1, 3), keep_3x3=False)
    with pytest.raises(InputError, match=r"kernel_size entries must be >= 3 \(timm's rule\), got 1"):
        sk_branches((1, 3))


def test_registry_builds_timms_conv_replacement_from_options():
    block = blocks.factory("sk", out_channels=128, stride=2, groups=1, **SKRESNET)(name="conv1")
    x = jnp.zeros((2, 8, 8, 64))
    y = jax.eval_shape(lambda: block.init_with_output(jax.random.key(0), x)[0])
    chex.assert_shape(y, (2, 4, 4, 128))
    parsed = blocks.parse_options("sk", ["kernel_size=3,5,7", "rd_ratio=0.125", "split_input=true", "out_channels=8"])
    assert parsed == {"kernel_size": (3, 5, 7), "rd_ratio": 0.125, "split_input": True, "out_channels": 8}


def test_path_logits_are_branch_major():
    logits = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 1, 1, 12)  # M = 3 branches of C = 4
    got = path_logits(logits, 3)
    chex.assert_shape(got, (2, 1, 1, 4, 3))
    np.testing.assert_array_equal(got[0, 0, 0, 1], [1, 5, 9])  # channel 1 of branches 0, 1, 2
