"""Lambda layer: PyTorch parity (lambda conv and global relative embeddings) in eval and train mode, gradients,
the normalised keys, the heads rule and its properties."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from block_harness import (
    apply_jit,
    assert_train_mode_uses_batch_statistics,
    check_forward,
    check_gradients,
    check_running_stats,
    load,
    sown_maps,
)
from torch import nn
from torch_reference import random_images, random_variables, torch_state_with_stats

from attnjax.blocks.lambda_layer import LambdaLayer, relative_position_lambdas
from attnjax.blocks.primitives import resolve_heads

pytestmark = pytest.mark.torch


class TorchLambda(nn.Module):
    """Bello 2021, multi-query lambda layer (|u| = 1), NCHW, written from the paper's equations.

    q, K, V = three 1x1 convs (no bias) to h*k, k, v channels; q and V batch-normalised; K softmax-normalised over
    the positions; content lambda = K^T V; position lambdas from a lambda convolution (Conv3d with kernel
    (r, r, 1) over (H, W, v)) or from a (2H-1, 2W-1, k) table of relative embeddings indexed by
    context minus query position; y = q (content + position lambda), heads concatenated. Returns (y, K).
    """

    def __init__(self, channels, heads, key_depth=16, r=9, size=None):
        super().__init__()
        self.heads, self.k, self.v = heads, key_depth, channels // heads
        self.query = nn.Conv2d(channels, heads * key_depth, 1, bias=False)
        self.key = nn.Conv2d(channels, key_depth, 1, bias=False)
        self.value = nn.Conv2d(channels, self.v, 1, bias=False)
        self.norm_q = nn.BatchNorm2d(heads * key_depth)
        self.norm_v = nn.BatchNorm2d(self.v)
        if r is None:
            self.embedding = nn.Parameter(torch.zeros(2 * size[0] - 1, 2 * size[1] - 1, key_depth))
            self.lambda_conv = None
        else:
            self.lambda_conv = nn.Conv3d(1, key_depth, (r, r, 1), padding=(r // 2, r // 2, 0), bias=False)

    def forward(self, x):
        n, _, h, w = x.shape
        m, heads, k, v = h * w, self.heads, self.k, self.v
        q, keys, values = self.query(x), self.key(x), self.value(x)
        q = self.norm_q(q).reshape(n, heads, k, m)
        values = self.norm_v(values)  # (n, v, h, w)
        keys = torch.softmax(keys.reshape(n, k, m), dim=-1)
        content = torch.einsum("nkm,nvm->nkv", keys, values.reshape(n, v, m))
        if self.lambda_conv is not None:
            position = self.lambda_conv(values.permute(0, 2, 3, 1).unsqueeze(1))  # (n, k, h, w, v)
            position = position.reshape(n, k, m, v)  # [n, k, query, v]
        else:
            ys, xs = (t.reshape(-1) for t in torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
            table = self.embedding[ys[None, :] - ys[:, None] + h - 1, xs[None, :] - xs[:, None] + w - 1]  # (n, m, k)
            position = torch.einsum("ijk,nvj->nkiv", table, values.reshape(n, v, m))
        y = torch.einsum("nhki,nkv->nhvi", q, content) + torch.einsum("nhki,nkiv->nhvi", q, position)
        return y.reshape(n, heads * v, h, w), keys.reshape(n, k, h, w)


def paper_heads(channels, default=4):
    """The largest divisor of C that is at most the default 4 heads."""
    return max(d for d in range(1, default + 1) if channels % d == 0)


def init(block, x, seed=0):
    """Random variables; the table's entries scaled by 1/sqrt(its size), so that the position lambdas (sums over
    up to r*r or (2H-1)(2W-1) offsets) and the outputs stay of order 1 and float32 rounding well under 1e-5."""
    variables = random_variables(block, x, seed, scale_range=(0.5, 2.0))
    table = variables["params"]["embedding"]
    return {
        **variables,
        "params": {**variables["params"], "embedding": table / np.sqrt(table.shape[0] * table.shape[1])},
    }


def to_torch_state(variables, local):
    """The Flax variables as the reference's state dict; the (r, r, k) table becomes the Conv3d's (k, 1, r, r, 1)."""
    params = dict(variables["params"])
    table = np.asarray(params.pop("embedding"))
    state = torch_state_with_stats({"params": params, "batch_stats": variables["batch_stats"]})
    table = table.transpose(2, 0, 1)[:, None, :, :, None] if local else table
    state["lambda_conv.weight" if local else "embedding"] = torch.from_numpy(np.array(table))
    return state


def is_local(options):
    return options.get("position_embedding", "local") == "local"


def state_for(options):
    return functools.partial(to_torch_state, local=is_local(options))


def reference_for(variables, shape, options):
    r = options.get("r", 9) if is_local(options) else None
    reference = TorchLambda(shape[-1], paper_heads(shape[-1], options.get("max_heads", 4)), r=r, size=shape[1:3])
    return load(reference, variables, state_for(options))


GLOBAL = {"position_embedding": "global"}
# Odd sizes and C (13, 37: one head; 3: three heads of depth 1), maps larger than the 9 x 9 window, r = 3.
CASES = [
    ((2, 8, 8, 64), {}),
    ((1, 7, 7, 13), {}),
    ((2, 5, 9, 37), {}),
    ((3, 1, 1, 3), {}),
    ((2, 12, 11, 16), {}),
    ((2, 6, 7, 6), {"r": 3}),
    ((2, 5, 7, 12), GLOBAL),
    ((1, 1, 1, 3), GLOBAL),
    ((2, 4, 3, 37), GLOBAL),
]
IDS = [f"{'x'.join(map(str, s))}-{o.get('position_embedding', 'local')}{o.get('r', '')}" for s, o in CASES]


def setup_lambda(shape, options, seed, variables_seed=0):
    x = random_images(shape, seed=seed)
    block = LambdaLayer(**options)
    variables = init(block, x, variables_seed)
    return block, x, variables, reference_for(variables, shape, options)


@pytest.mark.parametrize("shape, options", CASES, ids=IDS)
def test_matches_pytorch_in_eval_mode_with_running_statistics(shape, options):
    check_forward(*setup_lambda(shape, options, seed=2), maps=["keys"])


@pytest.mark.parametrize("shape, options", [CASES[0], CASES[4], CASES[6], ((2, 1, 1, 3), {})], ids=str)
def test_matches_pytorch_in_train_mode_with_batch_statistics(shape, options):
    """In float64, so that the comparison is of the math, not of float32 rounding in batch statistics."""
    block, x, variables, reference = setup_lambda(shape, options, seed=3)
    _, state = check_forward(block, x, variables, reference, maps=["keys"], train=True, float64=True)
    # Flax's momentum 0.9 = PyTorch's 0.1; PyTorch's running variance is unbiased
    check_running_stats(state, reference)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "shape, options", [((2, 6, 7, 12), {"r": 5}), ((2, 4, 5, 13), GLOBAL)], ids=["local", "global"]
)
def test_gradients_match_pytorch(shape, options, train):
    """Gradients of sum(y * r) with respect to the input and every parameter, against torch's autograd (float64)."""
    block, x, variables, reference = setup_lambda(shape, options, seed=5, variables_seed=7)
    cotangent = random_images(shape, seed=6)
    check_gradients(block, x, variables, reference, cotangent, to_state=state_for(options), train=train, float64=True)


@pytest.mark.parametrize("shape", [(2, 7, 7, 13), (2, 1, 1, 3), (3, 5, 9, 37)])
def test_default_block_keeps_the_shape_and_keys_are_softmaxes_over_positions(shape):
    x = random_images(shape, seed=4)
    block = LambdaLayer()
    variables = init(block, x)
    for train in (False, True):
        y, state = apply_jit(block, variables, x, train)
        keys = sown_maps(state)["keys"]
        chex.assert_shape(y, shape)
        chex.assert_shape(keys, (*shape[:3], 16))
        chex.assert_tree_all_finite((y, keys))
        assert jnp.all(keys >= 0)
        np.testing.assert_allclose(keys.sum(axis=(1, 2)), np.ones((shape[0], 16)), rtol=1e-5)


@pytest.mark.parametrize(
    "channels, heads", [(64, 4), (16, 4), (13, 1), (37, 1), (3, 3), (6, 3), (2, 2), (1, 1), (12, 4), (10, 2)]
)
def test_heads_are_the_largest_divisor_of_c_up_to_four(channels, heads):
    assert resolve_heads(channels, None, 4, "LambdaLayer") == heads == paper_heads(channels)
    params = jax.eval_shape(LambdaLayer().init, jax.random.key(0), jnp.zeros((1, 3, 3, channels)))["params"]
    v = channels // heads
    chex.assert_shape(params["query"]["kernel"], (1, 1, channels, heads * 16))
    chex.assert_shape(params["key"]["kernel"], (1, 1, channels, 16))
    chex.assert_shape(params["value"]["kernel"], (1, 1, channels, v))
    chex.assert_shape(params["norm_q"]["scale"], (heads * 16,))
    chex.assert_shape(params["norm_v"]["scale"], (v,))
    chex.assert_shape(params["embedding"], (9, 9, 16))


def test_options_set_the_depths_and_the_table():
    x = jnp.zeros((1, 5, 6, 24))
    params = jax.eval_shape(LambdaLayer(num_heads=8, dim_head=4, r=3).init, jax.random.key(0), x)["params"]
    assert params == jax.eval_shape(LambdaLayer(max_heads=8, dim_head=4, r=3).init, jax.random.key(0), x)["params"]
    chex.assert_shape(params["query"]["kernel"], (1, 1, 24, 8 * 4))
    chex.assert_shape(params["key"]["kernel"], (1, 1, 24, 4))
    chex.assert_shape(params["value"]["kernel"], (1, 1, 24, 3))
    chex.assert_shape(params["embedding"], (3, 3, 4))
    params = jax.eval_shape(LambdaLayer(position_embedding="global").init, jax.random.key(0), x)["params"]
    chex.assert_shape(params["embedding"], (9, 11, 16))


def test_flax_init_and_train_mode_uses_batch_statistics():
    variables = assert_train_mode_uses_batch_statistics(LambdaLayer(), random_images((2, 6, 6, 16), seed=11), "norm_v")
    # The local table's std is 1/sqrt(r*r*k), its fan-in (a truncated normal: a little less).
    np.testing.assert_allclose(np.std(variables["params"]["embedding"]), (81 * 16) ** -0.5, rtol=0.15)


def test_a_lambda_conv_covering_the_map_equals_the_global_table_cut_from_its_kernel():
    shape = (2, 4, 5, 12)
    x = random_images(shape, seed=12)
    local, global_ = LambdaLayer(r=9), LambdaLayer(**GLOBAL)
    variables = init(local, x)
    h, w = shape[1:3]
    table = variables["params"]["embedding"][4 - (h - 1) : 4 + h, 4 - (w - 1) : 4 + w]  # offsets -(H-1) .. H-1
    global_variables = {**variables, "params": {**variables["params"], "embedding": table}}
    np.testing.assert_allclose(
        apply_jit(local, variables, x)[0], apply_jit(global_, global_variables, x)[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("table_shape", [(3, 3, 2), (5, 1, 3), (1, 7, 2), (7, 9, 2)])
def test_relative_position_lambdas_formula(table_shape):
    """lambda_p[n, y, x] = sum over in-map (i, j) of E[i - y + rh//2, j - x + rw//2]^T V[n, i, j]."""
    rh, rw, k = table_shape
    table = random_images(table_shape, seed=13)
    values = random_images((2, 4, 5, 3), seed=14)
    got = relative_position_lambdas(jnp.asarray(table), jnp.asarray(values))
    n, h, w, v = values.shape
    expected = np.zeros((n, h, w, k, v))
    for y in range(h):
        for x in range(w):
            for i in range(h):
                for j in range(w):
                    a, b = i - y + rh // 2, j - x + rw // 2
                    if 0 <= a < rh and 0 <= b < rw:
                        expected[:, y, x] += table[a, b][None, :, None] * values[:, i, j][:, None, :]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_global_table_is_made_for_one_size():
    block = LambdaLayer(position_embedding="global")
    variables = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 4, 4, 8)))
    jax.eval_shape(block.apply, variables, jnp.zeros((3, 4, 4, 8)))  # any batch
    with pytest.raises(ValueError, match=r"shape \(7, 7, 16\), made for 4x4 maps .*got 5x4 maps"):
        jax.eval_shape(block.apply, variables, jnp.zeros((1, 5, 4, 8)))
