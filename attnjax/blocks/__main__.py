"""``python -m attnjax.blocks``: the cost table of the attention blocks (see :mod:`attnjax.blocks.cost`)."""

from attnjax.blocks.cost import main

if __name__ == "__main__":
    raise SystemExit(main())
