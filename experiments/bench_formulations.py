"""Train-step time of the blocks whose ops have backend-dependent formulations, under each formulation.

For each block and input shape, the training step of ``attnjax.compare.block_cost`` (the gradient of
``sum(block(x, train=True) ** 2)`` w.r.t. the parameters and x, with the batch-norm update) is
traced and compiled once per formulation of the block's op, forced with
``ops.use_formulations`` (the trace happens inside the context). The timed repeats then
alternate the variants, in an order rotated by one per repeat, so machine noise falls on all
alike. Printed: medians, interquartile ranges, the number of convolutions in the compiled HLO, and
each variant's speedup over the first (the baseline's median over its own).

    python experiments/bench_formulations.py                                  # sk, triplet, cbam at 8x16x16x64
    python experiments/bench_formulations.py --blocks triplet,cbam --shapes 128x32x32x64 --repeats 10

On a shared machine, hold the CPU lock: ``flock -x /tmp/attnjax-cpu.lock python experiments/...``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from attnjax import blocks, ops, xla_options
from attnjax.compare.block_cost import train_step_fn

# block -> the op whose formulations it is timed under (the first formulation is the baseline)
OPS = {"sk": "grouped_conv", "triplet": "single_output_conv", "cbam": "single_output_conv"}
BASELINE = {"grouped_conv": "grouped", "single_output_conv": "conv"}


def parse_shape(text: str) -> tuple[int, int, int, int]:
    n, h, w, c = (int(part) for part in text.lower().split("x"))
    return n, h, w, c


def compile_step(name: str, x: jax.Array, op: str, choice: str):
    """The compiled train step of block ``name`` traced under ``op=choice``, its args, and its HLO's conv count."""
    block = blocks.create(name)
    variables = jax.jit(block.init)(jax.random.key(1), x)
    params = variables.get("params", {})
    with ops.use_formulations(**{op: choice}):
        options = xla_options.compiler_options() or None  # as training compiles
        compiled = jax.jit(train_step_fn(block, variables), compiler_options=options).lower(params, x).compile()
    jax.block_until_ready(compiled(params, x))  # warm-up
    return compiled, (params, x), compiled.as_text().count(" convolution(")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="sk,triplet,cbam", help="comma-separated, from: " + ", ".join(OPS))
    parser.add_argument("--shapes", default="8x16x16x64", help="comma-separated NxHxWxC input shapes")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per variant (medians reported)")
    args = parser.parse_args(argv)

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; table choice: {ops.chosen()}")
    for shape in (parse_shape(s) for s in args.shapes.split(",")):
        x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
        variants = []  # (block, choice, compiled, args, convs)
        for name in args.blocks.split(","):
            op = OPS[name]
            choices = [BASELINE[op]] + [c for c in ops.CHOICES[op] if c != BASELINE[op]]
            variants += [(name, choice, *compile_step(name, x, op, choice)) for choice in choices]
        times = {(v[0], v[1]): [] for v in variants}
        for r in range(args.repeats):
            shift = r % len(variants)
            for name, choice, compiled, step_args, _ in variants[shift:] + variants[:shift]:
                start = time.perf_counter()
                jax.block_until_ready(compiled(*step_args))
                times[name, choice].append(time.perf_counter() - start)

        print(f"\ninput {'x'.join(map(str, shape))} (NxHxWxC), fwd+bwd train step, {args.repeats} repeats")
        print(f"{'block':8} {'formulation':15} {'convs':>5} {'median ms':>10} {'IQR ms':>8} {'speedup':>8}")
        baseline = {}
        for name, choice, _, _, convs in variants:
            samples = times[name, choice]
            median = statistics.median(samples)
            q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else (0, 0, 0)
            baseline.setdefault(name, median)
            ratio = baseline[name] / median
            print(f"{name:8} {choice:15} {convs:5d} {median * 1e3:10.2f} {(q3 - q1) * 1e3:8.2f} {ratio:7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
