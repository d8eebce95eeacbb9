"""Shared layers: batch norm synchronised over the pmap axis equals one device on the global batch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.train import parallel
from attnjax.layers import axis_is_bound, batch_norm


class Norm(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return batch_norm(train)(x)


def test_axis_is_bound_only_inside_pmap(devices):
    assert not axis_is_bound(parallel.AXIS)
    inside = jax.pmap(lambda x: x * axis_is_bound(parallel.AXIS), axis_name=parallel.AXIS)(jnp.ones(len(devices)))
    np.testing.assert_array_equal(inside, np.ones(len(devices)))


def test_batch_norm_under_pmap_normalises_over_the_global_batch(devices):
    # Per-device means differ a lot, so unsynchronised batch norm would give other outputs.
    x = np.random.default_rng(0).normal(size=(32, 3, 3, 4)).astype(np.float32) + np.arange(32)[:, None, None, None]
    variables = Norm().init(jax.random.key(0), x, train=False)

    single, single_state = Norm().apply(variables, x, train=True, mutable=["batch_stats"])

    p_step = jax.pmap(
        lambda v, b: Norm().apply(v, b, train=True, mutable=["batch_stats"]),
        axis_name=parallel.AXIS,
        in_axes=(None, 0),
        out_axes=(0, None),
    )
    sharded, sharded_state = p_step(parallel.replicate(variables, devices), parallel.shard({"x": x}, len(devices))["x"])
    np.testing.assert_allclose(np.asarray(sharded).reshape(x.shape), single, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(sharded_state), jax.tree.leaves(single_state), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_batch_norm_in_eval_uses_running_averages():
    x = np.random.default_rng(1).normal(size=(4, 2, 2, 3)).astype(np.float32) * 5 + 2
    variables = Norm().init(jax.random.key(0), x, train=False)
    np.testing.assert_allclose(Norm().apply(variables, x, train=False), x / np.sqrt(1 + 1e-5), rtol=1e-5)


def test_batch_norm_axis_name_is_a_plain_argument(devices):
    """A block may synchronise over an axis of another name, or never; the library does not import the trainer."""
    import subprocess
    import sys

    x = np.random.default_rng(1).normal(size=(8, 2, 2, 3)).astype(np.float32) + np.arange(8)[:, None, None, None]

    class Named(nn.Module):
        axis_name: str | None

        @nn.compact
        def __call__(self, x):
            return batch_norm(True, axis_name=self.axis_name)(x)

    variables = Named("devices").init(jax.random.key(0), x)
    single = Named("devices").apply(variables, x, mutable=["batch_stats"])[0]

    def mapped(axis_name):
        return jax.pmap(
            lambda b: Named(axis_name).apply(variables, b, mutable=["batch_stats"])[0], axis_name="devices"
        )(x.reshape(len(devices), -1, *x.shape[1:])).reshape(x.shape)

    np.testing.assert_allclose(mapped("devices"), single, rtol=1e-5, atol=1e-5)  # synchronised over "devices"
    assert not np.allclose(mapped(None), single, atol=1e-3)  # per-device statistics: other outputs
    code = (
        "import sys, attnjax.blocks, attnjax.layers; print(sorted(m for m in sys.modules if m.startswith('attnjax')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "attnjax.parallel" not in loaded and "attnjax.train" not in loaded, loaded


def test_the_host_passes_its_axis_name_to_the_blocks_batch_norm(devices):
    """A model's ``axis_name`` reaches its block's batch norms: set to the mapped axis, N devices equal one."""
    from attnjax import models

    x = np.random.default_rng(2).normal(size=(16, 4, 4, 3)).astype(np.float32) + np.arange(16)[:, None, None, None]

    def outputs(axis_name, mapped):
        net = models.create("attention_net", num_classes=3, block="coord", axis_name=axis_name)
        variables = net.init(jax.random.key(0), x[:1])

        def apply(v, b):
            return net.apply(v, b, train=True, mutable=["batch_stats"])[0]

        if not mapped:
            return apply(variables, x)
        stacked = x.reshape(len(devices), -1, *x.shape[1:])
        return jax.pmap(apply, axis_name="devices", in_axes=(None, 0))(variables, stacked).reshape(16, 3)

    single = outputs("devices", mapped=False)
    np.testing.assert_allclose(outputs("devices", mapped=True), single, rtol=1e-4, atol=1e-5)
    assert not np.allclose(outputs(None, mapped=True), single, atol=1e-4)  # per-device statistics


class MomentumNorm(nn.Module):
    momentum: float

    @nn.compact
    def __call__(self, x, train):
        return batch_norm(train, momentum=self.momentum)(x)


@pytest.mark.parametrize("shape", [(2, 1, 1, 4), (3, 4, 5, 4)])  # n = 2 values per channel (BAM's, SK's FCs), 60
@pytest.mark.torch  # the one test here that imports PyTorch (inside it)
@pytest.mark.parametrize("momentum", [0.9, 0.99])  # the blocks' default and triplet's
def test_running_var_conversion_matches_a_torch_batch_norm_trained_on_the_same_batches(shape, momentum):
    """Flax keeps the biased batch variance in its running average, PyTorch the unbiased one; the helpers convert."""
    import torch

    from attnjax.layers import flax_running_var, torch_running_var

    rng = np.random.default_rng(3)
    batches = [(rng.normal(size=shape) * 2 + 1).astype(np.float32) for _ in range(3)]
    norm = MomentumNorm(momentum)
    variables = norm.init(jax.random.key(0), batches[0], train=False)
    reference = torch.nn.BatchNorm2d(shape[-1], momentum=1 - momentum).train()
    for x in batches:
        y, state = norm.apply(variables, x, train=True, mutable=["batch_stats"])
        variables = {**variables, **state}
        with torch.no_grad():
            expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)  # outputs agree

    n, steps = int(np.prod(shape[:-1])), len(batches)
    flax_var, torch_var = np.asarray(variables["batch_stats"]["BatchNorm_0"]["var"]), reference.running_var.numpy()
    assert int(reference.num_batches_tracked) == steps
    assert not np.allclose(flax_var, torch_var, rtol=1e-3)  # the running variances do not
    convert = {"count": n, "steps": steps, "momentum": momentum}
    np.testing.assert_allclose(torch_running_var(flax_var, **convert), torch_var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flax_running_var(torch_var, **convert), flax_var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        variables["batch_stats"]["BatchNorm_0"]["mean"], reference.running_mean.numpy(), rtol=1e-5, atol=1e-6
    )
    # Long-run limit (steps=None): the ratio n / (n - 1), once the start has faded.
    np.testing.assert_allclose(torch_running_var(flax_var, n) / flax_var, n / (n - 1), rtol=1e-6)
    np.testing.assert_allclose(flax_running_var(torch_running_var(flax_var, n), n), flax_var, rtol=1e-6)
