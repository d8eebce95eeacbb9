"""--block-option and --model-option: from the command line to the model, recorded, checked, resumable."""

import json

import jax
import jax.numpy as jnp
import pytest

from attnjax import blocks, train
from attnjax.train.cli import parse_args
from attnjax.validate import InputError


def test_block_and_model_options_reach_the_model():
    config, _, _ = parse_args(
        ["--model", "cifar_resnet18", "--block", "cbam", "--block-option", "kernel_size=5", "--block-option",
         "reduction=8", "--model-option", "stem=imagenet", "--model-option", "zero_init_residual=true",
         "--workdir", "unused"]
    )  # fmt: skip
    assert config.block_option == ("kernel_size=5", "reduction=8") and config.model_option[0] == "stem=imagenet"
    net = train.create_model(config, 10)
    assert net.stem == "imagenet" and net.zero_init_residual
    params = net.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))["params"]
    cbam = params["layer1_0"]["block"]
    assert cbam["spatial_conv"]["kernel"].shape == (5, 5, 2, 1)
    assert cbam["reduce"]["kernel"].shape == (64, 64 // 8)


def test_options_survive_config_json_and_count_for_resuming():
    config, _, _ = parse_args(["--block", "cbam", "--block-option", "reduction=8", "--workdir", "unused"])
    saved = json.loads(json.dumps(config.to_dict()))  # as config.json holds it: lists, not tuples
    assert config.trajectory_diff(saved) == []
    other, _, _ = parse_args(["--block", "cbam", "--block-option", "reduction=4", "--workdir", "unused"])
    assert [line.split(":")[0] for line in other.trajectory_diff(saved)] == ["--block-option"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--block", "cbam", "--block-option", "reduce=8"], "'cbam' has no option 'reduce'; its options: reduction=16"),
        (["--block", "cbam", "--block-option", "kernel_size=big"], "kernel_size: 'big' is not an integer"),
        (["--block", "none", "--block-option", "reduction=8"], "--block none has no options"),
        (
            ["--model", "cifar_resnet18", "--model-option", "depth=50"],
            "'cifar_resnet18' has no option 'depth'; its options: stage_sizes=.*stem='cifar'",
        ),
        (["--block", "se", "--block-option", "reduction"], "'reduction' is not key=value"),
    ],
)
def test_bad_options_name_the_valid_ones(argv, message):
    config, _, _ = parse_args([*argv, "--workdir", "unused"])
    with pytest.raises(InputError, match=message):
        train.check_config(config)


@pytest.mark.parametrize("name", blocks.names())
def test_every_block_takes_its_documented_options_through_block_option(name):
    """``--block NAME --block-option KEY=VALUE`` for every option ``python -m attnjax.blocks --options`` lists."""

    def text(value):
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    defaults = blocks.options(name)
    argv = ["--block", name, "--workdir", "unused"]
    for key, value in defaults.items():
        argv += ["--block-option", f"{key}={text(value)}"]
    config, _, _ = parse_args(argv)
    train.check_config(config)
    net = train.create_model(config, 3)
    assert net.block.keywords == defaults
    x = jnp.ones((1, 4, 4, 8))
    assert net.apply(net.init(jax.random.key(0), x), x).shape == (1, 3)
