"""SK (selective kernel): PyTorch parity in eval and train mode, branch weights, groups, shapes, gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import apply_jit, assert_train_mode_uses_batch_statistics, check_forward, check_running_stats, load
from jax.test_util import check_grads
from torch import nn
from torch_reference import random_images, random_variables

from attnjax.blocks import SelectiveKernelAttention
from attnjax.blocks.sk import select_kernels, sk_groups

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


def reference_for(x, variables):
    return load(TorchSK(x.shape[-1], *paper_widths(x.shape[-1])), variables)


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
    # The running means move the same way (momentum 0.9 here = 0.1 in PyTorch). The running
    # variances are not compared: PyTorch accumulates the unbiased batch variance, Flax the biased one.
    check_running_stats(state, reference)


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
    params = jax.eval_shape(BLOCK.init, jax.random.key(0), jnp.zeros((1, 3, 3, channels)))["params"]
    for m in (0, 1):
        chex.assert_shape(params[f"conv_{m}"]["kernel"], (3, 3, channels // groups, channels))
        chex.assert_shape(params[f"select_{m}"]["kernel"], (hidden, channels))
    chex.assert_shape(params["fuse"]["kernel"], (channels, hidden))


def test_more_branches_follow_the_dilations():
    x = jnp.zeros((2, 5, 5, 8))
    block = SelectiveKernelAttention(dilations=(1, 2, 3))
    variables = jax.eval_shape(block.init, jax.random.key(0), x)
    assert {f"conv_{m}" for m in range(3)} <= set(variables["params"])
    weights = jax.eval_shape(lambda v: block.apply(v, x, mutable=["intermediates"])[1], variables)
    chex.assert_shape(weights["intermediates"]["attention"][0], (2, 1, 1, 8, 3))


def test_flax_init_and_train_mode_uses_batch_statistics_and_updates_running_averages():
    assert_train_mode_uses_batch_statistics(BLOCK, random_images((2, 4, 4, 20), seed=5), "bn_0")


def test_select_kernels_formula_and_gradients():
    branches = random_images((2, 3, 4, 5, 2), seed=6)
    logits = random_images((2, 1, 1, 5, 2), seed=7)
    y, weights = select_kernels(branches, logits)
    expected_a = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(weights, expected_a, rtol=1e-5)
    np.testing.assert_allclose(y, (expected_a * np.asarray(branches)).sum(-1), rtol=1e-5, atol=1e-6)
    check_grads(jax.jit(select_kernels), (branches, logits), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
