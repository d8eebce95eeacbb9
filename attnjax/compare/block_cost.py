"""Cost of every registered block, side by side: parameters, XLA FLOPs and train-step time.

    python -m attnjax.compare.block_cost                       # C=64, 16x16, batch 8, every block
    python -m attnjax.compare.block_cost --channels 256 --height 14 --width 14 --blocks se,cbam,gc --markdown

For each block at one input shape (N, H, W, C) it reports

- ``params``: the number of trainable parameters (``params`` collection; running averages of
  batch norm are not counted);
- ``fwd MFLOP``: XLA's cost analysis of the compiled inference forward pass ``block(x, train=False)``;
- ``fwd+bwd MFLOP``: XLA's cost analysis of the compiled training step: the gradient of
  ``sum(block(x, train=True) ** 2)`` with respect to the parameters and ``x`` (only ``x`` for a
  parameter-free block), plus the updated batch statistics for blocks with batch norm;
- ``fwd+bwd ms``: the median wall time of that training step, and its interquartile range;
- ``vs identity``: that median over the median of the same step for a block that returns ``x``.
  The identity step is the cost of the loss alone (and of the call overhead), so a ratio of 1.0
  means the block is free and 2.0 means it costs as much again.
- ``vs FLOPs``: the block's own time (its step less the identity's) over the time its own
  FLOPs would take at the rate the table achieves (the median over the blocks of their FLOPs
  per second, :func:`flop_time_ratios`). A block near 1 costs what its arithmetic predicts;
  one far above 1 is a pathology of the compiler or of the formulation, not of the block's math.
  Blocks of little arithmetic (memory-bound, a few small ops) sit above 1 by nature.

The timings are taken side by side, by the timer the study's network cost uses too
(:func:`attnjax.compare.measure.side_by_side`): after compiling and warming up every step, each
repeat runs every block once, in an order rotated by one block per repeat, so that machine noise
and drift fall on all blocks alike; the medians over the repeats are reported. XLA's FLOP counts
are those of the optimised HLO on the current backend (the counts of custom calls such as cuDNN
kernels may be missing); they count a multiply-add as 2 FLOPs.

Steps are timed as training compiles them: with attnjax's XLA:CPU options
(:mod:`attnjax.xla_options`) and the backend's formulations (:mod:`attnjax.ops`). FLOPs are
counted with the formulations native to GPU/TPU, so they are the block's math on every backend
(on CPU, sk's block-diagonal convolutions run G times the FLOPs of its grouped ones).

The defaults (C=64 at 16x16, AttentionNet's block on 32x32 images, batch 8) keep the run to
well under a minute on a 2-core CPU. mhsa and nonlocal grow with (H*W)^2. Each block's options
and their defaults are listed by ``python -m attnjax.blocks``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from attnjax import blocks as registry
from attnjax import xla_options
from attnjax.compare import measure as measuring
from attnjax.validate import CommandLineParser, InputError

IDENTITY = "identity"


class Identity(nn.Module):
    """The baseline: returns ``x`` (no parameters, nothing sown)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        return x


@dataclasses.dataclass(frozen=True)
class Cost:
    """One row of the table. FLOPs are ``None`` where XLA's cost analysis gives none."""

    name: str
    params: int
    forward_flops: float | None
    train_flops: float | None
    times_s: tuple[float, ...]  # one train step per repeat

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def iqr_s(self) -> float:
        q1, _, q3 = measuring.quartiles(self.times_s)
        return q3 - q1


def train_step_fn(block: nn.Module, variables: Any):
    """``step(params, x) -> ((d params, d x), new batch_stats)`` for the loss ``sum(block(x, train=True) ** 2)``.

    Blocks with batch norm run on batch statistics and return their updated running averages
    (``mutable=["batch_stats"]``), as in a training step; the others return ``{}``.
    """
    others = {k: v for k, v in variables.items() if k != "params"}
    has_batch_stats = "batch_stats" in variables

    def loss(params, x):
        full = {**others, "params": params} if params else others
        if has_batch_stats:
            y, updates = block.apply(full, x, train=True, mutable=["batch_stats"])
            new_stats = updates["batch_stats"]
        else:
            y, new_stats = block.apply(full, x, train=True), {}
        return jnp.sum(jnp.square(y)), new_stats

    return jax.grad(loss, argnums=(0, 1), has_aux=True)


@dataclasses.dataclass
class _Prepared:
    name: str
    params: int
    forward_flops: float | None
    train_flops: float | None
    step: Any  # compiled train step
    args: tuple


def _prepare(name: str, block: nn.Module, x: jax.Array, key: jax.Array) -> _Prepared:
    variables = jax.jit(block.init)(key, x)
    params = variables.get("params", {})
    # Timed as training compiles it: attnjax's XLA:CPU options, the backend's formulations.
    step = measuring.compile_fn(
        train_step_fn(block, variables), params, x, compiler_options=xla_options.compiler_options()
    )
    # FLOPs of the block's math: counted with the formulations native to GPU/TPU, since a CPU
    # formulation may run more (sk's block-diagonal convs run G times its grouped convs' FLOPs).
    forward = measuring.math_flops(lambda v, x: block.apply(v, x, train=False), variables, x)
    train_flops = measuring.math_flops(train_step_fn(block, variables), params, x)
    return _Prepared(name, measuring.count_params(variables), forward, train_flops, step, (params, x))


def measure(
    names: Sequence[str],
    *,
    channels: int = 64,
    height: int = 16,
    width: int = 16,
    batch: int = 8,
    repeats: int = 10,
    options: dict[str, dict] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[Cost]:
    """The cost of the identity and of each block in ``names`` on one random ``(batch, height, width, channels)`` input.

    ``options`` maps a block name to its keyword options for :func:`attnjax.blocks.create`.
    Returns the identity's row first, then the blocks' in the order given.
    """
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    options = options or {}
    x = jax.random.normal(jax.random.key(seed), (batch, height, width, channels), jnp.float32)
    modules = {IDENTITY: Identity(), **{name: registry.create(name, **options.get(name, {})) for name in names}}

    prepared = []
    for name, block in tqdm(modules.items(), desc="compile", unit="block", disable=not progress, leave=False):
        prepared.append(_prepare(name, block, x, jax.random.key(seed + 1)))

    times = measuring.side_by_side(
        {p.name: lambda p=p: p.step(*p.args) for p in prepared}, repeats, progress=progress, desc="measure"
    )
    return [Cost(p.name, p.params, p.forward_flops, p.train_flops, times[p.name]) for p in prepared]


def _mflop(flops: float | None) -> str:
    return "n/a" if flops is None else f"{flops / 1e6:,.1f}"


def flop_time_ratios(costs: Sequence[Cost]) -> list[float | None]:
    """Each row's own time over the time its own FLOPs take at the table's achieved rate (the baseline: ``None``).

    Own time and FLOPs are the row's less the baseline's (the first row: the loss and the call
    overhead). The achieved rate is the median over the rows of own FLOPs per own second, so
    that one pathological block does not set the scale for the others. ``None`` where a row has
    no FLOP count, or no own FLOPs or time to compare.
    """
    base = costs[0]

    def own(c: Cost) -> tuple[float, float] | None:
        if c.train_flops is None or base.train_flops is None:
            return None
        flops, seconds = c.train_flops - base.train_flops, c.median_s - base.median_s
        return (flops, seconds) if flops > 0 and seconds > 0 else None

    owns = [own(c) for c in costs[1:]]
    rates = [flops / seconds for flops, seconds in filter(None, owns)]
    if not rates:
        return [None] * len(costs)
    rate = statistics.median(rates)
    return [None] + [None if o is None else o[1] / (o[0] / rate) for o in owns]


def format_table(costs: Sequence[Cost], markdown: bool = False) -> str:
    """The costs as an aligned text table, or as a markdown table. The first row is the baseline."""
    baseline = costs[0].median_s
    header = ["block", "params", "fwd MFLOP", "fwd+bwd MFLOP", "fwd+bwd ms", "IQR ms", "vs identity", "vs FLOPs"]
    rows = [
        [
            c.name,
            f"{c.params:,}",
            _mflop(c.forward_flops),
            _mflop(c.train_flops),
            f"{c.median_s * 1e3:.2f}",
            f"{c.iqr_s * 1e3:.2f}",
            f"{c.median_s / baseline:.2f}",
            "" if ratio is None else f"{ratio:.2f}",
        ]
        for c, ratio in zip(costs, flop_time_ratios(costs), strict=True)
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="python -m attnjax.compare.block_cost",
        description="Parameters, XLA FLOPs and train-step time of every attention block, measured side by side.",
        epilog="python -m attnjax.blocks lists each block's options and defaults.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--channels", type=int, default=64, help="input channels C")
    parser.add_argument("--height", type=int, default=16, help="input height H")
    parser.add_argument("--width", type=int, default=16, help="input width W")
    parser.add_argument("--batch", type=int, default=8, help="batch size N")
    parser.add_argument("--repeats", type=int, default=10, help="timed train steps per block (medians reported)")
    parser.add_argument(
        "--blocks",
        default=",".join(registry.names()),
        help=f"comma-separated block names, from: {', '.join(registry.names())}",
    )
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--seed", type=int, default=0, help="seed of the input and the parameters")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.blocks.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry.names()]
    if unknown or not names:
        parser.error(f"unknown block(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(registry.names())}")
    for option in ("channels", "height", "width", "batch", "repeats"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be >= 1, got {getattr(args, option)}")
    try:
        costs = measure(
            names,
            channels=args.channels,
            height=args.height,
            width=args.width,
            batch=args.batch,
            repeats=args.repeats,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = jax.devices()[0]
    print(
        f"attnjax blocks at N={args.batch}, H={args.height}, W={args.width}, C={args.channels}, float32, "
        f"on {device.platform} ({device.device_kind}); train step = grad of sum(block(x, train=True)**2) "
        f"w.r.t. params and x; median of {args.repeats} interleaved repeats"
    )
    print(format_table(costs, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
