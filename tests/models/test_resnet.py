"""timm's ResNets in attnjax against timm 1.0.29 itself: parameter counts, eval- and train-mode outputs and
running statistics from the same (random) weights, the weight round trip, and the refusals.

The parity checks and their tolerances are in timm_parity.py (shared with test_sknet_resnest.py): eval logits
within 1e-4 of the largest |logit| of timm's; train mode on a batch of 8 against timm in float64, within
max(1e-4, 2 x timm's own float32 error), as batch norm over few values per channel amplifies float32 rounding
with depth (resnet101 at a batch of 2: 2.1e-4 against timm's float32, timm's own float32 2.5e-4 from its
float64, attnjax's float64 4.8e-13 from timm's). The 101/152-layer networks are ``slow``.
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
    relative_error,
    timm_state,
    torch_run,
)
from timm_reference import import_timm

from attnjax import models
from attnjax.blocks import EfficientChannelAttention, SqueezeExcitation
from attnjax.models import resnet, timm_resnets, timm_weights
from attnjax.train import create_train_state, train_step
from attnjax.train.config import Config
from attnjax.validate import InputError

pytestmark = pytest.mark.torch

DEEP = {"resnet101", "resnet152", "seresnet101", "ecaresnet101d"}
NAMES = sorted(timm_resnets.TIMM_RESNETS)
SIZES = (33, 64)  # an odd size, and a small even one
FULL_SIZE = {"resnet50", "seresnet50"}  # timm's default 224 x 224, once per family


def deep(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in names]


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_is_timms(name):
    ours, timms = parameter_count(name)
    assert ours == timms


EVAL_CASES = [(name, size) for name in NAMES for size in (*SIZES, *((224,) if name in FULL_SIZE else ()))]


@pytest.mark.parametrize(
    "name, size", [pytest.param(n, s, marks=pytest.mark.slow) if n in DEEP else (n, s) for n, s in EVAL_CASES]
)
def test_eval_logits_equal_timms(name, size):
    assert eval_error(name, size) < TOL


@pytest.mark.parametrize("name", deep(NAMES))
def test_train_mode_logits_and_running_statistics_equal_timms(name):
    check_train_mode(name, SIZES[0])


@pytest.mark.parametrize("name", deep(["resnet101"]))
def test_train_mode_in_float64_is_timms_to_float64_rounding(name):
    """resnet101's train-mode float32 error (2.2e-4 at a batch of 2) is float32's rounding: in float64 it is
    about 1e-13 (timm_parity.py's docstring)."""
    assert float64_train_error(name) < 1e-10


@pytest.mark.parametrize("name", NAMES)
def test_weights_round_trip_bit_for_bit(name):
    check_round_trip(name)


def test_attnjax_variables_load_into_timm_and_compute_the_same():
    net = models.create("ecaresnet26t", num_classes=7)
    x = images(40, seed=3)
    variables = net.init(jax.random.key(1), x)
    model = import_timm().create_model("ecaresnet26t", num_classes=7)
    model.load_state_dict(timm_weights.to_timm("ecaresnet26t", variables, as_torch=True), strict=True)
    # At init every residual branch ends in a zero batch-norm scale (zero_init_last), as timm's.
    assert all(np.all(np.asarray(variables["params"][f"layer{s}_0"]["bn3"]["scale"]) == 0) for s in range(1, 5))
    assert relative_error(net.apply(variables, x), torch_run(model.eval(), x)) < TOL


# Refusals: one line naming the first key that differs, nothing loaded.


def bad_state(kind: str) -> tuple[str, dict, str]:
    state = dict(timm_state("resnet18"))
    if kind == "another model":
        return "resnet18", dict(timm_state("resnet26")), "'layer1.0.conv3.weight' is not in it"
    if kind == "missing":
        del state["layer2.0.bn1.running_var"]
        return "resnet18", state, "'layer2.0.bn1.running_var' is missing (1 key(s) missing, 0 unexpected)"
    if kind == "extra":
        state["layer1.0.se.fc1.weight"] = torch.zeros(4, 64, 1, 1)
        return "resnet18", state, "'layer1.0.se.fc1.weight' is not in it (0 key(s) missing, 1 unexpected)"
    if kind == "shape":
        state["layer3.1.conv2.weight"] = torch.zeros(256, 256, 1, 1)
        return (
            "resnet18",
            state,
            "'layer3.1.conv2.weight' has shape (256, 256, 1, 1), timm's resnet18 has (256, 256, 3, 3)",
        )
    if kind == "plain model for SE":
        return "seresnet18", state, "the state dict is not timm's seresnet18: 'layer1.0.se.fc1.weight' is missing"
    if kind == "not an array":
        state["fc.bias"] = [0.0] * 1000
        return "resnet18", state, "'fc.bias' is a list, not an array or tensor"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["another model", "missing", "extra", "shape", "plain model for SE", "not an array"])
def test_a_wrong_state_dict_is_refused_with_one_line(kind):
    name, state, message = bad_state(kind)
    with pytest.raises(InputError) as error:
        timm_weights.from_timm(name, state)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_wrong_variables_and_blocks_without_timm_weights_are_refused():
    variables = timm_weights.from_timm("resnet18", timm_state("resnet18"))
    del variables["batch_stats"]["layer4_1"]["bn2"]
    with pytest.raises(InputError, match=r"batch_stats/layer4_1/bn2/mean is missing \(2 missing, 0 unexpected\)"):
        timm_weights.to_timm("resnet18", variables)
    with pytest.raises(InputError, match="takes a ResNet's variables"):
        timm_weights.to_timm("resnet18", {"params": {}})
    with pytest.raises(InputError, match="attention block CBAM has no timm counterpart"):
        timm_weights.from_timm("resnet18", timm_state("resnet18"), block="cbam")
    with pytest.raises(InputError, match="'cifar_resnet18' has no timm weights layout"):
        timm_weights.from_timm("cifar_resnet18", {})


# The attention site and the default blocks.


def test_named_networks_build_timms_attention_and_block_replaces_or_removes_it():
    def blocks_of(net):
        shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))["params"]
        return {k: v.get("block") for k, v in shapes.items() if k.startswith("layer")}

    se = blocks_of(models.create("seresnet50", num_classes=10))
    assert len(se) == 16 and se["layer1_0"]["reduce"]["kernel"].shape == (256, 16)  # timm: 256 * 1/16
    assert se["layer4_2"]["expand"]["kernel"].shape == (128, 2048)
    eca = blocks_of(models.create("ecaresnet26t", num_classes=10))
    assert eca["layer1_0"]["kernel"].shape == (5,) and eca["layer4_1"]["kernel"].shape == (7,)
    assert set(blocks_of(models.create("seresnet50", num_classes=10, block="none")).values()) == {None}
    assert set(blocks_of(models.create("resnet50", num_classes=10)).values()) == {None}
    cbam = blocks_of(models.create("seresnet50", num_classes=10, block="cbam"))
    assert set(cbam["layer2_0"]) == {"reduce", "expand", "spatial"} or "reduce" in cbam["layer2_0"]
    wide = blocks_of(models.create("seresnet18", num_classes=10, block_options={"rd_ratio": 0.25}))
    assert wide["layer1_0"]["reduce"]["kernel"].shape == (64, 16)
    assert models.default_block("seresnext50_32x4d") == ("se", {"rd_ratio": 1 / 16, "rd_divisor": 8})
    assert models.default_block("ecaresnet101d") == ("eca", {"min_kernel_size": 3})
    assert models.default_block("resnet50d") == ("none", {}) and models.default_block("cifar_resnet18") is None


@pytest.mark.parametrize("channels", [4, 64, 256, 1000, 2048])
def test_timm_attention_options_give_timms_modules_widths(channels):
    timm = import_timm()
    x = jnp.zeros((1, 2, 2, channels))
    se = jax.eval_shape(SqueezeExcitation(rd_ratio=1 / 16, rd_divisor=8).init, jax.random.key(0), x)["params"]
    assert se["reduce"]["kernel"].shape[1] == timm.layers.create_attn("se", channels).fc1.out_channels
    eca = jax.eval_shape(EfficientChannelAttention(min_kernel_size=3).init, jax.random.key(0), x)["params"]
    assert eca["kernel"].shape[0] == timm.layers.create_attn("eca", channels).conv.kernel_size[0]


def test_trainer_default_block_is_the_models_own():
    assert (Config(model="seresnet50").block, Config(model="seresnet50").block_option) == (
        "se",
        ("rd_ratio=0.0625", "rd_divisor=8"),
    )
    assert (Config(model="ecaresnet50d").block, Config(model="ecaresnet50d").block_option) == (
        "eca",
        ("min_kernel_size=3",),
    )
    assert (Config(model="resnet50").block, Config(model="attention_net").block) == ("none", "seed")
    assert Config(model="cifar_resnet18").block == "seed"
    given = Config(model="seresnet50", block_option=("rd_ratio=0.25",))
    assert given.block_option == ("rd_ratio=0.0625", "rd_divisor=8", "rd_ratio=0.25")  # the last one wins
    assert (Config(model="seresnet50", block="cbam").block, Config(model="seresnet50", block="cbam").block_option) == (
        "cbam",
        (),
    )


# Stochastic depth.


def test_drop_path_rates_follow_timms_linear_rule():
    model = import_timm().create_model("resnet26", drop_path_rate=0.2)
    timm_rates = [
        0.0 if b.drop_path is None else b.drop_path.drop_prob
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
        for b in stage
    ]
    np.testing.assert_allclose(resnet.drop_path_rates(0.2, (2, 2, 2, 2)), timm_rates, rtol=1e-12)


def test_drop_path_drops_whole_examples_in_training_only_and_needs_an_rng():
    x = jnp.ones((4000, 2, 2, 3))
    y = resnet.drop_path(x, 0.25, jax.random.key(0))
    per_example = np.asarray(y).reshape(4000, -1)
    assert set(np.unique(per_example)) == {0.0, np.float32(1 / 0.75)}
    assert np.all(per_example.min(1) == per_example.max(1))  # one decision per example
    assert abs((per_example[:, 0] == 0).mean() - 0.25) < 0.03

    options = {"layers": (1, 1, 1, 1), "zero_init_last": False}  # at timm's init every residual branch is 0
    net = models.create("resnet18", num_classes=5, drop_path_rate=0.5, **options)
    small = images(16)
    variables = net.init(jax.random.key(0), small)
    plain = models.create("resnet18", num_classes=5, **options)
    np.testing.assert_array_equal(net.apply(variables, small), plain.apply(variables, small))  # eval: no drop
    with pytest.raises(InputError, match="needs, in training, a PRNG stream 'dropout'"):
        net.apply(variables, small, train=True, mutable=["batch_stats"])
    a, _ = net.apply(variables, small, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
    b, _ = plain.apply(variables, small, train=True, mutable=["batch_stats"])
    assert not np.allclose(a, b)


def test_the_trainers_step_gives_the_model_a_dropout_stream():
    net = models.create(
        "resnet18", num_classes=3, layers=(1, 1, 1, 1), drop_path_rate=0.5, drop_rate=0.3, zero_init_last=False
    )
    state = create_train_state(jax.random.key(0), net, (16, 16, 3), 1e-3)
    batch = {"image": jnp.asarray(np.tile(images(16), (2, 1, 1, 1))), "label": jnp.array([0, 1, 2, 0])}
    step = jax.jit(train_step, static_argnames=("microbatches", "seed"))
    losses = [float(step(state, batch, seed=seed)[1]["loss"]) for seed in (0, 0, 1)]
    assert losses[0] == losses[1] != losses[2]  # a function of the seed (and the step)
    assert np.isfinite(float(step(state, batch, microbatches=2)[1]["loss"]))


def test_model_options_build_variants_and_bad_ones_are_refused():
    options = models.parse_model_options("resnet50", ["layers=1,1,1,1", "stem_type=deep", "avg_down=true"])
    net = models.create("resnet50", num_classes=10, cardinality=8, base_width=8, **options)
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
    assert params["conv1_0"]["kernel"].shape == (3, 3, 3, 64)  # stem_width 64: (64, 64, 128)
    assert params["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 16, 128)  # width 128 in 8 groups of 16
    assert set(params["layer2_0"]) >= {"downsample_1", "downsample_2"}  # the avg-pool shortcut
    for option, message in [
        ({"stem_type": "wide"}, "unknown stem_type 'wide'"),
        ({"residual_block": "sk"}, "unknown residual_block 'sk'"),
        ({"layers": (1, 1)}, "layers must give a positive block count for each of the 4 stages"),
        ({"residual_block": "basic", "cardinality": 2}, "BasicBlock has no groups"),
    ]:
        with pytest.raises(InputError, match=message):
            jax.eval_shape(
                lambda o=option: models.create("resnet50", num_classes=10, **o).init(
                    jax.random.key(0), jnp.zeros((1, 32, 32, 3))
                )
            )
    assert {"drop_path_rate", "zero_init_last", "layers", "stem_type", "avg_down"} <= set(
        models.model_options("resnet50")
    )
