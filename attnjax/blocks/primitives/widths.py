"""Widths, gates and the options several blocks share: attnjax's width rules and timm's.

Part of :mod:`attnjax.blocks.primitives`, which exports every name.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from attnjax.layers import batch_norm
from attnjax.validate import InputError

# Widths and gates.


def reduced_channels(channels: int, reduction: int, min_channels: int = 8) -> int:
    """Bottleneck width ``max(C // r, min(C, min_channels))``.

    ``C // r`` alone collapses to 0 for small C (C=3 with r=8); the floor keeps at least
    ``min_channels`` (as timm's SE does), but never widens past C itself.
    """
    if reduction < 1:
        raise InputError(f"reduction must be >= 1, got {reduction}")
    if min_channels < 1:
        raise InputError(f"min_channels must be >= 1, got {min_channels}")
    return max(channels // reduction, min(channels, min_channels))


def sigmoid_gate(x: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gate ``x`` by ``logits``: ``g = sigmoid(logits)``, ``y = x * g``.

    ``logits`` broadcasts against ``x``. Returns ``(y, g)``; every ``g`` lies in (0, 1)
    (up to float rounding at the extremes).
    """
    gate = jax.nn.sigmoid(logits)
    return x * gate, gate


def excitation_mlp(channels: int, hidden: int, dtype=None, *, use_bias: bool = True, activation=nn.relu):
    """SE's excitation ``z -> W2 relu(W1 z + b1) + b2``, C -> ``hidden`` -> C, as a function of ``z``.

    Makes the Dense layers ``reduce`` and ``expand`` in the calling module (call it inside a compact
    method); calling the returned function twice shares them (CBAM's one MLP on two descriptors).
    ``use_bias=False`` drops b1 and b2 (timm's ``mlp_bias=False``); ``activation`` replaces the ReLU.
    """
    reduce = nn.Dense(hidden, use_bias=use_bias, dtype=dtype, name="reduce")
    expand = nn.Dense(channels, use_bias=use_bias, dtype=dtype, name="expand")
    return lambda z: expand(activation(reduce(z)))


# timm's width rules and activation names (timm/layers/helpers.py, create_act.py), for the blocks that offer
# timm's options. attnjax's own rules (reduced_channels, resolve_heads) stay the defaults.


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's ``make_divisible``: ``value`` rounded to the nearest multiple of ``divisor`` (halves up), at least
    ``min_value`` (default ``divisor``), plus one more ``divisor`` if that fell below ``round_limit * value``."""
    if divisor < 1:
        raise InputError(f"divisor must be >= 1, got {divisor}")
    min_value = min_value or divisor
    width = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return width + divisor if width < round_limit * value else width


def timm_reduced_channels(channels: int, rd_ratio: float, rd_channels: int | None, rd_divisor: int) -> int:
    """timm's bottleneck width: ``rd_channels`` if given, else ``make_divisible(C * rd_ratio, rd_divisor,
    round_limit=0)``, i.e. C * rd_ratio rounded to the nearest multiple of ``rd_divisor`` (at least one)."""
    if rd_channels is not None:
        if rd_channels < 1:
            raise InputError(f"rd_channels must be >= 1 or None, got {rd_channels}")
        return rd_channels
    if not rd_ratio > 0:
        raise InputError(f"rd_ratio must be > 0 or None, got {rd_ratio}")
    if rd_divisor < 1:
        raise InputError(f"rd_divisor must be >= 1 or None, got {rd_divisor}")
    return make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)


def refuse_both_width_rules(**attnjax_options: tuple[int, int]) -> None:
    """Called once one of timm's ``rd_ratio``/``rd_channels``/``rd_divisor`` is given: attnjax's width options
    (``name=(value, default)``) must then be at their defaults, or both rules would set the hidden width."""
    given = [f"{name}={value}" for name, (value, default) in attnjax_options.items() if value != default]
    if given:
        raise InputError(
            f"{', '.join(given)} (attnjax's width rule) and rd_ratio/rd_channels/rd_divisor (timm's) both set the "
            "hidden width; give one of them"
        )


def bottleneck_width(
    channels: int,
    reduction: int,
    rd_ratio: float | None,
    rd_channels: int | None,
    rd_divisor: int | None,
    *,
    timm_ratio: float,
    default_reduction: int = 16,
) -> int:
    """A reducing block's hidden width: attnjax's :func:`reduced_channels` (C, ``reduction``), unless one of timm's
    options ``rd_ratio``, ``rd_channels``, ``rd_divisor`` is given; then timm's :func:`timm_reduced_channels`, with
    ``rd_ratio`` defaulting to timm's ``timm_ratio`` for the block and ``rd_divisor`` to timm's 1.

    Giving both rules (``reduction`` other than ``default_reduction`` and a timm option) is an error.
    """
    if rd_ratio is None and rd_channels is None and rd_divisor is None:
        return reduced_channels(channels, reduction)
    refuse_both_width_rules(reduction=(reduction, default_reduction))
    ratio = timm_ratio if rd_ratio is None else rd_ratio
    return timm_reduced_channels(channels, ratio, rd_channels, 1 if rd_divisor is None else rd_divisor)


GATES = {"hard_sigmoid": jax.nn.hard_sigmoid, "sigmoid": jax.nn.sigmoid}
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # timm's GELU: the exact, erf form
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "hard_swish": jax.nn.hard_swish,
    "leaky_relu": jax.nn.leaky_relu,  # slope 0.01, PyTorch's
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def gate_function(name: str, option: str = "gate_layer"):
    """The gate called ``name`` as timm names it (``gate_layer``): ``"sigmoid"``, or ``"hard_sigmoid"`` =
    relu6(t + 3) / 6. A gate in [0, 1]; timm's other activations are not offered as gates."""
    try:
        return GATES[name]
    except (KeyError, TypeError):
        raise InputError(f"{option} must be one of {', '.join(sorted(GATES))}, got {name!r}") from None


def activation_function(name: str, option: str = "act_layer"):
    """The hidden activation called ``name`` as timm names it (``act_layer``): one of :data:`ACTIVATIONS`
    (``gelu`` is the exact erf form, as timm's; ``swish`` is ``silu``)."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise InputError(f"{option} must be one of {', '.join(sorted(ACTIVATIONS))}, got {name!r}") from None


# Options shared by several blocks, each checked in one place.


def odd_size(size: int, option: str, who: str, note: str) -> int:
    """``size`` if it is a positive odd number, else an :class:`InputError` naming ``who``, ``option`` and ``note``.

    For the kernel and window sizes of 'same'-padded convolutions: only an odd size keeps the map's size.
    """
    if size < 1 or size % 2 == 0:
        raise InputError(f"{who}: {option} must be a positive odd number ({note}), got {size}")
    return size


def resolve_heads(channels: int, num_heads: int | None, max_heads: int, who: str) -> int:
    """The number of heads a multi-head block uses on C = ``channels``, the same rule in every such block.

    ``num_heads`` is a number of heads, exactly: it must divide C (each head's values are C / heads
    wide). ``num_heads=None`` takes the largest divisor of C that is at most ``max_heads``, so that
    every C works (C = 13 or 37: 1 head; C = 3 with ``max_heads=4``: 3 heads).
    """
    if max_heads < 1:
        raise InputError(f"{who}: max_heads must be >= 1, got {max_heads} (the most heads num_heads=None takes)")
    if num_heads is None:
        return max(d for d in range(1, min(max_heads, channels) + 1) if channels % d == 0)
    if num_heads < 1 or channels % num_heads:
        divisors = [d for d in range(1, channels + 1) if channels % d == 0]
        listed = ", ".join(map(str, divisors[:8])) + (", ..." if len(divisors) > 8 else "")
        raise InputError(
            f"{who}: num_heads={num_heads} does not divide the {channels} input channels; choose num_heads "
            f"from the divisors of {channels}: {listed} (or num_heads=None: the largest divisor up to "
            f"max_heads={max_heads})"
        )
    return num_heads


def head_widths(channels: int, heads: int, dim_head: int | None, who: str) -> tuple[int, int]:
    """``(d_qk, d_v)``: query/key width per head (``dim_head``, default C / heads) and value width C / heads."""
    if dim_head is not None and dim_head < 1:
        raise InputError(f"{who}: dim_head must be >= 1 or None, got {dim_head}")
    d_v = channels // heads
    return (dim_head or d_v), d_v


def attention_widths(
    channels: int, num_heads: int | None, max_heads: int, dim_head: int | None, qk_ratio: float | None, who: str
) -> tuple[int, int, int]:
    """``(heads, d_qk, d_v)`` of a multi-head block (``bottleneck``, ``halo``) on C = ``channels``.

    ``qk_ratio=None`` (attnjax's rule): heads by :func:`resolve_heads`, d_qk by :func:`head_widths`. A number
    asks for timm's rule (``BottleneckAttn``, ``HaloAttn``): heads = ``num_heads``, or ``max_heads`` (timm's
    default count) when None, which must divide C as timm asserts; d_qk = ``dim_head`` or
    ``make_divisible(C * qk_ratio, 8) // heads``, the q/k width rounded to a multiple of 8. d_v = C / heads.
    """
    if qk_ratio is None:
        heads = resolve_heads(channels, num_heads, max_heads, who)
        return (heads, *head_widths(channels, heads, dim_head, who))
    if not qk_ratio > 0:
        raise InputError(f"{who}: qk_ratio must be > 0 or None, got {qk_ratio}")
    if num_heads is None:
        if max_heads < 1 or channels % max_heads:
            raise InputError(
                f"{who}: timm's widths (qk_ratio={qk_ratio}) take num_heads=max_heads={max_heads} heads when "
                f"num_heads=None, and timm refuses a count that does not divide the {channels} input channels; give "
                f"num_heads (a divisor of {channels}) or qk_ratio=None (attnjax's rule)"
            )
        num_heads = max_heads
    heads = resolve_heads(channels, num_heads, max_heads, who)
    _, d_v = head_widths(channels, heads, dim_head, who)
    d_qk = dim_head or make_divisible(channels * qk_ratio, divisor=8) // heads
    if d_qk < 1:
        raise InputError(
            f"{who}: timm's q/k width make_divisible(C * qk_ratio, 8) // heads is 0 for C={channels}, "
            f"qk_ratio={qk_ratio}, {heads} heads; give dim_head or fewer heads"
        )
    return heads, d_qk, d_v


def block_batch_norm(block: nn.Module, train: bool, name: str, **options) -> nn.BatchNorm:
    """:func:`attnjax.layers.batch_norm` in ``block``'s ``dtype``, synchronised over its ``axis_name``.

    Call it inside ``block``'s compact method; ``options`` go to ``batch_norm`` (``momentum``, ...).
    """
    return batch_norm(train, axis_name=block.axis_name, dtype=block.dtype, name=name, **options)


# timm's other width rule: make_divisible with its default round_limit (``bat``), or of C * ratio * factor (``scoord``).


def timm_divisible_width(
    channels: int, rd_ratio: float, rd_channels: int | None, rd_divisor: int, *, round_limit: float, factor: float = 1.0
) -> int:
    """``rd_channels`` if given, else timm's ``make_divisible(C * rd_ratio * factor, rd_divisor, round_limit)``.

    For the timm modules whose ``rd_ratio`` and ``rd_divisor`` are plain numbers (not None): ``SimpleCoordAttn``
    (``round_limit=0``, ``factor=se_factor``) and ``BatNonLocalAttn`` (timm's default ``round_limit=0.9``: one more
    ``rd_divisor`` where rounding fell below 90% of C * rd_ratio). Each option is checked here.
    """
    if rd_channels is not None and rd_channels < 1:
        raise InputError(f"rd_channels must be >= 1 or None, got {rd_channels}")
    if not rd_ratio > 0:
        raise InputError(f"rd_ratio must be > 0, got {rd_ratio}")
    if rd_divisor < 1:
        raise InputError(f"rd_divisor must be >= 1, got {rd_divisor}")
    if rd_channels is not None:
        return rd_channels
    return make_divisible(channels * rd_ratio * factor, rd_divisor, round_limit=round_limit)
