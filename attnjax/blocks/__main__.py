"""``python -m attnjax.blocks``: each registered block's options and their defaults, one line per block.

    python -m attnjax.blocks                        # every block
    python -m attnjax.blocks --options --blocks cbam,softmax

These are the options ``--block-option KEY=VALUE`` sets in training and ``NAME:KEY=VALUE`` in a
study. The listing is all this command does: ``--options`` may be given or left out. The blocks'
cost table (parameters, FLOPs, train-step time) is ``python -m attnjax.compare.block_cost``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from attnjax import blocks as registry
from attnjax.validate import CommandLineParser

COST_COMMAND = "python -m attnjax.compare.block_cost"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="python -m attnjax.blocks",
        description="List each attention block's options and their defaults (what --block-option sets in training).",
        epilog=f"The blocks' cost table (parameters, FLOPs, train-step time): {COST_COMMAND}",
    )
    parser.add_argument(
        "--options", action="store_true", help="list each block's options and defaults (also done without it)"
    )
    parser.add_argument(
        "--blocks",
        default=",".join(registry.names()),
        help=f"comma-separated block names (default: every block), from: {', '.join(registry.names())}",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown_args = parser.parse_known_args(argv)
    if unknown_args:
        parser.error(
            f"unrecognized arguments: {' '.join(unknown_args)} (this command lists the blocks' options; "
            f"the cost table is {COST_COMMAND})"
        )
    names = [n.strip() for n in args.blocks.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry.names()]
    if unknown or not names:
        parser.error(f"unknown block(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(registry.names())}")
    for name in names:
        listed = ", ".join(f"{k}={v!r}" for k, v in registry.options(name).items()) or "(none)"
        print(f"{name}: {listed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
