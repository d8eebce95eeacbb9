"""Parameters, multiply-accumulates and XLA's FLOPs of every registered model's forward pass, one row per model.

    python -m attnjax.compare.model_cost                          # every registered model, its default input
    python -m attnjax.compare.model_cost --models resnet50,seresnet50 --markdown
    python -m attnjax.compare.model_cost --models resnet18 --size 160 --no-xla

For each model (:func:`attnjax.models.create`, 1000 classes for timm's networks, 10 for attnjax's own) at
its default input (:func:`default_input_shape`: 224 x 224 x 3 for timm's networks, as papers quote them
(timm's pretrained configs of ``ecaresnet26t``/``ecaresnet50t`` train at 256), 28 x 28 x 1 for ``attention_net``,
32 x 32 x 3 for ``cifar_resnet*``; ``--size`` sets height and width for all), one image,
inference mode (``train=False``), it reports

- ``params``: trainable parameters (the ``params`` collection; batch norm's running averages are not
  parameters), as timm counts them (``sum(p.numel() for p in model.parameters())``);
- ``GMACs``: multiply-accumulates, the convention of papers and of timm's tables (resnet50: 4.09 GMACs).
  Exactly: every convolution counts ``output elements x kernel taps x input channels per group`` (taps
  that fall in the padding included, as if the padding were real zeros) and every matrix product
  (dense layers, attention's ``QK^T`` and ``AV``, ``einsum``) ``output elements x contracted size``.
  Everything else counts zero: biases, batch norm, activations, pooling (max, average, global average),
  element-wise products and sums (the attention gates, the residual adds), softmax. This is what
  ``torch.utils.flop_counter.FlopCounterMode`` counts on timm's model, halved (it counts 2 FLOPs per MAC
  of ``aten.convolution``, ``mm``, ``addmm``, ``bmm``, and nothing else these networks run);
- ``pad GMACs``: the part of those MACs whose input tap falls in a convolution's padding (or in the holes of
  an input dilation, which no forward pass here has);
- ``XLA GFLOPs``: XLA's cost analysis of the compiled forward pass (``jax.jit(f).lower(...).compile()
  .cost_analysis()["flops"]``, with the formulations native to GPU/TPU: :func:`attnjax.compare.measure.
  math_flops`), ``None`` where the backend gives none;
- ``other GFLOPs``: ``XLA GFLOPs - 2 x (GMACs - pad GMACs)``: XLA's count of the rest.

How MACs relate to XLA's FLOPs. XLA counts 2 FLOPs per multiply-add of a convolution or dot, but for a
convolution only over the (output, kernel tap) pairs whose input position is inside the image: it skips
the taps that fall in the padding (``HloCostAnalysis::GetConvolutionFlops``). It then adds one FLOP per
element of every element-wise op and reduction in the optimised HLO (batch norm's scale and shift, ReLU
as a ``max``, the pooling windows, the gates' sigmoids and products, the residual adds, the biases; an op
that fusion duplicates into several consumers counts once per copy). So::

    XLA FLOPs = 2 x (MACs - padding MACs) + other FLOPs

where ``padding MACs`` is computed here from each convolution's padding, stride and dilation exactly as
XLA does, and ``other FLOPs`` is the element-wise work (0.4% to 4% of XLA's total in the registered ResNets
at 224: most in the deepest, resnet152). The padding taps matter at small feature maps: a 3 x 3 conv with
padding 1 on a 7 x 7 map has 49 x 9 = 441 taps per channel pair, of which 80 (18%) are in the padding.
They are 7% of resnet18's MACs at 224, 3% of resnet50's (most of its MACs are in 1 x 1 convs, which have
no padding) and 0.4% of resnext50_32x4d's (grouped 3 x 3 convs), so that resnext50_32x4d's XLA count is
1% above 2 x MACs and resnet18's 7% below it: 2 x MACs is neither an upper nor a lower bound of XLA's
count, and the ratios of XLA FLOPs between networks differ from the ratios of their MACs.

How the MACs are counted: from the jaxpr of ``model.apply(variables, x, train=False)``, traced with
abstract inputs (nothing runs, nothing compiles) and with the formulations native to GPU/TPU
(:mod:`attnjax.ops`: a CPU formulation may compute more, e.g. sk's block-diagonal convs, CBAM's
banded matrix, and those extra MACs are not the network's). Every ``conv_general_dilated`` and
``dot_general`` equation is counted from its operand and result shapes, inside nested jaxprs too
(``jit``, ``custom_jvp``/``custom_vjp``, ``remat``; ``scan`` bodies times their length; the larger branch
of a ``cond``; a ``while`` loop, whose trip count is unknown, is refused). Counting primitives rather than
intercepting Flax modules (``nn.intercept_methods`` on ``nn.Conv``/``nn.Dense``) counts every product the
network computes, whatever writes it: attention's ``einsum``\\ s, convs written with ``lax`` (the
:mod:`attnjax.ops` formulations), a ``Dense`` applied twice; and it counts what XLA compiles, so that both columns
describe the same computation. The cost is that the count is that of the primitives: a product written
as element-wise ops counts zero, and a dot that computes a gather or a broadcast would count as MACs. One
registered case differs from timm's count for that reason: attnjax's ECA (:func:`attnjax.blocks.eca.channel_conv`)
computes its 1-D conv across channels as k shifted multiply-adds, not as a conv, so each ``ecaresnet*``
counts ``C x k`` MACs per ECA block fewer than timm's ``Conv1d`` (46,592 in ``ecaresnet26t``: 0.002% of its
2.55 GMACs); XLA counts those multiply-adds among the other FLOPs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from tqdm.auto import tqdm

from attnjax import models, ops
from attnjax.compare import measure as measuring
from attnjax.validate import CommandLineParser, InputError

# attnjax's own models and the input each is made for (height, width, channels); timm's networks take 224.
OWN_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "attention_net": (28, 28, 1),  # MNIST-sized
    "cifar_resnet18": (32, 32, 3),
    "cifar_resnet34": (32, 32, 3),
}
# timm's networks at 224 x 224, the size papers and timm's tables quote, so that every row compares; timm's own
# pretrained configs use 224 too, except ecaresnet26t and ecaresnet50t (256, tested at 320): --size 256.
TIMM_INPUT_SHAPE = (224, 224, 3)
TIMM_CLASSES, OWN_CLASSES = 1000, 10


def default_input_shape(name: str) -> tuple[int, int, int]:
    """The (height, width, channels) model ``name`` is made for: timm's 224 x 224 x 3, or attnjax's model's own.

    A registered model that is neither timm's nor listed in :data:`OWN_INPUT_SHAPES` (a new one) takes the
    prefix rule: ``cifar_*`` 32 x 32 x 3, anything else timm's 224 x 224 x 3.
    """
    if name not in models.names():
        raise InputError(f"unknown model {name!r}; valid names: {', '.join(models.names())}")
    if name in models.TIMM_NETWORKS:
        return TIMM_INPUT_SHAPE
    if name in OWN_INPUT_SHAPES:
        return OWN_INPUT_SHAPES[name]
    return (32, 32, 3) if name.startswith("cifar_") else TIMM_INPUT_SHAPE


def default_num_classes(name: str) -> int:
    """1000 (ImageNet) for timm's networks, 10 for attnjax's own models."""
    return TIMM_CLASSES if name in models.TIMM_NETWORKS else OWN_CLASSES


# --- counting multiply-accumulates in a jaxpr -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Macs:
    """Multiply-accumulates of a computation: of its convolutions, of its dots, and the convs' padding taps."""

    conv: int = 0
    dot: int = 0
    padding: int = 0  # of ``conv``: (output, tap) pairs whose input position is in the padding

    @property
    def total(self) -> int:
        return self.conv + self.dot

    def __add__(self, other: Macs) -> Macs:
        return Macs(self.conv + other.conv, self.dot + other.dot, self.padding + other.padding)

    def __mul__(self, times: int) -> Macs:
        return Macs(self.conv * times, self.dot * times, self.padding * times)


def _valid_taps(in_size: int, out_size: int, kernel: int, stride: int, pad_low: int, base: int, window: int) -> int:
    """(output, kernel tap) pairs of one spatial dimension whose input position is a real input element.

    As XLA's ``GetConvolutionFlops``: the position ``o * stride - pad_low + k * window`` in the base-dilated
    input must be a multiple of ``base`` (not a hole of the dilation) and inside ``[0, in_size)`` once divided.
    """
    count = 0
    for o in range(out_size):
        for k in range(kernel):
            position = o * stride - pad_low + k * window
            if position % base == 0 and 0 <= position // base < in_size:
                count += 1
    return count


def conv_macs(eqn: Any) -> Macs:
    """The MACs of one ``conv_general_dilated`` equation: output elements x kernel taps x input channels per group.

    The kernel's input-feature dimension already holds the input channels per group (``C_in /
    feature_group_count``). ``padding`` counts the part of those whose input tap is in the padding.
    """
    lhs, rhs = (v.aval for v in eqn.invars)
    (out,) = (v.aval for v in eqn.outvars)
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    kernel_spatial = [rhs.shape[d] for d in rhs_spec[2:]]
    total = math.prod(out.shape) * rhs.shape[rhs_spec[1]] * math.prod(kernel_spatial)
    spatial = len(kernel_spatial)
    base = p.get("lhs_dilation") or (1,) * spatial
    window = p.get("rhs_dilation") or (1,) * spatial
    valid = 1
    for i in range(spatial):
        valid *= _valid_taps(
            lhs.shape[lhs_spec[2 + i]],
            out.shape[out_spec[2 + i]],
            kernel_spatial[i],
            p["window_strides"][i],
            p["padding"][i][0],
            base[i],
            window[i],
        )
    per_position = math.prod(out.shape[d] for d in out_spec[:2]) * rhs.shape[rhs_spec[1]]
    return Macs(conv=total, padding=total - per_position * valid)


def dot_macs(eqn: Any) -> Macs:
    """The MACs of one ``dot_general`` equation: output elements x the contracted size."""
    lhs, _ = (v.aval for v in eqn.invars)
    (out,) = (v.aval for v in eqn.outvars)
    (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
    return Macs(dot=math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contracting))


def jaxpr_macs(jaxpr: jex.Jaxpr | jex.ClosedJaxpr) -> Macs:
    """The MACs of every ``conv_general_dilated`` and ``dot_general`` in ``jaxpr``, nested jaxprs included.

    A ``scan`` body counts ``length`` times, a ``cond`` its most expensive branch; a ``while`` loop with
    products inside is refused (``ValueError``: its trip count is not in the jaxpr).
    """
    if isinstance(jaxpr, jex.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = Macs()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += conv_macs(eqn)
        elif name == "dot_general":
            total += dot_macs(eqn)
        elif name == "cond":
            total += max((jaxpr_macs(b) for b in eqn.params["branches"]), key=lambda m: m.total, default=Macs())
        else:
            inner = sum((jaxpr_macs(sub) for sub in jex.jaxprs_in_params(eqn.params)), Macs())
            if name == "scan":
                inner *= int(eqn.params["length"])
            elif name == "while" and inner.total:
                raise ValueError(
                    "a while loop computes convolutions or dots: its trip count, and so its MACs, is unknown"
                )
            total += inner
    return total


def count_macs(fn: Callable, *args: Any) -> Macs:
    """The MACs of ``fn(*args)``: its jaxpr traced on ``args`` (arrays or ``jax.ShapeDtypeStruct``\\ s), nothing run.

    Traced with the formulations native to GPU/TPU, so that the count is the math (see the module's docstring).
    """
    with ops.use_formulations(**measuring.NATIVE_FORMULATIONS):
        return jaxpr_macs(jax.make_jaxpr(fn)(*args))


# --- one model's cost --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """One row: a model's forward pass on one image of ``input_shape`` (height, width, channels)."""

    name: str
    input_shape: tuple[int, int, int]
    params: int
    macs: int
    padding_macs: int
    xla_flops: float | None  # None: not measured (--no-xla) or no cost analysis on this backend

    @property
    def other_flops(self) -> float | None:
        """XLA's FLOPs beyond its count of the products (2 per MAC whose tap is not in the padding)."""
        return None if self.xla_flops is None else self.xla_flops - 2 * (self.macs - self.padding_macs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def forward_cost(
    model: Any, input_shape: Sequence[int], *, name: str = "", xla: bool = True, dtype: Any = jnp.float32
) -> ModelCost:
    """Parameters, MACs and XLA's FLOPs of ``model.apply(variables, x, train=False)`` on one ``input_shape`` image.

    The variables are abstract (``jax.eval_shape`` of ``model.init``): nothing runs. XLA's FLOPs
    compile the forward pass (``xla=False`` skips that, the slow part, leaving ``xla_flops`` ``None``).
    """
    shape = tuple(int(d) for d in input_shape)
    x = jax.ShapeDtypeStruct((1, *shape), dtype)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype), train=False))

    def forward(variables, x):
        return model.apply(variables, x, train=False)

    macs = count_macs(forward, variables, x)
    flops = measuring.math_flops(forward, variables, x) if xla else None
    return ModelCost(name, shape, measuring.count_params(variables), macs.total, macs.padding, flops)  # type: ignore[arg-type]


def model_cost(name: str, *, size: int | None = None, xla: bool = True) -> ModelCost:
    """:func:`forward_cost` of registered model ``name`` (its default classes) at its default input, or ``size`` x ``size``."""
    height, width, channels = default_input_shape(name)
    if size is not None:
        if size < 1:
            raise InputError(f"size must be >= 1, got {size}")
        height = width = size
    model = models.create(name, num_classes=default_num_classes(name))
    return forward_cost(model, (height, width, channels), name=name, xla=xla)


def measure(
    names: Sequence[str], *, size: int | None = None, xla: bool = True, progress: bool = True
) -> list[ModelCost]:
    """:func:`model_cost` of each model in ``names``, in that order, with a progress bar."""
    unknown = [n for n in names if n not in models.names()]
    if unknown or not names:
        raise InputError(f"unknown model(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(models.names())}")
    rows = []
    with tqdm(names, desc="model cost", unit="model", disable=not progress, leave=False) as bar:
        for name in bar:
            bar.set_postfix_str(name)
            rows.append(model_cost(name, size=size, xla=xla))
    return rows


# --- the table and the command -----------------------------------------------------------------------------


def _g(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value / 1e9:,.{digits}f}"


def format_table(rows: Sequence[ModelCost], markdown: bool = False) -> str:
    """The rows as an aligned text table, or as a markdown table."""
    header = ["model", "input", "params", "GMACs", "pad GMACs", "XLA GFLOPs", "XLA/2MACs", "other GFLOPs"]
    body = [
        [
            r.name,
            "x".join(map(str, r.input_shape)),
            f"{r.params:,}",
            _g(r.macs),
            _g(r.padding_macs),
            _g(r.xla_flops),
            "n/a" if r.xla_flops is None or not r.macs else f"{r.xla_flops / (2 * r.macs):.3f}",
            _g(r.other_flops),
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="python -m attnjax.compare.model_cost",
        description="Parameters, multiply-accumulates (the papers' and timm's count) and XLA's FLOPs of every "
        "registered model's forward pass on one image at its default input size.",
        epilog="MACs count every conv and matrix product (padding taps included) and nothing else; XLA's FLOPs = "
        "2 x (MACs - padding MACs) + element-wise work. python -m attnjax.compare.block_cost costs the blocks alone.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--models",
        default=",".join(models.names()),
        help=f"comma-separated model names, from: {', '.join(models.names())}",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="input height and width for every model (default: each model's own: 224 for timm's networks, "
        "28 for attention_net, 32 for cifar_resnet*)",
    )
    parser.add_argument("--no-xla", action="store_true", help="skip XLA's FLOPs (no compiling: seconds per model)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in models.names()]
    if unknown or not names:
        parser.error(f"unknown model(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(models.names())}")
    if args.size is not None and args.size < 1:
        parser.error(f"--size must be >= 1, got {args.size}")
    try:
        rows = measure(names, size=args.size, xla=not args.no_xla, progress=not args.no_progress)
    except InputError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    device = jax.devices()[0]
    print(
        f"attnjax models, forward pass (train=False) on one image, float32, on {device.platform} "
        f"({device.device_kind}); MACs: convs and matrix products, padding taps included; "
        "XLA FLOPs = 2 x (MACs - pad MACs) + other"
    )
    print(format_table(rows, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
