"""Squeeze-and-Excitation: a channel gate from globally pooled features.

Paper: Jie Hu, Li Shen and Gang Sun (2018), "Squeeze-and-Excitation Networks", CVPR.

What it computes, for NHWC ``x`` with C channels::

    z = mean over (H, W) of x                       squeeze: (N, 1, 1, C)
    s = sigmoid(W2 relu(W1 z + b1) + b2)            excitation: FC C -> C/r -> C, r = 16
    y = x * s                                       scale every channel of the input

Sown map: ``intermediates/attention``, the channel gate ``s`` of shape (N, 1, 1, C), in (0, 1) (in [0, 1]
with ``gate_layer="hard_sigmoid"``).

Deviation from the paper: the bottleneck width is ``reduced_channels(C, r) = max(C // r, min(C, 8))``
instead of ``C / r``. It equals the paper's width for C >= 128 (r = 16); below that ``C // 16`` would be
tiny or 0 (C=12 gives 0), so the floor keeps at least 8 units, as timm's SE does, without exceeding C.

Naming and options, against timm 1.0.29 (``timm/layers/squeeze_excite.py``, ``SEModule``, which is
``create_attn('se', C)``, the block of timm's ``seresnet*``/``seresnext*``). The defaults are attnjax's;
timm's options, under timm's names:

- ``rd_ratio``, ``rd_channels``, ``rd_divisor``: timm's width rule instead of ``reduction``'s (giving both is an
  error): ``rd_channels`` if given, else ``make_divisible(C * rd_ratio, rd_divisor, round_limit=0)``, C *
  ``rd_ratio`` rounded to the nearest multiple of ``rd_divisor``, at least ``rd_divisor``. Once one of the three
  is given, the others default to timm's SE defaults, ``rd_ratio=1/16`` and ``rd_divisor=8``
  (:func:`attnjax.blocks.primitives.timm_reduced_channels`);
- ``bias``: the two FCs' biases b1, b2 (timm's ``bias``, default True);
- ``add_maxpool``: squeeze with ``0.5 * mean + 0.5 * max`` over (H, W) (timm's experimental ``add_maxpool``);
- ``act_layer``: the hidden activation by timm's name (``relu``, default; ``silu``, ``gelu``, ...:
  :data:`attnjax.blocks.primitives.ACTIVATIONS`);
- ``gate_layer``: ``sigmoid`` (default) or ``hard_sigmoid`` = relu6(t + 3) / 6.

timm's ``norm_layer`` (a norm between the FCs, off by default) is not offered. Parameters: ``reduce`` and
``expand`` are timm's ``fc1`` and ``fc2`` (1x1 convs there, Dense here: the kernel transposed, see
:mod:`attnjax.models.timm_weights`). ``SqueezeExcitation(rd_ratio=1/16, rd_divisor=8)`` is timm's default
``SEModule`` for every C; attnjax's default has the same widths wherever C is a multiple of 128, and at C = 64
(both 8), so at every site of timm's SE-ResNets.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from attnjax.blocks.primitives import (
    activation_function,
    excitation_mlp,
    gate_function,
    global_avg_pool,
    global_max_pool,
    reduced_channels,
    refuse_both_width_rules,
    sow_map,
    timm_reduced_channels,
)
from attnjax.validate import check_nhwc

TIMM_RD_RATIO = 1 / 16  # timm's SEModule defaults, used once one of its width options is given
TIMM_RD_DIVISOR = 8
DEFAULT_REDUCTION = 16


def se_width(
    channels: int, reduction: int, rd_ratio: float | None, rd_channels: int | None, rd_divisor: int | None
) -> int:
    """SE's hidden width: attnjax's ``reduced_channels(C, reduction)``, or timm's rule once one of ``rd_ratio``,
    ``rd_channels``, ``rd_divisor`` is given (the others then take timm's SE defaults 1/16 and 8)."""
    if rd_ratio is None and rd_channels is None and rd_divisor is None:
        return reduced_channels(channels, reduction)
    refuse_both_width_rules(reduction=(reduction, DEFAULT_REDUCTION))
    return timm_reduced_channels(
        channels,
        TIMM_RD_RATIO if rd_ratio is None else rd_ratio,
        rd_channels,
        TIMM_RD_DIVISOR if rd_divisor is None else rd_divisor,
    )


class SqueezeExcitation(nn.Module):
    """SE block: global average pool, FC C -> C/r, ReLU, FC -> C, sigmoid, times the input.

    NHWC in, same shape out; C is read from the input. Sows the (N, 1, 1, C) gate as
    ``intermediates/attention``. timm's options (``rd_ratio``, ``bias``, ``add_maxpool``, ...): see the module
    docstring.
    """

    reduction: int = DEFAULT_REDUCTION
    rd_ratio: float | None = None  # timm's width rule instead of reduction's: C * rd_ratio (timm: 1/16), ...
    rd_channels: int | None = None  # ... or exactly rd_channels ...
    rd_divisor: int | None = None  # ... rounded to a multiple of rd_divisor (timm: 8)
    bias: bool = True  # the FCs' biases (timm's bias)
    add_maxpool: bool = False  # squeeze with 0.5 * mean + 0.5 * max (timm's add_maxpool)
    act_layer: str = "relu"  # the hidden activation, by timm's name
    gate_layer: str = "sigmoid"  # or "hard_sigmoid"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no batch norm or dropout
        check_nhwc(x, type(self).__name__)
        channels = x.shape[-1]
        hidden = se_width(channels, self.reduction, self.rd_ratio, self.rd_channels, self.rd_divisor)
        activation = activation_function(self.act_layer)
        gate_fn = gate_function(self.gate_layer)
        excitation = excitation_mlp(channels, hidden, self.dtype, use_bias=self.bias, activation=activation)
        z = global_avg_pool(x)
        if self.add_maxpool:
            z = 0.5 * z + 0.5 * global_max_pool(x)
        gate = gate_fn(excitation(z))
        sow_map(self, "attention", gate)
        return x * gate  # as sigmoid_gate: the same promotion as before the timm options
