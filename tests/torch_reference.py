"""What the PyTorch reference tests share: random inputs and variables, and PyTorch state with batch stats.

The tutorial's network in PyTorch and the weight converters are :mod:`attnjax.compare.pytorch`;
each block's reference is in its own test file (tests/blocks/test_<name>.py).
"""

from __future__ import annotations

import jax
import numpy as np
import torch

from attnjax.compare.pytorch import flax_to_torch_state
from attnjax.layers import torch_running_var

# Helpers shared by the blocks' reference tests (tests/blocks/test_<name>.py, through tests/blocks/block_harness.py).

BN_MOMENTUM = 0.9  # Flax's convention (weight of the old average); PyTorch's momentum=0.1 is the same update


def random_images(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def random_variables(block, x, seed=0, scale_range=(0.5, 1.5)) -> dict:
    """Variables of ``block``'s structure for input ``x``, drawn with NumPy (no compilation, unlike ``init``).

    Kernels ~ N(0, 1/fan_in); biases, BN shifts and running means ~ N(0, 0.3^2); norm scales
    uniform in ``scale_range``; running variances in [0.5, 2]: all non-trivial, so that all take
    part in the comparison.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name == "scale":
            value = rng.uniform(*scale_range, leaf.shape)
        elif name == "var":
            value = rng.uniform(0.5, 2.0, leaf.shape)
        else:
            value = 0.3 * rng.normal(size=leaf.shape)
        return value.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(block.init, jax.random.key(0), x))


def torch_state_with_stats(
    variables, module_name=lambda name: name, *, running_var_count=None, steps: int | None = None
) -> dict[str, torch.Tensor]:
    """Flax params and batch_stats as a PyTorch state dict: BN scale -> weight, mean/var -> running_mean/var.

    ``module_name`` maps a Flax module path ("cw_conv") to the PyTorch one ("cw.conv").

    Running variances are copied as they are by default, so that PyTorch normalises exactly as Flax
    in evaluation. Flax's running average takes in the biased batch variance, PyTorch's the unbiased
    one: to get the running variance PyTorch's own training would have stored instead, give
    ``running_var_count``, a function of the Flax module path ("channel_bn") returning the number
    of values per channel that BN averaged in each batch (N*H*W; N on a 1 x 1 map), and ``steps``,
    the training steps taken from a fresh BN (written as ``num_batches_tracked``; None: the long-run
    ratio count / (count - 1)). See :func:`attnjax.layers.torch_running_var`.
    """
    renames = {"scale": "weight", "mean": "running_mean", "var": "running_var"}
    state = {}
    for collection in ("params", "batch_stats"):
        for name, value in flax_to_torch_state(variables.get(collection, {})).items():
            if "." not in name:  # a parameter of the block itself (a table, a scale), not of a layer
                state[name] = value
                continue
            flax_module, key = name.rsplit(".", 1)
            module = module_name(flax_module)
            if key == "var" and running_var_count is not None:
                value = torch_running_var(value, running_var_count(flax_module), steps=steps, momentum=BN_MOMENTUM)
            state[f"{module}.{renames.get(key, key)}"] = value
            if key == "mean":
                state[f"{module}.num_batches_tracked"] = torch.tensor(steps or 0)
    return state


def pytorch_running_var(new, old, count):
    """Flax's running variance ``new``, one step on from ``old``, as PyTorch would store it.

    Both mix the batch variance into the running average with the same momentum, but PyTorch uses the
    unbiased batch variance (divided by count - 1) and Flax the biased one (divided by count).
    """
    return torch_running_var(new, count, steps=1, momentum=BN_MOMENTUM, initial=old)
