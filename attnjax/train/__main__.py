"""``python -m attnjax.train``: the command line (:mod:`attnjax.cli`) over this package's training loop.

A separate ``__main__`` so that the training module is imported once, as ``attnjax.train``,
and never imports the CLI that imports it.
"""

from attnjax.cli import main

if __name__ == "__main__":
    main()
