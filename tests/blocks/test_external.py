"""ExternalAttention: outputs, map and batch-norm statistics against a PyTorch block written from the paper (eval
and train mode), and its properties.

Train mode is compared in float64, as for BAM (tests/blocks/test_bam.py explains why): batch norm over a small
batch amplifies float32 rounding differences between any two correct implementations.
"""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from block_harness import check_forward, check_running_stats, plain, random_maps, setup
from jax.test_util import check_grads
from torch import nn
from torch_reference import random_images, torch_state_with_stats

from attnjax.blocks.external import ExternalAttention, double_normalisation, external_attention

pytestmark = pytest.mark.torch
PROPERTY_SHAPES = [(2, 8, 8, 64), (2, 7, 7, 13), (2, 1, 1, 3), (3, 5, 9, 37)]
PARITY_SHAPES = [(2, 8, 8, 32), (3, 7, 5, 20), (2, 1, 1, 12), (2, 3, 10, 13)]


class TorchExternalAttention(nn.Module):
    """Guo et al. 2021, NCHW, in the official code's residual unit.

    F = conv1x1(x) as (N, HW, C); A = softmax over the positions of F M_k, then divided by (1e-9 + its sum over
    the S memory units); y = relu(x + BN(conv1x1(A M_v))). Returns (y, A as (N, H, W, S)).
    """

    def __init__(self, channels: int, memory_units: int = 64):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, channels, 1)
        self.memory_key = nn.Linear(channels, memory_units, bias=False)
        self.memory_value = nn.Linear(memory_units, channels, bias=False)
        self.conv_out = nn.Conv2d(channels, channels, 1, bias=False)
        self.conv_out_bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        n, c, h, w = x.shape
        f = self.conv_in(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        a = torch.softmax(self.memory_key(f), dim=1)  # over the positions
        a = a / (1e-9 + a.sum(dim=2, keepdim=True))  # l1 over the memory units
        out = self.memory_value(a).transpose(1, 2).reshape(n, c, h, w)
        y = F.relu(x + self.conv_out_bn(self.conv_out(out)))
        return y, a.reshape(n, h, w, -1)


def to_torch_state(variables):
    """Flax variables as a PyTorch state dict; the (C, S) and (S, C) memories become Linear weights (out, in)."""
    params = dict(variables["params"])
    memory_key, memory_value = params.pop("memory_key"), params.pop("memory_value")
    state = torch_state_with_stats({**variables, "params": params})
    state["memory_key.weight"] = torch.from_numpy(np.ascontiguousarray(np.asarray(memory_key).T))
    state["memory_value.weight"] = torch.from_numpy(np.ascontiguousarray(np.asarray(memory_value).T))
    return state


def setup_external(shape, seed=0):
    block = ExternalAttention()
    return block, *setup(block, TorchExternalAttention(shape[-1]), shape, seed, to_state=to_torch_state)


@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_eval_mode_matches_pytorch_with_running_statistics(shape):
    check_forward(*setup_external(shape), maps=[("attention", plain)])


@pytest.mark.parametrize("shape", PARITY_SHAPES[1:])
def test_train_mode_matches_pytorch_and_updates_the_same_running_statistics(shape):
    block, x, variables, reference = setup_external(shape, seed=5)
    _, state = check_forward(block, x, variables, reference, maps=[("attention", plain)], train=True, float64=True)
    n, h, w, _ = shape
    check_running_stats(state, reference, old=variables["batch_stats"], counts=lambda name: n * h * w)


@pytest.mark.parametrize("shape", PROPERTY_SHAPES)
def test_shape_and_doubly_normalised_map(shape):
    x, y, maps = random_maps(ExternalAttention(), shape)  # the default options, as blocks.create("external") builds it
    assert list(maps) == ["attention"]
    attention = maps["attention"]
    n, h, w, _ = shape
    chex.assert_shape(y, shape)
    chex.assert_shape(attention, (n, h, w, 64))
    chex.assert_tree_all_finite((y, attention))
    assert jnp.all(y >= 0)  # the final ReLU
    assert jnp.all(attention >= 0)
    np.testing.assert_allclose(attention.sum(axis=-1), np.ones((n, h, w)), rtol=1e-5)


def test_init_ties_the_memories_and_draws_them_from_the_official_distribution():
    x = random_images((2, 3, 5, 20))
    block = ExternalAttention(memory_units=48)
    variables = jax.jit(block.init)(jax.random.key(0), x)
    params = variables["params"]
    chex.assert_shape(params["memory_key"], (20, 48))
    chex.assert_shape(params["memory_value"], (48, 20))
    np.testing.assert_array_equal(params["memory_value"], params["memory_key"].T)
    assert 0.5 < float(jnp.std(params["memory_key"])) / np.sqrt(2 / 20) < 1.5
    chex.assert_shape(params["conv_in"]["kernel"], (1, 1, 20, 20))
    assert set(params["conv_out"]) == {"kernel"}  # no bias before the BN
    assert set(variables["batch_stats"]) == {"conv_out_bn"}
    y, state = jax.jit(partial(block.apply, mutable=["intermediates"]))(variables, x)
    chex.assert_shape(state["intermediates"]["attention"][0], (2, 3, 5, 48))
    y_train, _ = jax.jit(partial(block.apply, train=True, mutable=["batch_stats"]))(variables, x)
    chex.assert_tree_all_finite((y, y_train))


def test_external_attention_formula_and_gradients():
    f = random_images((2, 3, 4, 5))
    memory_key = random_images((5, 6), seed=1)
    memory_value = random_images((6, 5), seed=2)
    out, attention = external_attention(f, memory_key, memory_value)
    logits = np.einsum("nhwc,cs->nhws", f, memory_key)
    e = np.exp(logits - logits.max(axis=(1, 2), keepdims=True))
    softmax = e / e.sum(axis=(1, 2), keepdims=True)  # over the 12 positions
    expected = softmax / (1e-9 + softmax.sum(axis=-1, keepdims=True))  # then over the 6 units
    np.testing.assert_allclose(attention, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out, np.einsum("nhws,sc->nhwc", expected, memory_value), rtol=1e-5, atol=1e-6)
    check_grads(
        jax.jit(external_attention), (f, memory_key, memory_value), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2
    )


def test_double_normalisation_survives_underflow():
    logits = jnp.zeros((1, 2, 2, 3)).at[0, 0, 0, :].set(200.0)  # every other position's weights underflow to 0
    a = double_normalisation(logits)
    chex.assert_tree_all_finite(a)
    np.testing.assert_allclose(a[0, 0, 0], np.full(3, 1 / 3), rtol=1e-6)
    np.testing.assert_array_equal(a[0, 1:], 0.0)  # 0 / (1e-9 + 0), where 0 / 0 would be NaN
