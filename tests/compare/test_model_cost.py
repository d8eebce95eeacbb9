"""The model cost table (``python -m attnjax.compare.model_cost``): MACs against hand counts and timm's FlopCounterMode."""

import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from timm_reference import import_timm

from attnjax import models
from attnjax.compare import model_cost
from attnjax.validate import InputError

ROOT = Path(__file__).resolve().parents[2]


class ConvDense(nn.Module):
    """One 3x3 stride-2 conv with padding 1 (no bias), flattened, one dense layer (no bias)."""

    groups: int = 1
    dilation: int = 1

    @nn.compact
    def __call__(self, x, train=False):
        del train
        x = nn.Conv(
            4,
            (3, 3),
            strides=2,
            padding=1,
            use_bias=False,
            feature_group_count=self.groups,
            kernel_dilation=self.dilation,
        )(x)
        return nn.Dense(5, use_bias=False)(x.reshape(x.shape[0], -1))


# Hand counts on a 5x5x2 input, 4 output channels, 3x3 kernel, stride 2, padding 1: the output is 3x3x4.
# Per spatial dimension the tap positions are o*2 - 1 + k*d for o in 0..2, k in 0..2 (d the dilation):
#   d = 1: o=0 -> -1,0,1 (2 inside [0,5)); o=1 -> 1,2,3 (3); o=2 -> 3,4,5 (2): 7 of 9 inside;
#   d = 2: output (5 + 2 - 5) // 2 + 1 = 2; o=0 -> -1,1,3 (2); o=1 -> 1,3,5 (2): 4 of 6 inside.
# MACs of the conv: output elements x 9 taps x input channels per group; of the dense: inputs x 5.
HAND_COUNTS = {
    # (groups, dilation): (params, MACs, padding MACs)
    (1, 1): (9 * 2 * 4 + 36 * 5, 36 * 9 * 2 + 36 * 5, 4 * 2 * (81 - 7 * 7)),
    (2, 1): (9 * 1 * 4 + 36 * 5, 36 * 9 * 1 + 36 * 5, 4 * 1 * (81 - 7 * 7)),
    (1, 2): (9 * 2 * 4 + 16 * 5, 16 * 9 * 2 + 16 * 5, 4 * 2 * (36 - 4 * 4)),
}


@pytest.mark.parametrize(("groups", "dilation"), sorted(HAND_COUNTS))
def test_a_conv_and_a_dense_count_as_by_hand_and_xla_skips_exactly_the_padding_taps(groups, dilation):
    params, macs, padding = HAND_COUNTS[groups, dilation]
    cost = model_cost.forward_cost(ConvDense(groups, dilation), (5, 5, 2))
    assert (cost.params, cost.macs, cost.padding_macs) == (params, macs, padding)
    if cost.xla_flops is not None:  # nothing but the two products: XLA's count is 2 per MAC inside the image
        assert cost.xla_flops == 2 * (macs - padding)
        assert cost.other_flops == 0


def test_nested_jaxprs_are_counted_and_a_while_loop_with_products_is_refused():
    w = jnp.ones((3, 3))

    def body(carry, _):
        return carry @ w, None

    def fn(x):
        y = jax.jit(lambda x: x @ w)(x)  # 2 x 3 x 3 = 18 MACs
        y, _ = jax.lax.scan(body, y, None, length=4)  # 4 x 18
        return jax.lax.cond(y.sum() > 0, lambda y: (y @ w) @ w, lambda y: y @ w, y)  # the larger branch: 36

    x = jnp.ones((2, 3))
    assert model_cost.count_macs(fn, x).total == 18 + 4 * 18 + 36

    def loop(x):
        return jax.lax.while_loop(lambda c: c.sum() < 10, lambda c: c @ w, x)

    with pytest.raises(ValueError, match="while loop"):
        model_cost.count_macs(loop, x)


def _timm_counts(timm, name: str, size: int):
    """timm's parameters, FlopCounterMode's FLOPs on one image, and the MACs of its ECA blocks' Conv1d."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False).eval()
    eca_macs = []

    def eca_hook(module, inputs, output):  # Conv1d(1, 1, k): output elements x k taps x 1 input channel
        eca_macs.append(output.numel() * module.kernel_size[0])

    for module in net.modules():
        if type(module).__name__ == "EcaModule":
            module.conv.register_forward_hook(eca_hook)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    return sum(p.numel() for p in net.parameters()), counter.get_total_flops(), sum(eca_macs)


@pytest.mark.parametrize("name", ["resnet18", "seresnet50", "ecaresnet26t", "skresnet18", "resnest14d"])
def test_macs_and_params_are_timms_as_torchs_flop_counter_counts_them(name):
    # FlopCounterMode counts 2 FLOPs per multiply-accumulate of aten.convolution and addmm, nothing else.
    timm = import_timm()
    size = 64  # the counts scale with the input; a small one keeps the test fast
    timm_params, timm_flops, eca_macs = _timm_counts(timm, name, size)
    cost = model_cost.model_cost(name, size=size, xla=False)
    assert cost.params == timm_params
    assert timm_flops % 2 == 0
    # attnjax's ECA computes its conv across channels as k shifted multiply-adds (element-wise, not counted):
    # the only difference, C x k MACs per ECA block, a few parts in 100,000.
    assert (eca_macs > 0) == name.startswith("eca")
    assert cost.macs == timm_flops // 2 - eca_macs
    assert eca_macs < 1e-3 * cost.macs


def test_a_networks_xla_flops_are_twice_its_macs_inside_the_image_plus_a_little_element_wise_work():
    cost = model_cost.model_cost("resnet18", size=64)
    assert cost.xla_flops is not None, "XLA:CPU gave no cost analysis"  # CI runs on the CPU, which has one
    assert 0 < cost.padding_macs < cost.macs
    # batch norm, ReLU, max pooling, the residual adds, the global pool and the fc's bias: a few percent
    assert 0 < cost.other_flops < 0.05 * cost.xla_flops


def test_every_registered_model_has_a_default_input():
    for name in models.names():
        height, width, channels = model_cost.default_input_shape(name)
        if name in models.TIMM_NETWORKS:
            assert (height, width, channels) == (224, 224, 3)
            assert model_cost.default_num_classes(name) == 1000
    assert model_cost.default_input_shape("attention_net") == (28, 28, 1)
    assert model_cost.default_input_shape("cifar_resnet18") == (32, 32, 3)
    with pytest.raises(InputError, match="unknown model 'resnet5'"):
        model_cost.default_input_shape("resnet5")
    with pytest.raises(InputError, match="size must be >= 1"):
        model_cost.model_cost("resnet18", size=0)


def test_tables():
    rows = [
        model_cost.ModelCost("a", (32, 32, 3), 1234, 2_000_000_000, 100_000_000, 3_900_000_000.0),
        model_cost.ModelCost("b", (28, 28, 1), 5, 10, 0, None),
    ]
    text = model_cost.format_table(rows).splitlines()
    header = ["model", "input", "params", "GMACs", "pad GMACs", "XLA GFLOPs", "XLA/2MACs", "other GFLOPs"]
    assert [cell.strip() for cell in text[0].split("  ") if cell.strip()] == header  # 2 spaces between columns
    assert text[2].split() == ["a", "32x32x3", "1,234", "2.000", "0.100", "3.900", "0.975", "0.100"]
    assert text[3].split()[-3:] == ["n/a", "n/a", "n/a"]
    markdown = model_cost.format_table(rows, markdown=True).splitlines()
    assert markdown[0].startswith("| model | input | params |") and markdown[1].startswith("|---|---|---:|")
    assert len(markdown) == 2 + len(rows)


def test_the_command_prints_a_row_per_model_and_bad_input_is_a_one_line_error():
    def run(*args):
        command = [sys.executable, "-m", "attnjax.compare.model_cost", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)

    ok = run("--models", "attention_net,resnet18", "--size", "32", "--no-progress")
    assert ok.returncode == 0, ok.stderr[-3000:]
    lines = ok.stdout.splitlines()
    assert [line.split()[:2] for line in lines[3:]] == [["attention_net", "32x32x1"], ["resnet18", "32x32x3"]]
    for args, message in (
        (["--models", "resnet5"], "unknown model(s) resnet5"),
        (["--size", "0"], "--size must be >= 1"),
        (["--models", ","], "unknown model(s) (none given)"),
    ):
        bad = run(*args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
