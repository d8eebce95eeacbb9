"""The tutorial's network in PyTorch, and an attnjax ``attention_net``'s weights loaded into it.

``TorchAttentionNet`` is the tutorial's classifier (conv 64 -> block -> conv 128 -> dense 512 ->
dense K) written in PyTorch's own NCHW layout from the tutorial's description, with the same
documented fixes as attnjax's ``attention_net`` (README, "Deviations"): its ``seed`` and ``softmax``
blocks and its pooling. It is the baseline that ``experiments/bench_step.py`` and
``experiments/bench_cli.py`` time attnjax against, and the independent reference of
``tests/models/test_parity_torch.py``. ``flax_to_torch_state`` turns a trained run's parameters
into its ``state_dict``:

    net = TorchAttentionNet(3, (32, 32), num_classes=10, block="seed")
    net.load_state_dict(flax_to_torch_state(variables["params"], final_hw=(8, 8)))

Needs PyTorch (``pip install torch``), which nothing else in attnjax imports.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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
