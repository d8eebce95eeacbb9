"""The mhsa block's forward + backward under each attention formulation (fused, einsum), alternated in one process.

Each size builds one jitted ``value_and_grad`` of ``sum(block(x)**2)`` with respect to the
parameters and the input per formulation (traced inside ``ops.use_formulations``), then times
them in turn, step by step, so machine noise hits both alike. Prints each median and the
ratio fused / einsum (above 1: einsum is faster). ``jax.jit`` with attnjax's XLA:CPU options, as training compiles.

    python experiments/bench_attention.py                               # 8x16x16x64, 128x8x8x64, 128x16x16x64
    python experiments/bench_attention.py --shapes 8x16x16x64 --steps 50 --heads 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from attnjax import ops, xla_options
from attnjax.blocks import MultiHeadSelfAttention

CHOICES = ("fused", "einsum")


def make_step(choice: str, shape: tuple[int, ...], heads: int):
    """A jitted fwd+bwd of the block traced with ``attention=choice``, and its arguments."""
    block = MultiHeadSelfAttention(heads)
    x = jax.random.normal(jax.random.key(0), shape)
    # Non-zero W_o, so that q, k and v get gradients (at init W_o = 0 cuts them off).
    variables = jax.tree.map(lambda a: a + 0.01, block.init(jax.random.key(1), x))

    def loss(variables, x):
        return jnp.sum(block.apply(variables, x) ** 2)

    with ops.use_formulations(attention=choice):  # a fresh closure per choice, traced here
        options = xla_options.compiler_options() or None
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), compiler_options=options).lower(variables, x).compile()
    jax.block_until_ready(step(variables, x))
    return lambda: jax.block_until_ready(step(variables, x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8x16x16x64,128x8x8x64,128x16x16x64", help="NxHxWxC, comma-separated")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per formulation")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, heads {args.heads}, {args.steps} steps")
    for text in args.shapes.split(","):
        shape = tuple(int(s) for s in text.split("x"))
        steps = {choice: make_step(choice, shape, args.heads) for choice in CHOICES}
        times = {choice: [] for choice in CHOICES}
        for _ in range(args.steps):
            for choice in CHOICES:
                start = time.perf_counter()
                steps[choice]()
                times[choice].append(time.perf_counter() - start)
        medians = {choice: statistics.median(times[choice]) * 1e3 for choice in CHOICES}
        print(
            f"{text:>14}  fused {medians['fused']:8.2f} ms  einsum {medians['einsum']:8.2f} ms  "
            f"fused/einsum {medians['fused'] / medians['einsum']:.2f}x"
        )


if __name__ == "__main__":
    main()
