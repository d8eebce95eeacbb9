"""The errors every registered block gives, driven by the registry: ``blocks.names()`` and ``blocks.options(name)``.

Each bad value below is tried on every block that has the option, so a newly registered block is covered by
registering it: a block with a ``reduction`` rejects 0, one with a ``kernel_size`` rejects even sizes, every
block rejects input of another rank than 4, naming its class. An option of a new block must be entered in
``BAD_VALUES`` or ``ANY_VALUE`` (``test_every_option_is_classified`` fails until it is). The messages are
matched whole (its first line: JAX may add its own); ``{who}`` stands for the block's class name.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from attnjax import blocks
from attnjax.validate import InputError

NAMES = blocks.names()
SHAPE = (1, 4, 4, 16)  # the input on which bad options are tried: 16 channels, so 3 and 5 heads do not divide
ODD = r"^{who}: {option} must be a positive odd number \(.+\), got {value}$"
HEADS = (
    r"^{who}: num_heads={value} does not divide the 16 input channels; choose num_heads from the divisors of 16: "
    r"1, 2, 4, 8, 16 \(or num_heads=None: the largest divisor up to max_heads=\d+\)$"
)

# option -> [(bad value, the whole error message, a regular expression)], for every block that has the option.
BAD_VALUES = {
    "kernel_size": [(size, ODD) for size in (0, 4, 6)],
    "r": [(size, ODD) for size in (0, 4, 6)],
    "min_kernel_size": [(size, ODD) for size in (0, 4)],
    "reduction": [(0, r"^reduction must be >= 1, got 0$")],
    "min_channels": [(0, r"^min_channels must be >= 1, got 0$")],
    "num_heads": [(heads, HEADS) for heads in (3, 0, 5)],
    "max_heads": [(0, r"^{who}: max_heads must be >= 1, got 0 \(the most heads num_heads=None takes\)$")],
    "dim_head": [(0, r"^{who}: dim_head must be >= 1 or None, got 0$")],
    "gamma": [(0, r"^gamma must be > 0, got 0; the paper uses gamma=2$")],
    "divisor": [(0, r"^divisor must be >= 1, got 0$")],
    "dilation": [(0, r"^dilation must be >= 1 \(the paper uses 4\), got 0$")],
    "dilations": [
        ((), r"^{who}: dilations must be one or more integers >= 1 \(one per branch\), got \(\)$"),
        ((1, 0), r"^{who}: dilations must be one or more integers >= 1 \(one per branch\), got \(1, 0\)$"),
    ],
    "groups": [(0, r"^groups must be >= 1, got 0$")],
    "radix": [(0, r"^radix must be >= 1, got 0$")],
    "cardinality": [(0, r"^cardinality must be >= 1, got 0$")],
    "memory_units": [(0, r"^memory_units must be >= 1 \(the paper uses 64\), got 0$")],
    "recurrence": [(0, r"^{who}: recurrence must be >= 1 \(1: one criss-cross pass; 2: RCCA\); got 0$")],
    "max_span": [(0, r"^{who}: max_span must be >= 1 \(or None: the input's size at init\); got 0$")],
    "block_size": [(0, r"^{who}: block_size must be >= 1 and halo_size >= 0, got block_size=0, halo_size=3$")],
    "halo_size": [(-1, r"^{who}: block_size must be >= 1 and halo_size >= 0, got block_size=8, halo_size=-1$")],
    "extent": [
        (3, r"^extent must be 0 \(global\) or an even number >= 2 \(the paper uses 2, 4 and 8\), got 3$"),
        (-2, r"^extent must be 0 \(global\) or an even number >= 2 \(the paper uses 2, 4 and 8\), got -2$"),
    ],
    "e_lambda": [
        (
            e,
            rf"^{{who}}: e_lambda must be > 0 \(it keeps E_inv finite on constant channels\), got {e}; the paper "
            r"uses 1e-4\.$",
        )
        for e in (0.0, -1e-4)
    ],
    "gate": [("relu", r"^gate must be one of hard_sigmoid, sigmoid, got 'relu'$")],
    # timm's options, under timm's names (attnjax.blocks.primitives checks them)
    "rd_ratio": [(0, r"^rd_ratio must be > 0 or None, got 0$")],
    "rd_channels": [(0, r"^rd_channels must be >= 1 or None, got 0$")],
    "rd_divisor": [(0, r"^rd_divisor must be >= 1 or None, got 0$")],
    "gate_layer": [("relu", r"^gate_layer must be one of hard_sigmoid, sigmoid, got 'relu'$")],
    "act_layer": [
        (
            "softmax",
            (
                r"^act_layer must be one of gelu, gelu_tanh, hard_swish, leaky_relu, relu, relu6, silu, swish, "
                r"got 'softmax'$"
            ),
        )
    ],
    "qk_ratio": [(0, r"^{who}: qk_ratio must be > 0 or None, got 0$")],
    "norm_eps": [(-1.0, r"^norm_eps must be >= 0 \(timm's LayerNorm2d uses 1e-6\), got -1.0$")],
    # timm's conv-layer options of sk (SelectiveKernel) and splat (SplitAttn)
    "out_channels": [(0, r"^{who}: out_channels must be >= 1 or None \(the input's channels\), got 0$")],
    "stride": [(0, r"^{who}: stride must be >= 1, got 0$")],
    "padding": [(-1, r"^{who}: padding must be >= 0 or None \(kernel_size // 2, timm's\), got -1$")],
    "channel_energy": [("negated", r"^{who}: channel_energy must be one of official, paper; got 'negated'$")],
    # timm's options of scoord (SimpleCoordAttn) and bat (BatNonLocalAttn)
    "se_factor": [(0, r"^se_factor must be > 0 \(timm uses 2/3\), got 0$")],
    "drop_rate": [
        (rate, rf"^drop_rate must be >= 0 and < 1 \(timm's default is 0\.2\), got {rate}$") for rate in (1.0, -0.1)
    ],
    "position_embedding": [
        ("relative", r"^{who}: position_embedding must be one of local, global, got 'relative'$"),
    ],
}
# Where a block words an option's error its own way: (block, option) -> its entries, in place of BAD_VALUES's.
OWN_MESSAGES = {
    ("ecam", "reduction"): [(0, r"^reduction must be >= 1 \(timm uses 8\), got 0$")],
    ("lambda", "dim_head"): [(0, r"^{who}: dim_head must be >= 1, got 0$")],
    ("shuffle", "groups"): [(0, r"^groups must be >= 1 \(the paper uses 64\), got 0$")],
    ("sk", "dilation"): [(0, r"^{who}: dilation must be >= 1, got 0$")],
    ("splat", "dilation"): [(0, r"^{who}: dilation must be >= 1, got 0$")],
    # timm's rd_ratio and rd_divisor are plain numbers there, not None (timm_divisible_width)
    ("scoord", "rd_ratio"): [(0, r"^rd_ratio must be > 0, got 0$")],
    ("scoord", "rd_divisor"): [(0, r"^rd_divisor must be >= 1, got 0$")],
    ("bat", "rd_ratio"): [(0, r"^rd_ratio must be > 0, got 0$")],
    ("bat", "rd_divisor"): [(0, r"^rd_divisor must be >= 1, got 0$")],
    ("bat", "block_size"): [(0, r"^{who}: block_size must be >= 1 \(timm's default is 7\), got 0$")],
}
# Options whose values are all valid (flags, free numbers, a size that binds the block).
ANY_VALUE = {"b", "extra_params", "feat_size", "no_spatial", "qkv_bias", "scale_pos_embed", "temperature",
             "use_mlp", "zero_init_last", "add_maxpool", "full_tables", "mlp_bias", "spatial_norm",
             "use_attn", "keep_3x3", "split_input", "bias", "fc1_bias", "has_skip", "use_conv",
             "use_norm", "beta"}  # fmt: skip
# Options that are each valid alone but not together: block -> [(options, message)].
TIMM_AND_ATTNJAX_WIDTHS = (
    r"^reduction=8 \(attnjax's width rule\) and rd_ratio/rd_channels/rd_divisor \(timm's\) both set the hidden "
    r"width; give one of them$"
)
TIMM_HEADS = (
    r"^{who}: timm's widths \(qk_ratio=1.0\) take num_heads=max_heads=3 heads when num_heads=None, and timm "
    r"refuses a count that does not divide the 16 input channels; give num_heads \(a divisor of 16\) or "
    r"qk_ratio=None \(attnjax's rule\)$"
)
BAD_COMBINATIONS = {
    "eca": [({"b": 2, "beta": 1.0}, r"^{who}: b=2 and beta=1.0 are the same option \(timm calls b beta\); give one$")],
    "ge": [
        (
            {"extent": 6, "extra_params": True},
            r"^with extra_params=True the extent sets the number of stride-2 convs, log2\(extent\), so it must be "
            r"a power of two \(2, 4, 8, \.\.\.\); got 6$",
        ),
        ({"reduction": 8, "rd_divisor": 1}, TIMM_AND_ATTNJAX_WIDTHS),
        (
            {"extent": 2, "extra_params": True, "add_maxpool": True},
            (
                r"^add_maxpool applies to the parameter-free gather only \(extra_params=False\); timm ignores it "
                r"with extra_params=True$"
            ),
        ),
    ],
    "gc": [({"reduction": 8, "rd_ratio": 0.25}, TIMM_AND_ATTNJAX_WIDTHS)],
    "gca": [({"reduction": 8, "rd_channels": 4}, TIMM_AND_ATTNJAX_WIDTHS)],
    "lcbam": [({"reduction": 8, "rd_ratio": 0.25}, TIMM_AND_ATTNJAX_WIDTHS)],
    "bottleneck": [({"qk_ratio": 1.0, "max_heads": 3}, TIMM_HEADS)],
    "halo": [({"qk_ratio": 1.0, "max_heads": 3}, TIMM_HEADS)],
    "sk": [
        ({"reduction": 8, "rd_ratio": 0.25}, TIMM_AND_ATTNJAX_WIDTHS),
        (
            {"kernel_size": (3, 5), "dilations": (1, 3)},
            (
                r"^{who}: kernel_size=\(3, 5\) \(timm's branch kernels\) and dilations=\(1, 3\) \(attnjax's "
                r"branch dilations\) both set the branches; give one of them$"
            ),
        ),
    ],
    "splat": [({"reduction": 8, "rd_ratio": 0.25}, TIMM_AND_ATTNJAX_WIDTHS)],
}


def who(name):
    return type(blocks.create(name)).__name__


def bad_option_cases():
    for name in NAMES:
        for option in blocks.options(name):
            for value, message in OWN_MESSAGES.get((name, option), BAD_VALUES.get(option, [])):
                yield pytest.param(name, {option: value}, message, id=f"{name}-{option}={value!r}")
        for options, message in BAD_COMBINATIONS.get(name, []):
            yield pytest.param(name, options, message, id="-".join([name, *(f"{k}={v!r}" for k, v in options.items())]))


def init(block, shape=SHAPE):
    return jax.eval_shape(block.init, jax.random.key(0), jnp.zeros(shape))


def test_every_option_is_classified():
    options = {option for name in NAMES for option in blocks.options(name)}
    assert not set(BAD_VALUES) & ANY_VALUE
    assert options - set(BAD_VALUES) - ANY_VALUE == set(), "enter these options in BAD_VALUES or ANY_VALUE"
    assert {option for _, option in OWN_MESSAGES} <= set(BAD_VALUES)
    assert set(BAD_COMBINATIONS) <= set(NAMES)


@pytest.mark.parametrize("name, options, message", list(bad_option_cases()))
def test_bad_options_are_clear_errors(name, options, message):
    option, value = next(iter(options.items())) if len(options) == 1 else (None, None)
    pattern = message.replace("{who}", re.escape(who(name))).replace("{option}", str(option))
    pattern = pattern.replace("{value}", re.escape(str(value)))
    with pytest.raises(InputError, match="(?m)" + pattern):  # "$": the end of the message's line (JAX adds lines)
        init(blocks.create(name, **options))


@pytest.mark.parametrize("shape", [(8, 8, 3), (2, 64), (1, 2, 8, 8, 3)])
@pytest.mark.parametrize("name", NAMES)
def test_wrong_rank_names_the_block_and_the_expected_layout(name, shape):
    pattern = (
        rf"^{re.escape(who(name))} expects images of shape \(batch, height, width, channels\) \(NHWC, rank 4\); "
        rf"got shape {re.escape(str(shape))}\. For a single image add a batch axis"
    )
    with pytest.raises(InputError, match=pattern):
        blocks.create(name).init(jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize("name", NAMES)
def test_unknown_options_name_the_valid_ones(name):
    listed = ", ".join(f"{key}={value!r}" for key, value in blocks.options(name).items()) or "none"
    pattern = rf"^attention block '{name}' has no option reductio; its options: {re.escape(listed)}$"
    with pytest.raises(InputError, match=pattern):
        blocks.create(name, reductio=8)
    with pytest.raises(InputError, match=pattern):
        blocks.factory(name, reductio=8)


@pytest.mark.parametrize("name", NAMES)
def test_the_defaults_are_valid_on_the_bad_options_input(name):
    """The bad values above are what fails: with its defaults every block initialises on the same input."""
    init(blocks.create(name))
