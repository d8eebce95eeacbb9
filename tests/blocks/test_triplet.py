"""Triplet attention: PyTorch parity (official rotations) in eval and train mode, gates, shapes, gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from block_harness import apply_jit, check_forward, check_running_stats, setup
from jax.test_util import check_grads
from torch import nn
from torch_reference import random_images, random_variables, torch_state_with_stats

from attnjax.blocks import TripletAttention
from attnjax.blocks.triplet import rotate, rotate_back, triplet_combine, z_pool

pytestmark = pytest.mark.torch

SHAPES = [(2, 8, 8, 64), (1, 7, 7, 16), (3, 1, 1, 32), (2, 5, 9, 24), (2, 4, 6, 5)]
GATE_SHAPES = {  # NHWC shapes of the sown gates, as functions of (N, H, W, C)
    "channel_width": lambda n, h, w, c: (n, 1, w, c),
    "height_channel": lambda n, h, w, c: (n, h, 1, c),
    "height_width": lambda n, h, w, c: (n, h, w, 1),
}


class TorchGate(nn.Module):
    """Z-pool over dim 1 ([max, mean]), 7x7 conv 2 -> 1 without bias, BN, sigmoid; gates its input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x):
        pooled = torch.cat([x.max(dim=1, keepdim=True)[0], x.mean(dim=1, keepdim=True)], dim=1)
        scale = torch.sigmoid(self.bn(self.conv(pooled)))
        return x * scale, scale


class TorchTriplet(nn.Module):
    """Misra et al. 2021, with the official code's rotations, NCHW. Returns the output and the gates in NCHW."""

    def __init__(self):
        super().__init__()
        self.cw, self.hc, self.hw = TorchGate(), TorchGate(), TorchGate()

    def forward(self, x):
        y_cw, s_cw = self.cw(x.permute(0, 2, 1, 3))  # (N, H, C, W): pool H
        y_hc, s_hc = self.hc(x.permute(0, 3, 2, 1))  # (N, W, H, C): pool W
        y_hw, s_hw = self.hw(x)  # pool C
        y = (y_cw.permute(0, 2, 1, 3) + y_hc.permute(0, 3, 2, 1) + y_hw) / 3
        gates = {
            "channel_width": s_cw.permute(0, 2, 1, 3),
            "height_channel": s_hc.permute(0, 3, 2, 1),
            "height_width": s_hw,
        }
        return y, gates


def triplet_module_name(module):
    """The Flax module "cw_conv" is the reference's "cw.conv"."""
    return module.replace("_", ".")


BLOCK = TripletAttention()


def apply(variables, x, train=False):
    """``BLOCK.apply`` under jit, returning ``(y, intermediates, new_batch_stats)``."""
    y, state = apply_jit(BLOCK, variables, x, train)
    return y, state["intermediates"], state.get("batch_stats")


def setup_triplet(shape, seed, variables_seed=0):
    reference = TorchTriplet()
    return setup(
        BLOCK,
        reference,
        shape,
        seed,
        variables_seed=variables_seed,
        to_state=lambda v: torch_state_with_stats(v, triplet_module_name),
        scale_range=(0.5, 2.0),
    )


# Distinct H, W and C, so that a wrong rotation cannot go unnoticed.
@pytest.mark.parametrize("shape", [(2, 8, 8, 16), (2, 5, 9, 24), (1, 7, 4, 11), (3, 1, 1, 32), (2, 4, 6, 5)])
def test_matches_pytorch_in_eval_mode_with_running_statistics(shape):
    check_forward(BLOCK, *setup_triplet(shape, seed=1))


@pytest.mark.parametrize("shape", [(2, 8, 8, 16), (2, 5, 9, 24), (3, 1, 1, 32), (2, 4, 6, 5)])
def test_matches_pytorch_in_train_mode_with_batch_statistics(shape):
    x, variables, reference = setup_triplet(shape, seed=2, variables_seed=1)
    _, state = check_forward(BLOCK, x, variables, reference, train=True)
    # The running means move the same way (Flax momentum 0.99 = PyTorch 0.01, the official
    # code's). Running variances are not compared: PyTorch accumulates the unbiased batch variance.
    check_running_stats(state, reference, module_name=triplet_module_name)


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_sown_gates_and_output_is_the_mean_of_gated_inputs(shape):
    x = random_images(shape, seed=3)
    y, intermediates, _ = apply(random_variables(BLOCK, x, scale_range=(0.5, 2.0)), x)
    chex.assert_shape(y, shape)
    assert sorted(intermediates) == sorted(GATE_SHAPES)
    gates = [intermediates[name][0] for name in GATE_SHAPES]
    for name, gate in zip(GATE_SHAPES, gates, strict=True):
        chex.assert_shape(gate, GATE_SHAPES[name](*shape))
        assert jnp.all(gate >= 0) and jnp.all(gate <= 1), name
    chex.assert_tree_all_finite((y, gates))
    np.testing.assert_allclose(y, sum(x * g for g in gates) / 3, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "axis, unchanged",
    [(1, "channel_width"), (2, "height_channel"), (3, "height_width")],  # H, W, C
)
def test_each_gate_pools_its_axis_away(axis, unchanged):
    """Z-pool is invariant to reordering the pooled axis, so shuffling H leaves the (C, W) gate as it is, etc."""
    shape = (2, 5, 6, 7)
    x = random_images(shape, seed=4)
    variables = random_variables(BLOCK, x, scale_range=(0.5, 2.0))
    shuffled = jnp.take(x, jax.random.permutation(jax.random.key(5), shape[axis]), axis=axis)
    _, gates, _ = apply(variables, x)
    _, gates_shuffled, _ = apply(variables, shuffled)
    for name in GATE_SHAPES:
        same = np.allclose(gates[name][0], gates_shuffled[name][0], atol=1e-6)
        assert same == (name == unchanged), name


def test_no_spatial_drops_the_height_width_branch():
    x = random_images((2, 4, 6, 5), seed=6)
    block = TripletAttention(no_spatial=True)
    variables = block.init(jax.random.key(0), x)  # the block's own initialisation
    assert sorted(variables["params"]) == ["cw_bn", "cw_conv", "hc_bn", "hc_conv"]
    y, state = block.apply(variables, x, mutable=["intermediates"])
    gates = state["intermediates"]
    assert sorted(gates) == ["channel_width", "height_channel"]
    np.testing.assert_allclose(y, (x * gates["channel_width"][0] + x * gates["height_channel"][0]) / 2, rtol=1e-5)


def test_parameters_are_three_bias_free_7x7_convs_and_bns():
    params = jax.eval_shape(BLOCK.init, jax.random.key(0), jnp.zeros((1, 4, 5, 6)))["params"]
    for branch in ("cw", "hc", "hw"):
        assert set(params[f"{branch}_conv"]) == {"kernel"}
        chex.assert_shape(params[f"{branch}_conv"]["kernel"], (7, 7, 2, 1))
        chex.assert_shape((params[f"{branch}_bn"]["scale"], params[f"{branch}_bn"]["bias"]), (1,))


def test_pure_functions():
    x = random_images((2, 3, 4, 5), seed=7)
    pooled = z_pool(x)
    np.testing.assert_allclose(pooled, np.stack([np.max(x, -1), np.mean(x, -1)], -1), rtol=1e-6)
    for branch in ("cw", "hc", "hw"):
        np.testing.assert_array_equal(rotate_back(rotate(x, branch), branch), x)
    gates = [jax.nn.sigmoid(random_images(s, seed=8)) for s in ((2, 1, 4, 5), (2, 3, 1, 5), (2, 3, 4, 1))]
    check_grads(jax.jit(z_pool), (x,), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
    check_grads(jax.jit(triplet_combine), (x, gates), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
