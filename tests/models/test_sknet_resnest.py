"""timm's SK-ResNets and ResNeSts in attnjax against timm 1.0.29 itself: parameter counts, eval- and train-mode
outputs and running statistics from the same (random) weights, the weight round trip, the attention site and the
refusals. The checks and their tolerances are timm_parity.py's (shared with test_resnet.py); the 50-layer
networks are ``slow``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm_parity import (
    TOL,
    check_round_trip,
    check_train_mode,
    eval_error,
    float64_train_error,
    images,
    parameter_count,
    randomize,
    relative_error,
    timm_state,
    torch_run,
)
from timm_reference import import_timm

from attnjax import models
from attnjax.models import timm_resnets, timm_weights
from attnjax.models.resnest import TIMM_RESNESTS, ResNestBottleneck
from attnjax.models.sknet import TIMM_SKNETS
from attnjax.validate import InputError

pytestmark = pytest.mark.torch

NAMES = [*TIMM_SKNETS, *TIMM_RESNESTS]
DEEP = {"skresnext50_32x4d", "resnest50d"}
SIZES = (33, 64)  # an odd size, and a small even one
FULL_SIZE = {"skresnet18", "resnest14d"}  # timm's default 224 x 224, once per family


def marked(cases):
    return [pytest.param(*c, marks=pytest.mark.slow) if c[0] in DEEP else pytest.param(*c) for c in cases]


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_is_timms(name):
    ours, timms = parameter_count(name)
    assert ours == timms


EVAL_CASES = [(name, size) for name in NAMES for size in (*SIZES, *((224,) if name in FULL_SIZE else ()))]


@pytest.mark.parametrize("name, size", marked(EVAL_CASES))
def test_eval_logits_equal_timms(name, size):
    assert eval_error(name, size) < TOL


@pytest.mark.parametrize("name", marked([(n,) for n in NAMES]))
def test_train_mode_logits_and_running_statistics_equal_timms(name):
    check_train_mode(name, SIZES[0])


@pytest.mark.parametrize("name", ["skresnet18", "resnest14d"])
def test_train_mode_in_float64_is_timms_to_float64_rounding(name):
    """What the train-mode tolerance leaves to float32 rounding is rounding: in float64 the two agree to 1e-10."""
    assert float64_train_error(name) < 1e-10


@pytest.mark.parametrize("name", NAMES)
def test_weights_round_trip_bit_for_bit(name):
    check_round_trip(name)


def test_the_attention_convs_carry_timms_keys_and_widths():
    sk = timm_state("skresnet18")
    assert sk["layer1.0.conv1.paths.0.conv.weight"].shape == (64, 32, 3, 3)  # split input: 64 / 2 per path
    assert sk["layer2.0.conv1.attn.fc_reduce.weight"].shape == (16, 128, 1, 1)  # make_divisible(128 / 8, 16)
    assert sk["layer4.1.conv1.attn.fc_select.weight"].shape == (1024, 64, 1, 1)  # 2 paths x 512
    params = timm_weights.from_timm("skresnet18", sk)["params"]
    assert set(params["layer1_0"]) == {"conv1", "conv2"} and set(params["layer1_0"]["conv2"]) == {"conv", "bn"}
    assert set(params["layer1_0"]["conv1"]) == {"paths_0", "paths_1", "attn"}
    st = timm_state("resnest14d")
    assert st["layer2.0.conv2.conv.weight"].shape == (256, 64, 3, 3)  # radix 2: 128 -> 256 in 2 groups
    assert st["layer2.0.conv2.fc1.weight"].shape == (64, 128, 1, 1)  # make_divisible(128 * 2 / 4, 8, min 32)
    assert "layer2.0.downsample.1.weight" in st and "layer2.0.downsample.0.weight" not in st  # the avg-pool shortcut
    params = timm_weights.from_timm("resnest14d", st)["params"]
    assert set(params["layer2_0"]["conv2"]) == {"conv", "bn0", "fc1", "bn1", "fc2"}


def test_these_networks_have_no_separate_attention_block():
    for name in NAMES:
        assert models.default_block(name) == ("none", {}), name
        shapes = jax.eval_shape(
            lambda n=name: models.create(n, num_classes=10).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        )
        assert not any("block" in stage for key, stage in shapes["params"].items() if key.startswith("layer"))


def test_a_block_goes_to_the_usual_site_and_skresnet_with_se_is_timms():
    """``--block se`` with timm's SE widths on skresnet18 is timm's skresnet18 with ``attn_layer='se'``."""
    options = timm_resnets.TIMM_ATTENTION["se"]
    net = models.create("skresnet18", num_classes=1000, block="se", block_options=options)
    timm_net = import_timm().create_model(
        "skresnet18",
        block_args={"sk_kwargs": {"rd_ratio": 1 / 8, "rd_divisor": 16, "split_input": True}, "attn_layer": "se"},
    )
    state = randomize(timm_net.state_dict(), seed=4)
    timm_net.load_state_dict(state, strict=True)
    variables = timm_weights.from_timm("skresnet18", state, block="se", block_options=options)
    assert variables["params"]["layer3_1"]["block"]["reduce"]["kernel"].shape == (256, 16)  # after conv2
    x = images(40, seed=5)
    assert relative_error(net.apply(variables, x), torch_run(timm_net.eval(), x)) < TOL
    entries = timm_weights.model_layout("resnest14d", 10, block="eca")
    layer = [
        e.key.removeprefix("layer1.0.") for e in entries if e.key.startswith("layer1.0.") and e.path[:1] == ("params",)
    ]
    at = layer.index("se.conv.weight")  # the block, in timm's name for the site
    assert layer[at - 2 : at] == ["bn3.weight", "bn3.bias"] and layer[at + 1] == "downsample.1.weight"  # after bn3


def test_residual_block_option_builds_timms_unregistered_skresnet50():
    net = models.create("resnet50", num_classes=1000, residual_block="sk_bottleneck", zero_init_last=False)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))["params"]
    ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    assert ours == sum(p.numel() for p in import_timm().create_model("skresnet50").parameters())


def test_wrong_options_and_wrong_state_dicts_are_refused_with_one_line():
    x = jnp.zeros((1, 32, 32, 3))
    for name, option, message in [
        ("resnest14d", {"block_reduce_first": 2}, "block_reduce_first must be 1"),
        ("skresnet18", {"cardinality": 2}, "SelectiveKernelBasic has no groups"),
    ]:
        with pytest.raises(InputError, match=message) as error:
            jax.eval_shape(lambda n=name, o=option: models.create(n, num_classes=10, **o).init(jax.random.key(0), x))
        assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="'layer1.2.conv1.paths.0.conv.weight' is missing") as error:
        timm_weights.from_timm("skresnet34", timm_state("skresnet18"))
    assert "\n" not in str(error.value)
    state = dict(timm_state("resnest14d"))
    state["layer3.0.conv2.fc1.weight"] = torch.zeros(64, 256, 1, 1)
    with pytest.raises(InputError, match=r"'layer3.0.conv2.fc1.weight' has shape \(64, 256, 1, 1\), .* \(128, 256"):
        timm_weights.from_timm("resnest14d", state)


def test_resnest_stochastic_depth_drops_the_residual_branch():
    """attnjax drops the branch, per example (every ResNet's stochastic depth); timm 1.0.29's ResNestBottleneck
    drops its input instead, which in a block without a projection shortcut changes nothing (see
    attnjax/models/resnest.py). A dropped example's output is relu(shortcut) = relu(x)."""
    block = ResNestBottleneck(planes=16, drop_path_rate=0.7, zero_init_last=False)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 8, 8, 64)), jnp.float32)
    variables = block.init(jax.random.key(0), x)
    y, _ = block.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
    dropped = np.all(np.asarray(y) == np.asarray(jax.nn.relu(x)), axis=(1, 2, 3))
    assert 0.5 < dropped.mean() < 0.9  # about 70% of the 64 examples
    kept = np.asarray(y)[~dropped]
    assert np.all(np.abs(kept - np.asarray(jax.nn.relu(x))[~dropped]).max(axis=(1, 2, 3)) > 0.01)
