"""Independent PyTorch references for attnjax's blocks and AttentionNet, and weight transfer.

Written from the tutorial's description with the same documented fixes as attnjax (see
README), in PyTorch's own NCHW layout. Nothing here imports attnjax.
"""

from __future__ import annotations

import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnjax.layers import torch_running_var


class TorchSeedAttention(nn.Module):
    """x * sigmoid(conv1x1(relu(conv1x1(x)))), bottleneck max(C // r, min(C, 8))."""

    def __init__(self, channels: int, reduction: int = 8, min_channels: int = 8):
        super().__init__()
        hidden = max(channels // reduction, min(channels, min_channels))
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x))))


class TorchSoftmaxAttention(nn.Module):
    """x + softmax over H*W of (conv1x1(x) * x), per image and channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.weights = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        scores = self.weights(x) * x
        n, c, h, w = scores.shape
        return x + torch.softmax(scores.reshape(n, c, h * w), dim=-1).reshape(n, c, h, w)


BLOCKS = {None: None, "seed": TorchSeedAttention, "softmax": TorchSoftmaxAttention}


def _halve(size: int) -> int:
    return size // 2 if size > 8 else size


def _pool_factors(h: int, w: int):
    """Max-pool windows after conv1 (one) and after conv2 (until both sides are <= 8)."""
    first = (2 if h > 8 else 1, 2 if w > 8 else 1)
    h, w = _halve(h), _halve(w)
    later = []
    while max(h, w) > 8:
        later.append((2 if h > 8 else 1, 2 if w > 8 else 1))
        h, w = _halve(h), _halve(w)
    return first, later, (h, w)


class TorchAttentionNet(nn.Module):
    """conv 64 3x3 -> ReLU -> pool -> block -> conv 128 3x3 -> ReLU -> pools -> fc 512 -> ReLU -> fc K."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int = 10, block: str | None = None):
        super().__init__()
        self.first_pool, self.later_pools, self.final_size = _pool_factors(*image_size)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1)
        self.block = BLOCKS[block](64) if block else None
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128 * self.final_size[0] * self.final_size[1], 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        if self.first_pool != (1, 1):
            x = F.max_pool2d(x, self.first_pool)
        if self.block is not None:
            x = self.block(x)
        x = F.relu(self.conv2(x))
        for window in self.later_pools:
            x = F.max_pool2d(x, window)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def flax_to_torch_state(params, final_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Flax params (HWIO convs, (in, out) dense, NHWC flatten) as a PyTorch state dict.

    ``final_hw`` is the spatial size at the flatten, needed to reorder ``fc1``'s inputs from
    Flax's (h, w, c) order to PyTorch's (c, h, w).
    """
    state = {}

    def visit(tree, prefix):
        for key, value in tree.items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict):
                visit(value, name)
                continue
            value = np.array(value)  # a writable copy, in the parameter's own dtype
            if key == "kernel" and value.ndim == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
                value = value.transpose(3, 2, 0, 1)
            elif key == "kernel" and value.ndim == 2:  # (in, out) -> (out, in)
                if prefix == "fc1" and final_hw is not None:
                    h, w = final_hw
                    c = value.shape[0] // (h * w)
                    value = value.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
                value = value.T
            state[name.replace(".kernel", ".weight") if key == "kernel" else name] = torch.from_numpy(
                np.ascontiguousarray(value)
            )

    visit(params, "")
    return state


def nhwc_to_nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nchw_to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


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
