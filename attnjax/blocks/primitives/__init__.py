"""Primitives shared by several blocks: every piece that more than one block uses lives here,
in one module per section (``precision``, ``widths``, ``pooling``, ``relative``, ``strips``); this package
exports them all.

Each is a pure function of arrays or of sizes, or (where it makes layers) a function to call inside a
block's compact method. They are used by the blocks' files and exported from :mod:`attnjax.blocks` for
use in your own modules. The sections:

- the precision rule (softmax and sown maps in float32): :func:`softmax_in_float32`, :func:`sow_map`;
- widths and gates: :func:`reduced_channels`, :func:`sigmoid_gate`, :func:`excitation_mlp`; timm's width
  rules :func:`make_divisible`, :func:`timm_reduced_channels`, :func:`bottleneck_width`, :func:`attention_widths`
  and its activation names :func:`gate_function`, :func:`activation_function`;
- options shared by several blocks, checked once: :func:`odd_size` (kernel sizes), :func:`resolve_heads`
  and :func:`head_widths` (multi-head blocks), :func:`block_batch_norm`;
- pooling over the positions: :func:`global_avg_pool`, :func:`global_max_pool`, :func:`spatial_softmax`,
  :func:`attention_pool`; the spatial gate's conv :func:`spatial_conv`;
- relative position logits (``bottleneck`` and ``halo``): :func:`relative_logits_2d` and its parts;
- timm's ``make_divisible`` width of ``scoord`` and ``bat``: :func:`timm_divisible_width`;
- strips (``coord``, ``scoord``, ``ela``, ``strip``): :func:`directional_pool`, :func:`additive_strip_gate`, and
  the depthwise convs along a strip, :func:`strip_conv` (run as :func:`depthwise_taps`).
"""

from __future__ import annotations

from attnjax.blocks.primitives.pooling import (  # noqa: F401
    SPATIAL_AXES,
    attention_pool,
    global_avg_pool,
    global_max_pool,
    spatial_conv,
    spatial_softmax,
)
from attnjax.blocks.primitives.precision import (  # noqa: F401
    at_least_float32,
    softmax_in_float32,
    sow_map,
)
from attnjax.blocks.primitives.relative import (  # noqa: F401
    attention_logits,
    rel_to_abs,
    relative_logits_1d,
    relative_logits_2d,
    relative_table_size,
    relative_tables,
    scale_for,
    timm_projection,
    truncated_normal_init,
)
from attnjax.blocks.primitives.strips import (  # noqa: F401
    additive_strip_gate,
    depthwise_taps,
    directional_pool,
    strip_conv,
)
from attnjax.blocks.primitives.widths import (  # noqa: F401
    ACTIVATIONS,
    GATES,
    activation_function,
    attention_widths,
    block_batch_norm,
    bottleneck_width,
    excitation_mlp,
    gate_function,
    head_widths,
    make_divisible,
    odd_size,
    reduced_channels,
    refuse_both_width_rules,
    resolve_heads,
    sigmoid_gate,
    timm_divisible_width,
    timm_reduced_channels,
)
