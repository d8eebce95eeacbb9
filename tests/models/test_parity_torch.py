"""AttentionNet against an independent PyTorch 2.13 implementation of the tutorial's network.

The same weights go into both; the logits and the gradients of the softmax cross-entropy
must agree to 1e-5 in float32, and so must every parameter after one Adam step (lr 1e-3).

The Adam step is compared in float64. Adam's first update is ``lr * g / (|g| + 1e-8)``,
about ``lr * sign(g)``: for the few weights whose gradient is near 1e-8 it turns float32
rounding differences between any two correct implementations (summation order) into
differences of up to ``lr``. Float64 removes that rounding noise, so what remains to be
compared is the math: the model, the loss, the gradients and Adam.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from attnjax import blocks, models
from attnjax.compare.pytorch import (
    TorchAttentionNet,
    TorchSeedAttention,
    TorchSoftmaxAttention,
    flax_to_torch_state,
    nhwc_to_nchw,
)
from attnjax.train import TrainState, create_train_state, cross_entropy_loss, train_step

CASES = [
    ((8, 8, 3), "seed"),
    ((8, 8, 3), "softmax"),
    ((8, 8, 3), None),
    ((32, 32, 3), "seed"),
    ((28, 28, 1), "softmax"),
]
TOL = 1e-5


def setup(image_shape, block, batch=16, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, (batch, *image_shape)).astype(dtype)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    net = models.create("attention_net", num_classes=10, block=block or "none", dtype=dtype)
    state = create_train_state(jax.random.key(seed), net, image_shape, learning_rate=1e-3)
    if dtype != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(dtype), state.params)
        state = TrainState.create(apply_fn=state.apply_fn, params=params, tx=optax.adam(1e-3))
    reference = TorchAttentionNet(image_shape[-1], image_shape[:2], num_classes=10, block=block)
    reference.load_state_dict(flax_to_torch_state(state.params, reference.final_size), strict=True)
    return images, labels, state, reference.to(torch.float64 if dtype == jnp.float64 else torch.float32)


def torch_loss(reference, images, labels):
    logits = reference(nhwc_to_nchw(images).to(next(reference.parameters()).dtype))
    return F.cross_entropy(logits, torch.from_numpy(labels).long())


def assert_state_equal(torch_state, expected, tol=TOL):
    assert set(torch_state) == set(expected)
    for name, tensor in torch_state.items():
        np.testing.assert_allclose(tensor.detach().numpy(), expected[name].numpy(), rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("image_shape, block", CASES)
def test_logits_match_pytorch(image_shape, block):
    images, _, state, reference = setup(image_shape, block)
    logits = state.apply_fn({"params": state.params}, images)
    with torch.no_grad():
        expected = reference(nhwc_to_nchw(images)).numpy()
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("image_shape, block", CASES)
def test_gradients_match_pytorch(image_shape, block):
    images, labels, state, reference = setup(image_shape, block)

    def loss_fn(params):
        return cross_entropy_loss(state.apply_fn({"params": params}, images), labels)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    expected_loss = torch_loss(reference, images, labels)
    expected_loss.backward()
    np.testing.assert_allclose(float(loss), expected_loss.item(), rtol=TOL)
    expected = {name: p.grad for name, p in reference.named_parameters()}
    assert_state_equal(expected, flax_to_torch_state(grads, reference.final_size))


@pytest.mark.parametrize("image_shape, block", CASES)
def test_one_adam_step_matches_pytorch(image_shape, block):
    with jax.enable_x64(True):
        images, labels, state, reference = setup(image_shape, block, dtype=jnp.float64)
        state, metrics = jax.jit(train_step)(state, {"image": images, "label": labels})
        new_params = jax.tree.map(np.asarray, state.params)

    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3)
    loss = torch_loss(reference, images, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=TOL)
    assert_state_equal(reference.state_dict(), flax_to_torch_state(new_params, reference.final_size))


@pytest.mark.parametrize("name, reference_cls", [("seed", TorchSeedAttention), ("softmax", TorchSoftmaxAttention)])
@pytest.mark.parametrize("shape", [(2, 8, 8, 64), (1, 5, 7, 12)])
def test_blocks_match_pytorch(name, reference_cls, shape):
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    block = blocks.create(name)
    params = block.init(jax.random.key(2), jnp.asarray(x))["params"]
    reference = reference_cls(shape[-1])
    reference.load_state_dict(flax_to_torch_state(params), strict=True)
    with torch.no_grad():
        expected = reference(nhwc_to_nchw(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(block.apply({"params": params}, x)), expected, rtol=TOL, atol=TOL)
